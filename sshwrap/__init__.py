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
    "run": "process",
    "Popen": "process",
    "call": "process",
    "check_call": "process",
    "check_output": "process",
    "getoutput": "process",
    "getstatusoutput": "process",
    "CompletedProcess": "process",
    "SSHWrapError": "errors",
    "SSHError": "errors",
    "SSHConnectionError": "errors",
    "GatewayError": "errors",
    "AuthenticationError": "errors",
    "HostKeyError": "errors",
    "SSHConfigError": "errors",
    "CommandTooLongError": "errors",
    "CommandLostError": "errors",
    "SudoError": "errors",
    "SkippedError": "errors",
    "CalledProcessError": "errors",
    "TimeoutExpired": "errors",
    "run_many": "fanout",
    "HostResult": "fanout",
    "FanoutInterrupted": "fanout",
    "FdBudgetError": "fanout",
    "close_persisted": "fanout",
    "PersistDirError": "fanout",
    "hosts": "core.hostset",
    "HostSet": "core.hostset",
    "HostPatternError": "core.hostset",
    "Groups": "core.hostset",
    "parse_groups": "core.hostset",
    "put_many": "fleet",
    "get_many": "fleet",
    "CopyResult": "fleet",
    "CopyInterrupted": "fleet",
    "connect": "connection",
    "shell": "connection",
    "Shell": "core.shell",
    "ShellError": "core.shell",
    "attach": "connection",
    "Connection": "connection",
    "Detached": "connection",
    "Forward": "connection",
    "ForwardError": "connection",
    "PromptServer": "io.prompts",
    "Spawned": "spawn",
    "ExpectError": "spawn",
    "ExpectTimeout": "spawn",
    "ExpectEOF": "spawn",
    "TransferError": "transfer",
    "RemoteFileNotFoundError": "transfer",
    "RemotePermissionError": "transfer",
}

# submodules reachable as attributes without an explicit import (``sshwrap.aio.run``)
_SUBMODULES = ("aio",)

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .connection import Connection as Connection
    from .connection import Detached as Detached
    from .connection import Forward as Forward
    from .connection import ForwardError as ForwardError
    from .connection import attach as attach
    from .connection import connect as connect
    from .connection import shell as shell
    from .core.hostset import Groups as Groups
    from .core.hostset import HostPatternError as HostPatternError
    from .core.hostset import HostSet as HostSet
    from .core.hostset import hosts as hosts
    from .core.hostset import parse_groups as parse_groups
    from .core.shell import Shell as Shell
    from .core.shell import ShellError as ShellError
    from .errors import AuthenticationError as AuthenticationError
    from .errors import CalledProcessError as CalledProcessError
    from .errors import CommandLostError as CommandLostError
    from .errors import CommandTooLongError as CommandTooLongError
    from .errors import GatewayError as GatewayError
    from .errors import HostKeyError as HostKeyError
    from .errors import SkippedError as SkippedError
    from .errors import SSHConfigError as SSHConfigError
    from .errors import SSHConnectionError as SSHConnectionError
    from .errors import SSHError as SSHError
    from .errors import SSHWrapError as SSHWrapError
    from .errors import SudoError as SudoError
    from .errors import TimeoutExpired as TimeoutExpired
    from .fanout import FanoutInterrupted as FanoutInterrupted
    from .fanout import FdBudgetError as FdBudgetError
    from .fanout import HostResult as HostResult
    from .fanout import PersistDirError as PersistDirError
    from .fanout import close_persisted as close_persisted
    from .fanout import run_many as run_many
    from .fleet import CopyInterrupted as CopyInterrupted
    from .fleet import CopyResult as CopyResult
    from .fleet import get_many as get_many
    from .fleet import put_many as put_many
    from .io.prompts import PromptServer as PromptServer
    from .process import CompletedProcess as CompletedProcess
    from .process import Popen as Popen
    from .process import call as call
    from .process import check_call as check_call
    from .process import check_output as check_output
    from .process import getoutput as getoutput
    from .process import getstatusoutput as getstatusoutput
    from .process import run as run
    from .spawn import ExpectEOF as ExpectEOF
    from .spawn import ExpectError as ExpectError
    from .spawn import ExpectTimeout as ExpectTimeout
    from .spawn import Spawned as Spawned
    from .testing import LocalSSHD as LocalSSHD
    from .transfer import RemoteFileNotFoundError as RemoteFileNotFoundError
    from .transfer import RemotePermissionError as RemotePermissionError
    from .transfer import TransferError as TransferError


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sshwrap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
