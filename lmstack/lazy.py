"""Lazily imported package attributes (PEP 562), so `import lmstack...` and the CLI stay cheap.

A package lists name -> module and sets `__getattr__, __all__ = lazy_exports(__name__, {...})`;
the module is imported the first time one of its names is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
