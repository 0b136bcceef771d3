"""Chat templates: render a model's Jinja `chat_template` exactly as transformers does.

Templates come from downloaded model directories, so they are untrusted code: they run in
jinja2's `ImmutableSandboxedEnvironment`, configured like transformers' (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a JSON `tojson`), and any
reach for a Python internal (`__class__`, `__globals__`, ...) stops rendering with a
`TokenizerError` instead of quietly printing nothing.

Two transformers features ride on the render, ported line for line from
`transformers.utils.chat_template_utils.render_jinja_template`:

* `continue_final_message`: the final message's content (or its last text part) gets the tag
  "CONTINUE_FINAL_MESSAGE_TAG " appended, the template renders, and the text is cut at the tag
  (the tag's trailing space tells whether the template kept the message's trailing spaces; when
  it trimmed them the cut text is rstripped too). A template that drops the message is an error.
* `{% generation %}...{% endgeneration %}` blocks (transformers' AssistantTracker): rendering with
  `render_with_generation_spans` walks `template.generate()` and records the (start, end)
  character span of every block's output, the source of transformers' `assistant_masks`.

Rendering is bounded, since a template is code from a model download or (on a trusting server) a
request: string/list repetition, `+`, `~`, `%` formatting, `**`, str methods and filters refuse
results over `MAX_VALUE_SIZE` items (or `MAX_INT_BITS` bits), one render may ask `range()` for at
most `MAX_RANGE_ITEMS` items and run at most `MAX_LOOP_ITERATIONS` loop iterations in all, its
output stops past `MAX_OUTPUT_CHARS` characters, and it gives up after `MAX_RENDER_SECONDS`.
Every failure, at compile or render time (recursion, overflow, memory, a bad operand), is a
`TokenizerError` naming the template. Real templates stay far below every cap.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from lmstack.errors import TokenizerError

# The ChatML template (OpenAI's and Qwen's turn markers), used when a tokenizer has no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# Older names for a message's reasoning; transformers copies the first one found to these two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' marker for continue_final_message (its trailing space detects trimmed messages)
CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# Render bounds (see the module docstring). A real prompt is at most a few hundred thousand
# characters and a real template loops over messages/tools a few thousand times at most.
MAX_VALUE_SIZE = 1_000_000        # characters/items of one string or list an operation may build
MAX_INT_BITS = 100_000            # bits of one integer `*`/`**` may build (~30,000 digits)
MAX_RANGE_ITEMS = 1_000_000       # range() items over one whole render
MAX_LOOP_ITERATIONS = 1_000_000   # {% for %} iterations over one whole render
MAX_OUTPUT_CHARS = 4_000_000      # characters of rendered text
MAX_RENDER_SECONDS = 10.0         # wall time of one render (a backstop; real renders take ms)


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by the template itself (e.g. "roles must alternate")."""


class _TemplateTooCostly(Exception):
    """The template tried to build too large a value or do too much work (a render bound)."""


class _Budget:
    """What one render has spent; one per render, kept per thread."""

    __slots__ = ("range_items", "iterations", "deadline")

    def __init__(self) -> None:
        self.range_items = 0
        self.iterations = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS


_budget_local = threading.local()


def _budget() -> _Budget | None:
    return getattr(_budget_local, "budget", None)


def _check_deadline(budget: _Budget | None) -> None:
    if budget is not None and time.monotonic() > budget.deadline:
        raise _TemplateTooCostly(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, bytes)) else 0


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple, bytes)) and len(value) > MAX_VALUE_SIZE:
        raise _TemplateTooCostly(f"{what} would build a value of {len(value):,} items (the limit is "
                                 f"{MAX_VALUE_SIZE:,})")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _TemplateTooCostly(f"{what} would build an integer over {MAX_INT_BITS:,} bits")
    return value


