"""`lmstack <command>`: the command table and the entry point.

Each command is a typed function in `lmstack/cli/<group>.py`; jsonargparse turns its
signature and docstring into `--help` (with defaults) and `--config file.yaml`. Command
modules import heavy libraries inside the function so `--help` stays fast. An
`LmstackError` is printed as one clear line (exit code 2), never as a traceback.
"""

from __future__ import annotations

import inspect
import os
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
        "tokenizer": {"_help": "Train a tokenizer on text (lmstack tokenizer train --help).",
                      "train": tokenizer_train},
        "data": {"_help": "Clean, deduplicate and tokenize a corpus (lmstack data prepare --help).",
                 "prepare": data_prepare},
        "generate": generate,
        "chat": chat,
        "quantize": quantize,
        "quickstart": quickstart,
        "pretrain": pretrain,
        "finetune": finetune,
    }


_TRUE_FALSE = {"true", "false", "yes", "no", "1", "0", "on", "off"}


_PARSER_OPTIONS = {"help", "config", "print_config", "print_shtab"}  # jsonargparse's own


def _command_path(words: list[str]) -> list[str]:
    """The command words at the start of `words` ("data", "prepare"), as far as the tree goes."""
    tree: object = commands()
    path = []
    for word in words:
        if not isinstance(tree, dict) or word not in tree or word.startswith("_"):
            break
        tree = tree[word]
        path.append(word)
    return path if callable(tree) else []


def _command_params(argv: list[str]) -> dict[str, str]:
    """{parameter: annotation text} of the command that argv names (empty if none yet)."""
    path = _command_path(argv)
    if not path:
        return {}
    tree: object = commands()
    for word in path:
        tree = tree[word]  # type: ignore[index]
    return {name: str(p.annotation) for name, p in inspect.signature(tree).parameters.items()}


def _unknown(name: str, known: dict[str, str], where: str, command: list[str]) -> LmstackError:
    """An unknown option, with the closest known one (`--vocab_szie` -> did you mean --vocab_size?)."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    return LmstackError(f"{where} is not an option of `lmstack {' '.join(command)}`{hint} "
                        f"(see lmstack {' '.join(command)} --help)")


def _check_config_file(path: str, params: dict[str, str], command: list[str]) -> None:
    """Keys of a --config YAML given after a command must be its options: jsonargparse reports a
    wrong key of a two-word command (`data prepare`) only as "error: 'data'"."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # jsonargparse names the file and the problem
    if not isinstance(data, dict):
        return
    for key in data:
        name = str(key).replace("-", "_")
        if name not in params and name not in _PARSER_OPTIONS:
            raise _unknown(name, params, f"--config {path}: key {key!r}", command)


def normalize_flags(argv: list[str]) -> list[str]:
    """Make the flags users type work the way they expect, before jsonargparse sees them.

    `--max-shard-size` is `--max_shard_size`; a bare boolean flag (`--stream`) means true and
    `--no-stream` false; a list option given several times (`--input a --input b`) keeps every
    value (jsonargparse alone would keep only the last); any other option given twice is an error.
    An option (or a --config key) the command does not have is named with the closest one.
    """
    words = [a for a in argv if not a.startswith("-")]
    command = _command_path(words)
    params = _command_params(words)
    is_bool = {n for n, a in params.items() if a.replace(" ", "") in ("bool", "bool|None", "Optional[bool]")}
    is_list = {n for n, a in params.items() if a.startswith(("list", "List", "Sequence")) or "list[" in a}
    takes_value = (set(params) - is_bool) | {"config"}
    values = set()  # positions holding an option's value (`--prompt "--help me"`): passed through as they are
    for i, arg in enumerate(argv[:-1]):
        name, sep, _ = arg[2:].partition("=")
        if arg.startswith("--") and not sep and i not in values and name.replace("-", "_").rstrip("+") in takes_value:
            values.add(i + 1)
    names = [a[2:].partition("=")[0].replace("-", "_") for i, a in enumerate(argv)
             if a.startswith("--") and len(a) > 2 and i not in values]
    command_end = max(argv.index(word) for word in command) if command else len(argv)  # options after it
    out: list[str] = []
    seen: set[str] = set()
    for i, arg in enumerate(argv):
        if i in values or not (arg.startswith("--") and len(arg) > 2):
            out.append(arg)
            continue
        name, sep, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        following = argv[i + 1] if i + 1 < len(argv) else None
        base = name[3:] if name.startswith("no_") and name[3:] in is_bool else name
        after_command = i > command_end
        if after_command and base.rstrip("+") not in params and base not in _PARSER_OPTIONS and "." not in base:
            raise _unknown(base, params, f"--{arg[2:].partition('=')[0]}", command)
        if after_command and name == "config" and (value or following):
            _check_config_file(value if sep else following, params, command)
        if name.startswith("no_") and name[3:] in is_bool and not sep:
            out += [f"--{name[3:]}", "false"]
            continue
        if name in is_list and names.count(name) > 1:
            out.append(f"--{name}+" + sep + value)
            continue
        if name in seen and name in params and name != "config":
            raise LmstackError(f"option --{name} is given twice; give it once")
        seen.add(name)
        out.append(f"--{name}" + sep + value)
        if name in is_bool and not sep and (following is None or following.lower() not in _TRUE_FALSE):
            out.append("true")
    return out


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    try:
        argv = normalize_flags(sys.argv[1:] if argv is None else list(argv))
        auto_cli(commands(), args=argv, description="lmstack: the whole life of an LLM in one package",
                 env_prefix="LMSTACK", default_env=False)
    except LmstackError as err:
        print(f"lmstack: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmstack generate ... | head`: the reader left; stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
