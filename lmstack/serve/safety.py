"""An optional content filter: blocked patterns, grouped in categories, on input and output.

Configured by a YAML or JSON file (`lmstack serve --safety-config safety.yaml`):

    check_input: true        # refuse prompts/messages that match (400, code content_filter)
    check_output: true       # stop generations that match (finish_reason content_filter)
    holdback_chars: 32       # streamed text is held back this far behind generation
    categories:
      weapons:
        patterns: ['\\bbuild (a|an) (bomb|explosive)\\b']   # regular expressions
        words: [nerve agent]                                  # literal phrases, whole words
        message: optional text shown to the user

Matching is case-insensitive. Streaming output is checked as it is generated: text is sent
only once it is `holdback_chars` behind the newest token, so a blocked phrase up to that long
is caught before any of it reaches the client. A rule set, not a model: it is a policy hook
for deployments, not a claim of safety.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError


@dataclass
class Violation:
    category: str
    stage: str  # "input" | "output"
    start: int  # character span of the match in the checked text
    end: int
    message: str

    def user_message(self) -> str:
        what = "The request" if self.stage == "input" else "The response"
        return f"{what} was refused by the server's content filter (category: {self.category}). {self.message}".strip()


@dataclass
class SafetyCategory:
    name: str
    patterns: list[re.Pattern]
    message: str = ""


@dataclass
class SafetyFilter:
    categories: list[SafetyCategory]
    check_input: bool = True
    check_output: bool = True
    holdback_chars: int = 32
    source: str = "<config>"
    _combined: list[tuple[str, re.Pattern]] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> SafetyFilter:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--safety-config {path} does not exist; pass a YAML or JSON file of blocked patterns")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:  # yaml and json raise their own error types
            raise ConfigError(f"{path} could not be parsed ({type(err).__name__}: {err})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> SafetyFilter:
        if not isinstance(data, dict) or not isinstance(data.get("categories"), dict) or not data["categories"]:
            raise ConfigError(f"{source} must hold a mapping with a non-empty 'categories' mapping "
                              "(category name -> {patterns: [...], words: [...]})")
        unknown = set(data) - {"categories", "check_input", "check_output", "holdback_chars"}
        if unknown:
            raise ConfigError(f"{source} has unknown keys {sorted(unknown)}; allowed: categories, check_input, "
                              "check_output, holdback_chars")
        categories = []
        for name, spec in data["categories"].items():
            categories.append(_category(str(name), spec, source))
        holdback = data.get("holdback_chars", 32)
        if not isinstance(holdback, int) or holdback < 0:
            raise ConfigError(f"{source}: holdback_chars={holdback!r} must be an integer >= 0")
        for key in ("check_input", "check_output"):
            if not isinstance(data.get(key, True), bool):
                raise ConfigError(f"{source}: {key}={data[key]!r} must be true or false")
        out = cls(categories, bool(data.get("check_input", True)), bool(data.get("check_output", True)),
                  holdback, source)
        out._combined = [(c.name, p) for c in categories for p in c.patterns]
        return out

    def find(self, text: str, stage: str, start: int = 0) -> Violation | None:
        """The earliest match in text[start:], or None."""
        best: tuple[int, int, str] | None = None
        for name, pattern in self._combined:
            m = pattern.search(text, start)
            if m and (best is None or m.start() < best[0]):
                best = (m.start(), m.end(), name)
        if best is None:
            return None
        category = next(c for c in self.categories if c.name == best[2])
        return Violation(best[2], stage, best[0], best[1], category.message)

    def check_input_texts(self, texts: list[str]) -> Violation | None:
        if not self.check_input:
            return None
        for text in texts:
            violation = self.find(text, "input")
            if violation:
                return violation
        return None

    def output_guard(self) -> OutputGuard:
        return OutputGuard(self)


class OutputGuard:
    """Checks one generation as it grows; releases text only once it is safe to show."""

    def __init__(self, safety: SafetyFilter):
        self.safety = safety
        self.text = ""
        self.emitted = 0  # characters of self.text already released
        self.scanned = 0  # matches ending before here were ruled out
        self.violation: Violation | None = None

    def feed(self, delta: str, final: bool = False) -> str:
        """Add generated text; return what may be shown now (once blocked: up to the match, then '')."""
        if self.violation is not None:
            return ""
        self.text += delta
        if not self.safety.check_output:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        overlap = self.safety.holdback_chars + 1
        self.violation = self.safety.find(self.text, "output", start=max(0, self.scanned - overlap))
        self.scanned = len(self.text)
        if self.violation is not None:  # what precedes the match is not part of it: release that much
            out = self.text[self.emitted:max(self.emitted, self.violation.start)]
            self.emitted += len(out)
            return out
        release_to = len(self.text) if final else max(self.emitted, len(self.text) - self.safety.holdback_chars)
        out, self.emitted = self.text[self.emitted:release_to], release_to
        return out

    def finish(self) -> str:
        return self.feed("", final=True)

    @property
    def safe_text(self) -> str:
        """The whole generation up to (not including) a blocked match."""
        return self.text[:self.violation.start] if self.violation else self.text


def _category(name: str, spec: Any, source: str) -> SafetyCategory:
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: category {name!r} must be a mapping with 'patterns' and/or 'words'")
    unknown = set(spec) - {"patterns", "words", "message"}
    if unknown:
        raise ConfigError(f"{source}: category {name!r} has unknown keys {sorted(unknown)}; allowed: patterns, "
                          "words, message")
    patterns = []
    for regex in _strings(spec.get("patterns", []), f"category {name!r} patterns", source):
        try:
            patterns.append(re.compile(regex, re.IGNORECASE))
        except re.error as err:
            raise ConfigError(f"{source}: category {name!r} pattern {regex!r} is not a valid regular expression "
                              f"({err})") from None
    for word in _strings(spec.get("words", []), f"category {name!r} words", source):
        patterns.append(re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE))
    if not patterns:
        raise ConfigError(f"{source}: category {name!r} has no patterns or words")
    message = spec.get("message", "")
    if not isinstance(message, str):
        raise ConfigError(f"{source}: category {name!r} message must be a string")
    return SafetyCategory(name, patterns, message)


def _strings(value: Any, what: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{source}: {what} must be a list of non-empty strings, got {value!r}")
    return value