def _refuse_if(size: int, what: str) -> None:
    if size > MAX_VALUE_SIZE:
        raise _TemplateTooCostly(f"{what} would build a value of {size:,} items (the limit is {MAX_VALUE_SIZE:,})")


def _check_int_args(args: Any, kwargs: Any, what: str) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_VALUE_SIZE:
            raise _TemplateTooCostly(f"{what} was given {a if a.bit_length() < 64 else 'a huge number'}, over the "
                                     f"limit of {MAX_VALUE_SIZE:,}")


_FORMAT_NUMBER = re.compile(r"\d{7,}")  # a width/precision of 1,000,000 or more


def _check_format_spec(fmt: Any, what: str) -> None:
    if isinstance(fmt, str):
        for digits in _FORMAT_NUMBER.findall(fmt):
            if int(digits) > MAX_VALUE_SIZE:
                raise _TemplateTooCostly(f"{what} asks for a width of {digits[:20]}, over the limit of "
                                         f"{MAX_VALUE_SIZE:,}")


def _bounded_mod(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _check_format_spec(left, "% formatting")
        _check_int_args(right if isinstance(right, tuple) else (), {}, "% formatting")
    return _check_size(left % right, "% formatting")


def _bounded_mul(left: Any, right: Any) -> Any:
    for seq, n in ((left, right), (right, left)):
        if _sized(seq) and isinstance(n, int):
            _refuse_if(len(seq) * max(n, 0), "repetition (*)")
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise _TemplateTooCostly(f"multiplication would build an integer over {MAX_INT_BITS:,} bits")
    return _check_size(left * right, "repetition (*)")


def _bounded_pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise _TemplateTooCostly(f"** would build an integer over {MAX_INT_BITS:,} bits")
    return _check_size(left ** right, "**")


def _bounded_add(left: Any, right: Any) -> Any:
    if _sized(left) and _sized(right):
        _refuse_if(len(left) + len(right), "+")
    return _check_size(left + right, "+")


def _bounded_join(parts: Any) -> str:
    """`environment.concat` (joins every block, macro and capture's output) and `~`, bounded."""
    parts = list(parts)
    total = 0
    for part in parts:
        total += len(part) if isinstance(part, str) else 0
    _refuse_if(total, "joining text")
    return "".join(parts)


def _budget_range(*args: int) -> range:
    """jinja's `safe_range`, charged to the render's budget of range() items."""
    rng = safe_range(*args)
    budget = _budget()
    if budget is not None:
        budget.range_items += len(rng)
        if budget.range_items > MAX_RANGE_ITEMS:
            raise _TemplateTooCostly(f"range() was asked for more than {MAX_RANGE_ITEMS:,} items in one render")
        _check_deadline(budget)
    return rng


def _budget_iter(iterable: Any) -> Any:
    """Every `{% for %}` iterates through this: loop iterations are charged to the render's budget."""
    budget = _budget()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        budget.iterations += 1
        if budget.iterations > MAX_LOOP_ITERATIONS:
            raise _TemplateTooCostly(f"loops ran more than {MAX_LOOP_ITERATIONS:,} iterations in one render")
        if not budget.iterations & 1023:
            _check_deadline(budget)
        yield item


def _bounded_filter(name: str, func: Any) -> Any:
    """A filter that refuses huge int arguments (widths, counts) and results."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # the leading context/eval-context argument, if any, and the filtered value are not checked
        skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1
        rest = args[skip:]
        _check_int_args(rest, kwargs, f"the {name} filter")
        if name == "format" and len(args) >= skip:
            _check_format_spec(args[skip - 1], "the format filter")
        if name == "join" and hasattr(args[skip - 1], "__len__"):
            sep = rest[0] if rest else kwargs.get("d", "")
            if isinstance(sep, str):
                _refuse_if(len(sep) * len(args[skip - 1]), "the join filter")
        if name == "replace" and len(rest) >= 2 and isinstance(args[skip - 1], str):
            _estimate_replace(str(args[skip - 1]), rest[0], rest[1])
        if name == "indent" and isinstance(args[skip - 1], str):
            width = rest[0] if rest else kwargs.get("width", 4)
            if isinstance(width, str):
                width = len(width)
            if isinstance(width, int):
                _refuse_if(len(args[skip - 1]) + (args[skip - 1].count("\n") + 1) * width, "the indent filter")
        return _check_size(func(*args, **kwargs), f"the {name} filter")

    return wrapper


def _estimate_replace(s: str, old: Any, new: Any) -> None:
    if isinstance(old, str) and isinstance(new, str):
        count = s.count(old) if old else len(s) + 1
        _refuse_if(len(s) + count * len(new), "replace")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' AssistantTracker: renders the body and,
    while tracking, records the (start, end) character span of the body's output in the text.

    As in transformers, the start is the length of the blocks `template.generate()` has yielded
    so far. The tracking state is per thread (a server renders from several threads)."""

    tags = {"generation"}

    def __init__(self, environment: Any):
        super().__init__(environment)
        self.found = False  # set while parsing: the template has at least one generation block
        self._local = threading.local()

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        self.found = True
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        rv = caller()
        tracking = getattr(self._local, "tracking", None)
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(block) for block in blocks)
            spans.append((start, start + len(rv)))
        return rv

    def generate_tracked(self, template: jinja2.Template, **context: Any) -> tuple[str, list[tuple[int, int]]]:
        """Render `template` through `generate()`, recording the generation spans."""
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        self._local.tracking = (blocks, spans)
        try:
            _generate_bounded(template, context, blocks)
        finally:
            self._local.tracking = None
        return "".join(blocks), spans


