"""Per-host values of a fan-out and a fleet copy: the ``%h`` token and per-host commands (pure).

**The token.**  ``%h`` in a command (``run_many``, ``sshwrap-many``) or in a copy path
(``put_many``/``get_many``) is the host's name: its destination as given (the alias, the
name in the host list; a ``Connection``'s destination).  ``%%h`` is a literal ``%h``.  Every
other ``%`` is left as it is, so ``date +%s``, ``printf '%s\\n'``, ``date +%H:%M`` and
``printf '%%'`` run unchanged: only ``%h`` and ``%%h`` are special (``%%%h`` is a ``%``, then
the escape: ``%%h``).  One expander, :func:`expand_host`, serves commands and paths.

**Quoting.**  The name is put into a command so that it can never inject shell: in a list
command each item is expanded first and then quoted item by item (``shlex.quote``) as any
list command is; in a ``str`` command (a shell script as it is) the name goes in quoted for the
shell by ``shlex.quote``, which leaves a plain name (letters, digits, ``@%+=:,./-_``) as it is
and single-quotes any other (``a;b`` becomes ``'a;b'``): write ``echo %h``, not ``echo '%h'``
(inside quotes, a quoted name keeps its quotes).

**Per-host commands.**  ``command`` may be a mapping of host name to that host's command
(``{"web1": "systemctl restart nginx", "db1": ["pg_ctl", "reload"]}``): every host of the run
must have one (:func:`per_host_commands` names the missing ones), every key must be a host of
the run (a key that names none is a typo, refused), keys are ``str`` and values commands;
``%h`` still works in each.  All checked before any ssh runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Mapping, Sequence
from typing import Any

__all__ = [
    "HostCommand",
    "PerHostCommands",
    "check_command",
    "command_for",
    "command_uses_host",
    "expand_host",
    "has_host_token",
    "per_host_commands",
]

HostCommand = str | Sequence[str]
"""One host's command: a ``str`` for the remote shell as it is, or a list of arguments."""
PerHostCommands = Mapping[str, HostCommand]
"""``command=`` as a mapping: host name -> that host's command."""

_TOKEN = re.compile(r"%(%?)h")


def expand_host(text: str, host: str) -> str:
    """``text`` with ``%h`` replaced by ``host`` and ``%%h`` by ``%h``; any other ``%`` kept."""
    if "%h" not in text:
        return text
    return _TOKEN.sub(lambda m: "%h" if m.group(1) else host, text)


def has_host_token(text: str) -> bool:
    """True when ``text`` holds ``%h`` (an escaped ``%%h`` does not count)."""
    return "%h" in text and any(not m.group(1) for m in _TOKEN.finditer(text))


def command_uses_host(command: HostCommand) -> bool:
    """True when the command (a ``str``, or any item of a list) holds ``%h``."""
    if isinstance(command, str):
        return has_host_token(command)
    return any(isinstance(a, str) and has_host_token(a) for a in command)


def command_for(command: HostCommand, host: str) -> HostCommand:
    """``command`` for ``host``: a list's items expanded (quoted later, item by item), a
    ``str``'s ``%h`` replaced by the name quoted for the shell (``shlex.quote``)."""
    if isinstance(command, str):
        return expand_host(command, shlex.quote(host)) if "%h" in command else command
    return [expand_host(a, host) if "%h" in a else a for a in command]


def check_command(command: object, what: str = "command") -> HostCommand:
    """``command`` if it is one (a ``str``, or a list/tuple of ``str``), else ``TypeError``."""
    if isinstance(command, str):
        return command
    if isinstance(command, bytes | bytearray) or not isinstance(command, Sequence):
        raise TypeError(f"{what} must be a str or a list of str, not {type(command).__name__}")
    for i, a in enumerate(command):
        if not isinstance(a, str):
            raise TypeError(f"{what}[{i}] must be a str, not {type(a).__name__}")
    return command


def per_host_commands(
    commands: Mapping[Any, object], hosts: Collection[str], *, exact: bool = True
) -> dict[str, HostCommand]:
    """The mapping ``commands`` checked against the run's ``hosts`` (module docstring).

    ``TypeError``: a key that is no ``str``, a value that is no command; ``ValueError``:
    hosts without a command, or (``exact``) keys that name no host of the run."""
    out: dict[str, HostCommand] = {}
    for key, value in commands.items():
        if not isinstance(key, str):
            raise TypeError(f"command: a key must be a host name (str), not {key!r}")
        out[key] = check_command(value, f"command[{key!r}]")
    missing = [h for h in dict.fromkeys(hosts) if h not in out]
    if missing:
        raise ValueError(f"command: no command for host(s) {', '.join(map(repr, missing))}")
    if exact:
        names = set(hosts)
        extra = [k for k in out if k not in names]
        if extra:
            raise ValueError(
                f"command: key(s) {', '.join(map(repr, extra))} name no host of the run"
            )
    return out
