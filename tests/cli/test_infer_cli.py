"""`lmstack generate`, `lmstack quantize` and `lmstack chat` end to end, as a user runs them."""

import json
import subprocess
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "infer"))
from tiny_dir import tiny_model_dir  # noqa: E402

import lmstack  # noqa: E402
from lmstack.infer import GenerationConfig, generate  # noqa: E402
from lmstack.infer.quantize import quantize as quantize_model  # noqa: E402


def test_help_lists_the_inference_commands():
    out = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--num_beams" in out.stdout and "default: 128" in out.stdout


def main_cli(capsys, *args):
    """The same entry point in-process (a subprocess costs seconds of imports per call)."""
    from lmstack.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_generate_json_matches_the_python_api(model_dir, capsys):
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "To be", "--max_new_tokens", "12",
                              "--ignore_eos", "true", "--logprobs", "2", "--json_output", "true", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)[0]["prompt"] == "To be"
    got = json.loads(out)[0]["outputs"][0]
    model, tok = lmstack.load(model_dir)
    ref = generate(model, "To be", GenerationConfig(max_new_tokens=12, ignore_eos=True), tok)[0].outputs[0]
    assert got["token_ids"] == ref.token_ids and got["text"] == ref.text and len(got["logprobs"]) == 12
    assert got["finish_reason"] == "length"


def test_generate_stream_beams_and_errors(model_dir, capsys):
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "To be", "--max_new_tokens", "8",
                              "--stream", "true", "--temperature", "0.7", "--seed", "3", "--ignore_eos", "true",
                              "--device", "cpu")
    assert code == 0, err
    model, tok = lmstack.load(model_dir)
    ref = generate(model, "To be", GenerationConfig(max_new_tokens=8, temperature=0.7, seed=3, ignore_eos=True), tok)
    assert out == ref[0].outputs[0].text + "\n"
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "To be", "--max_new_tokens", "6",
                              "--num_beams", "3", "--n", "2", "--early_stopping", "never", "--device", "cpu")
    assert code == 0 and out.count("--- prompt 0, output") == 2, err
    for args, message in [(("--temperature", "-1"), "temperature=-1.0 must be >= 0"),
                          (("--max_new_tokens", "5000"), "goes beyond the context"),
                          (("--max_new_tokens", "0"), "lmstack.infer.prompt_logprobs(model, ids)"),
                          (("--early_stopping", "maybe"), "--early_stopping='maybe' must be true, false or never")]:
        code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "x", "--device", "cpu", *args)
        assert code == 2 and message in err
    from lmstack.infer import prompt_logprobs  # the function that message points to is importable there

    model, _ = lmstack.load(model_dir)
    assert len(prompt_logprobs(model, [5, 6, 7])) == 3


def test_bad_devices_files_and_counts_are_named(model_dir, tmp_path, capsys):
    import torch

    code, _, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "x", "--device", "tpu")
    assert code == 2 and "--device 'tpu' is not a device lmstack runs on; use auto, cpu, cuda or cuda:N" in err
    if not torch.cuda.is_available():
        code, _, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "x", "--device", "cuda")
        assert code == 2 and "--device cuda but CUDA is not available here; use --device cpu or auto" in err
    (tmp_path / "prompts.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    code, _, err = main_cli(capsys, "generate", str(model_dir), "--prompt_file", str(tmp_path / "prompts.txt"),
                            "--device", "cpu")
    assert code == 2 and f"--prompt_file {tmp_path / 'prompts.txt'} is not UTF-8 text" in err
    (tmp_path / "taken").write_text("a file")
    for command in (("convert", str(model_dir), str(tmp_path / "taken")),
                    ("quantize", str(model_dir), str(tmp_path / "taken"), "--device", "cpu")):
        code, _, err = main_cli(capsys, *command)
        assert code == 2 and f"--out {tmp_path / 'taken'} is a file; give a directory" in err
    code, _, err = main_cli(capsys, "quantize", str(model_dir), str(tmp_path / "q0"), "--device", "cpu",
                            "--eval_text", str(tmp_path / "prompts.txt"), "--eval_tokens", "1")
    assert code == 2 and "--eval_tokens must be at least 2" in err


