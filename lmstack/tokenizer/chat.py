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
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' marker for continue_final_message (its trailing space detects trimmed messages)
CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by the template itself (e.g. "roles must alternate")."""


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
            for block in template.generate(**context):
                blocks.append(block)
        finally:
            self._local.tracking = None
        return "".join(blocks), spans


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, but touching an unsafe attribute fails at once instead of rendering ''."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


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
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
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
            if track:
                text, spans = self._tracker.generate_tracked(self.template, **context)
            else:
                text = self.template.render(**context)
        except _TemplateRaised as err:
            raise TokenizerError(f"{self.name} refused these messages: {err}") from None
        except SecurityError as err:
            raise TokenizerError(
                f"{self.name} tried to reach Python internals ({err}); chat templates run in a sandbox "
                "and may only read messages, tools and the documented variables"
            ) from None
        except TemplateError as err:
            raise TokenizerError(f"{self.name} failed to render: {type(err).__name__}: {err}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as err:
            raise TokenizerError(f"{self.name} failed to render: {type(err).__name__}: {err}") from None
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
        if field in _REASONING_FIELDS:  # reasoning is copied under several names: tag every copy
            fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
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