def _generate_bounded(template: jinja2.Template, context: dict[str, Any], blocks: list[str]) -> None:
    """Render through `generate()` into `blocks`, stopping past `MAX_OUTPUT_CHARS` characters."""
    total = 0
    for block in template.generate(**context):
        total += len(block)
        if total > MAX_OUTPUT_CHARS:
            raise _TemplateTooCostly(f"the rendered text grew past {MAX_OUTPUT_CHARS:,} characters")
        blocks.append(block)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `{% for %}` to iterate through `environment._lm_iter` (the render's loop budget) and
    `~` through `environment._lm_concat` (bounded). Template code cannot reach or shadow either."""

    def visit_For(self, node: jinja2.nodes.For, frame: Any) -> None:
        node = copy.copy(node)
        node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("_lm_iter"), [node.iter], [], None, None,
                                      lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment._lm_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, but touching an unsafe attribute fails at once instead of rendering '', and with
    the render bounds of the module docstring."""

    code_generator_class = _BoundedCodeGenerator
    # intercepted operators are never constant-folded at compile time (jinja's BinExpr.as_const)
    intercepted_binops = frozenset(["*", "**", "%", "+"])
    concat = staticmethod(_bounded_join)
    _lm_iter = staticmethod(_budget_iter)
    _bounded_binops = {"*": _bounded_mul, "**": _bounded_pow, "%": _bounded_mod, "+": _bounded_add}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["range"] = _budget_range
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def _lm_concat(parts: Any) -> str:
        return _bounded_join(str(p) for p in parts)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        op = self._bounded_binops.get(operator)
        if op is None:
            return super().call_binop(context, operator, left, right)
        return op(left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if __obj is not _budget_range and __obj is not _budget_iter:
            _check_deadline(_budget())
            if isinstance(owner, (str, list, tuple, bytes)):
                what = f"{type(owner).__name__}.{getattr(__obj, '__name__', 'method')}()"
                _check_int_args(args, kwargs, what)
                name = getattr(__obj, "__name__", "")
                if isinstance(owner, str) and name == "replace" and len(args) >= 2:
                    _estimate_replace(owner, args[0], args[1])
                if isinstance(owner, str) and name == "join" and args and hasattr(args[0], "__len__"):
                    _refuse_if(len(owner) * len(args[0]), what)
        return _check_size(super().call(__context, __obj, *args, **kwargs), "a call")

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        _check_format_spec(value.__self__, "str.format")

        @functools.wraps(wrapper)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_int_args(args, kwargs, "str.format")
            return _check_size(wrapper(*args, **kwargs), "str.format")

        return bounded


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore attribute {name!r} on a namespace")


def _short(err: BaseException, limit: int = 300) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; transformers' (and ours) does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def plain_data(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so the sandbox never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return plain_data(value.item())  # numpy scalar
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as transformers passes them: keys with None values dropped, reasoning aliased."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"chat message {i} is {type(message).__name__}, expected a dict with 'role' and 'content'")
        message = {k: plain_data(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """One compiled chat template; `render` gives the prompt text."""

    def __init__(self, source: str, name: str = "chat_template"):
        if not isinstance(source, str):
            raise TokenizerError(f"{name} is {type(source).__name__}, expected a Jinja template string")
        self.source = source
        self.name = name
        env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                             extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = dict
        env.globals["namespace"] = _TemplateNamespace
        self._tracker = next(e for e in env.extensions.values() if isinstance(e, _GenerationTag))
        try:
            self.template = env.from_string(source)
        except TemplateSyntaxError as err:
            raise TokenizerError(f"{name} is not valid Jinja (line {err.lineno}: {err.message}); fix the "
                                 "template") from None
        except RecursionError:
            raise TokenizerError(f"{name} could not be compiled: it nests too deeply") from None
        except Exception as err:  # noqa: BLE001 - any compile failure is the template's fault
            raise TokenizerError(f"{name} could not be compiled: {type(err).__name__}: {_short(err)}") from None

    @property
    def has_generation_markers(self) -> bool:
        """True when the template has `{% generation %}` blocks (marking the assistant's text)."""
        return self._tracker.found

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               continue_final_message: bool | str = False, **variables: Any) -> str:
        """Render with transformers' variables: messages, tools, documents, add_generation_prompt, tokens, extras.

        `continue_final_message` (True, or the name of the field to continue, e.g.
        "reasoning_content") cuts the text right after the final message, as transformers does,
        so the model continues it; it cannot be combined with `add_generation_prompt`.
        """
        return self._render(messages, add_generation_prompt, tools, documents, continue_final_message,
                            False, variables)[0]

    def render_with_generation_spans(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                                     tools: list[dict] | None = None, documents: list[dict] | None = None,
                                     **variables: Any) -> tuple[str, list[tuple[int, int]]]:
        """(text, spans): the render and the (start, end) character span of every `{% generation %}`
        block's output in it, in order (transformers' `generation_indices`; [] without blocks)."""
        return self._render(messages, add_generation_prompt, tools, documents, False, True, variables)

    def _render(self, messages: Any, add_generation_prompt: bool, tools: Any, documents: Any,
                continue_final_message: bool | str, track: bool, variables: dict[str, Any]
                ) -> tuple[str, list[tuple[int, int]]]:
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt cannot be combined: "
                                 "continue_final_message lets the model continue the final message, "
                                 "add_generation_prompt starts a new assistant message; pass one of them")
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise TokenizerError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        spans: list[tuple[int, int]] = []
        try:
            messages = normalize_messages(messages)  # fresh copies: tagging never touches the caller's
            final = self._tag_final_message(messages, continue_final_message) if continue_final_message else None
            context = dict(messages=messages, tools=plain_data(tools), documents=plain_data(documents),
                           add_generation_prompt=add_generation_prompt, **plain_data(variables))
            _budget_local.budget = _Budget()
            try:
                if track:
                    text, spans = self._tracker.generate_tracked(self.template, **context)
                else:
                    blocks: list[str] = []
                    _generate_bounded(self.template, context, blocks)
                    text = "".join(blocks)
            finally:
                _budget_local.budget = None
        except TokenizerError:
            raise
        except _TemplateTooCostly as err:
            raise TokenizerError(f"{self.name} was stopped: {err}; chat templates run with bounded time and "
                                 "memory") from None
        except RecursionError:
            raise TokenizerError(f"{self.name} failed to render: it recursed too deeply") from None
        except MemoryError:
            raise TokenizerError(f"{self.name} failed to render: it ran out of memory") from None
        except _TemplateRaised as err:
            raise TokenizerError(f"{self.name} refused these messages: {err}") from None
        except SecurityError as err:
            raise TokenizerError(
                f"{self.name} tried to reach Python internals ({err}); chat templates run in a sandbox "
                "and may only read messages, tools and the documented variables"
            ) from None
        except TemplateError as err:
            raise TokenizerError(f"{self.name} failed to render: {type(err).__name__}: {err}") from None
        except Exception as err:  # noqa: BLE001 - OverflowError, ValueError, TypeError, ...: the template's fault
            raise TokenizerError(f"{self.name} failed to render: {type(err).__name__}: {_short(err)}") from None
        if final is not None:
            text = self._cut_at_tag(text, final)
        return text, spans

    def _tag_final_message(self, messages: list[dict[str, Any]], continue_final_message: bool | str) -> Any:
        """Append the tag to the final message's field (or its last text part); return the original text."""
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        last = messages[-1]
        final = last.get(field)
        if final is None:
            raise TokenizerError(f'continue_final_message is set but the final message has no "{field}" to '
                                 "continue; give the final message some text, or leave continue_final_message out")
        fields = [field]
        if field in REASONING_FIELDS:  # reasoning is copied under several names: tag every copy
            fields = [f for f in REASONING_FIELDS if last.get(f) == final]
        if not any(f in self.source for f in fields):
            raise TokenizerError(f'continue_final_message is set to "{field}" but {self.name} never reads that '
                                 "field, so there is nothing to continue")
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if "text" in block:  # the last text part of the message
                    final = block["text"]
                    block["text"] = block["text"] + CONTINUE_FINAL_MESSAGE_TAG
                    break
            else:
                raise TokenizerError("continue_final_message is set but the final message has no text part to "
                                     "continue")
        else:
            for f in fields:
                last[f] = last[f] + CONTINUE_FINAL_MESSAGE_TAG
        return final

    def _cut_at_tag(self, text: str, final: Any) -> str:
        tag = CONTINUE_FINAL_MESSAGE_TAG
        if not isinstance(final, str) or final.strip() not in text or tag.strip() not in text:
            raise TokenizerError(
                "continue_final_message is set but the final message does not appear in the text "
                f"{self.name} renders (the template drops or rewrites part of it), so there is no place to "
                f"continue from; final message: {str(final).strip()[:80]!r}")
        at = text.rindex(tag.strip())
        if text[at:at + len(tag)] == tag:
            return text[:at]  # the template kept the message's spacing
        return text[:at].rstrip()  # it trimmed the message's trailing spaces: trim them here too


def select_template(chat_template: str | dict[str, str] | list | None, tools: Any = None) -> tuple[str, str]:
    """(template source, name) from a single template or HF's named set ('default', 'tool_use', ...)."""
    if chat_template is None:
        return CHATML_TEMPLATE, "default ChatML template"
    if isinstance(chat_template, list):
        if not all(isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in chat_template):
            raise TokenizerError("a list of chat templates must hold {'name': str, 'template': str} dicts")
        chat_template = {t["name"]: t["template"] for t in chat_template}
    if isinstance(chat_template, dict):
        if tools is not None and "tool_use" in chat_template:
            return chat_template["tool_use"], "chat template 'tool_use'"
        if "default" in chat_template:
            return chat_template["default"], "chat template 'default'"
        raise TokenizerError(f"the tokenizer has several chat templates {sorted(chat_template)} and none is "
                             "named 'default'; pass chat_template=<name>")
    return chat_template, "chat template"