def test_quantize_saves_a_directory_that_generates(model_dir, tmp_path, capsys):
    pytest.importorskip("torchao")
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    code, out, err = main_cli(capsys, "quantize", str(model_dir), str(tmp_path / "q"), "--method", "int8",
                              "--device", "cpu", "--eval_text", str(text))
    assert code == 0, err
    assert "perplexity on" in out and "->" in out
    code, out, err = main_cli(capsys, "generate", str(tmp_path / "q"), "--prompt", "To be", "--max_new_tokens", "4",
                              "--device", "cpu")
    assert code == 0 and out.strip(), err
    code, out, err = main_cli(capsys, "quantize", str(tmp_path / "q"), str(tmp_path / "qq"), "--device", "cpu")
    assert code == 2 and f"{tmp_path / 'q'} holds int8-quantized weights" in err  # not quantized twice
    model, _ = lmstack.load(tmp_path / "q")
    with pytest.raises(lmstack.LmstackError, match="holds int8-quantized weights"):
        quantize_model(model, "int4")


def test_chat_in_a_terminal(model_dir):
    """Drive `lmstack chat` through a pseudo-terminal: answers stream, commands work, history resets."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "lmstack.cli", "chat", str(model_dir), "--device", "cpu",
                                           "--max_new_tokens", "16", "--seed", "0"], encoding="utf-8", timeout=60)
    try:
        child.expect("Commands: /reset, /system TEXT, /exit")
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect_exact(">>> ")  # the answer streamed, then a new prompt
        answer = child.before
        assert "Hello there" in answer  # echo of the typed line
        child.sendline("/system You are a fox.")
        child.expect_exact("[system prompt set; history cleared]")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("[history cleared]")
        child.expect_exact(">>> ")
        child.sendline("/nonsense")
        child.expect_exact("[unknown command /nonsense")
        child.expect_exact(">>> ")
        child.sendline("Second question")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_mode_says_when_the_model_has_no_template_of_its_own(model_dir, tmp_path, capsys):
    import shutil

    args = ("--prompt", "hi", "--chat", "true", "--max_new_tokens", "2", "--device", "cpu")
    code, _, err = main_cli(capsys, "generate", str(model_dir), *args)
    assert code == 0 and "no chat_template" not in err
    base = shutil.copytree(model_dir, tmp_path / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = main_cli(capsys, "generate", str(base), *args)
    assert code == 0 and f"note: {base} has no chat_template in tokenizer_config.json; using ChatML" in err


def test_a_broken_generation_config_is_named_not_ignored(model_dir, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(model_dir, tmp_path / "broken")
    args = ("--prompt", "hi", "--chat", "true", "--max_new_tokens", "2", "--device", "cpu")
    for text, message in (("{not json", "is not valid JSON"), ('{"eos_token_id": "x"}', "eos_token_id must be")):
        (broken / "generation_config.json").write_text(text)
        code, _, err = main_cli(capsys, "generate", str(broken), *args)
        assert code == 2 and f"{broken / 'generation_config.json'}" in err and message in err


def test_repeated_prompts_are_labelled_by_position_and_stream_with_a_draft_is_refused(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\nHello\nTo be\n")
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt_file", str(prompts), "--max_new_tokens",
                              "3", "--device", "cpu")
    assert code == 0, err
    assert [line.split(",")[0] for line in out.splitlines() if line.startswith("--- prompt")] == \
        ["--- prompt 0", "--- prompt 1", "--- prompt 2"]  # the third is not "prompt 0" again
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "To be", "--draft_model",
                              str(model_dir), "--stream", "true", "--device", "cpu")
    assert code == 2 and "--stream is not available with --draft_model" in err


def test_piping_into_a_reader_that_leaves_is_quiet(model_dir, tmp_path):
    """`lmstack generate ... | head -1`: the reader closes the pipe; no traceback, 141 as a shell tool."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n" * 600)  # far more output than a pipe holds (64 KiB), so writes must fail
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "generate", str(model_dir), "--prompt_file",
                             str(prompts), "--max_new_tokens", "1", "--json_output", "true", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_compile_takes_true_and_false_as_pretrain_does(model_dir, capsys):
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "To be", "--max_new_tokens", "2",
                              "--compile", "false", "--device", "cpu")
    assert code == 0, err
    code, out, err = main_cli(capsys, "generate", str(model_dir), "--prompt", "To be", "--compile", "maybe",
                              "--device", "cpu")
    assert code == 2 and "--compile='maybe' must be auto, yes (true) or no (false)" in err


def test_a_preset_without_random_init_names_the_command_line_flag(tmp_path, capsys):
    code, out, err = main_cli(capsys, "convert", "tiny-llama", str(tmp_path / "out"))
    assert code == 2 and "--random-init on the command line" in err
