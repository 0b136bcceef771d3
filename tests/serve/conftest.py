"""Fixtures: one tiny model directory and one real AsyncEngine + live server per session."""

import importlib.util

import pytest

# Without the server's extra dependencies (`pip install lmstack[serve]`) this folder is skipped:
# not collected at all, which also works when a file here is named on the command line (a
# module-level importorskip in a conftest would be an error there).
if importlib.util.find_spec("fastapi") is None:
    collect_ignore_glob = ["test_*.py"]
    API_KEY = None
else:
    from serve_helpers import API_KEY


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from serve_helpers import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from serve_helpers import tiny_engine

    engine = tiny_engine(tiny_dir)
    yield engine
    import asyncio

    asyncio.run(engine.shutdown())


@pytest.fixture(scope="session")
def server(engine):
    """The server most tests use: real engine, an API key, served as 'tiny'."""
    from serve_helpers import LiveServer

    from lmstack.serve import ServeConfig, create_app

    app = create_app(engine, config=ServeConfig(model_names=["tiny", "tiny-alias"], api_keys=[API_KEY]))
    with LiveServer(app) as live:
        yield live


@pytest.fixture()
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def hf_reference(tiny_dir):
    """transformers' model and `tokenizers`' tokenizer for the same directory: the references."""
    import transformers
    from tokenizers import Tokenizer

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype="float32").eval()
    return model, Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
