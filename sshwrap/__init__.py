"""sshwrap: drive the system's OpenSSH client from Python.

Public names are imported lazily, so the ``sshwrap`` command starts as fast as ssh does.
"""

from __future__ import annotations

import importlib

# Not ``from typing import TYPE_CHECKING``: importing typing costs the command ~8 ms at start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "LocalSSHD": "testing",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .testing import LocalSSHD as LocalSSHD


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sshwrap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
