"""`lmstack <command>`: the command table and the entry point.

Each command is a typed function in `lmstack/cli/<group>.py`; jsonargparse turns its
signature and docstring into `--help` (with defaults) and `--config file.yaml`. Command
modules import heavy libraries inside the function so `--help` stays fast. An
`LmstackError` is printed as one clear line (exit code 2), never as a traceback.
"""

from __future__ import annotations

import sys

from lmstack.cli.convert import convert
from lmstack.cli.data import data_prepare, tokenizer_train
from lmstack.cli.infer import chat, generate, quantize
from lmstack.cli.quickstart import quickstart
from lmstack.cli.serve import serve
from lmstack.cli.train import finetune, pretrain
from lmstack.errors import LmstackError


def commands() -> dict:
    """The command tree: a dict of functions, nested dicts for command groups."""
    return {
        "convert": convert,
        "serve": serve,
        "tokenizer": {"train": tokenizer_train},
        "data": {"prepare": data_prepare},
        "generate": generate,
        "chat": chat,
        "quantize": quantize,
        "quickstart": quickstart,
        "pretrain": pretrain,
        "finetune": finetune,
    }


def normalize_flags(argv: list[str]) -> list[str]:
    """Accept `--max-shard-size` as well as jsonargparse's `--max_shard_size`."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    argv = normalize_flags(sys.argv[1:] if argv is None else list(argv))
    try:
        auto_cli(commands(), args=argv, description="lmstack: the whole life of an LLM in one package",
                 env_prefix="LMSTACK", default_env=False)
    except LmstackError as err:
        print(f"lmstack: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
