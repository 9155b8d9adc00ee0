"""ssh's command line: building it from Python settings (and re-exporting the reader).

Reading (``parse_ssh_argv``, ``find_ssh``) is in ``sshparse``, which follows OpenSSH's
``ssh.c``; it is re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CommandTooLongError

__all__ = [
    "SESSION_ENV",
    "SETTING_NAMES",
    "SSH_OPTSTRING",
    "OptionValue",
    "ParsedSSHArgv",
    "SSHLog",
    "SSHNotFound",
    "build_ssh_argv",
    "check_arg_sizes",
    "check_destination",
    "command_arg",
    "find_ssh",
    "parse_ssh_argv",
    "remote_command",
    "remote_signal_script",
    "settings_args_of",
    "ssh_settings_args",
]

# Reading ssh's own command line lives in ``sshparse`` (kept light for the command's start-up).
from .sshparse import (
    SSH_OPTSTRING,
    ParsedSSHArgv,
    SSHNotFound,
    find_ssh,
    parse_ssh_argv,
)

# -- building ssh's argv from Python settings ---------------------------------------------------

OptionValue = str | int | float | bool | os.PathLike[str]
"""What ``options={...}`` values may be: bools become ``yes``/``no``, the rest ``str()``."""

_OPTION_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

SESSION_ENV = "SSHWRAP_SESSION"
"""Remote environment variable that tags the processes of one sshwrap call.

sshwrap exports it (a random hex id) in front of every remote command, so a second ssh can
find the call's processes (``/proc``) and signal their process group: without a
remote terminal, nothing else stops a remote command when the local side gives up.
"""


def _opt_text(value: OptionValue) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if "\n" in text or "\0" in text or "\r" in text:
        raise ValueError(f"ssh option value contains a newline or NUL: {text!r}")
    return text


def check_destination(value: str, what: str = "destination") -> str:
    """Refuse a destination, user or jump host that ssh could take as an option.

    A value starting with ``-`` (``-oProxyCommand=...``) would reach ssh as an option in some
    position (a jump host, for one, is handed to a second ssh), so it raises
    :class:`ValueError` before anything runs.  For a jump list (``a,b``), ``user@host`` and
    ``ssh://`` URIs every part is checked.  Returns ``value``; every face builds its ssh argv
    through :func:`build_ssh_argv` and :func:`ssh_settings_args`, which call this.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if value[0] != "-" and "@" not in value and what != "jump host" and "://" not in value:
        return value  # (the only piece there is: what a fan-out checks for every host)
    parts = value.split(",") if what == "jump host" else [value]
    for part in parts:
        bare = part.removeprefix("ssh://")
        for piece in (part, bare, bare.rpartition("@")[2]):
            if piece.startswith("-"):
                raise ValueError(
                    f"{what} may not start with '-' (ssh would read an option): {value!r}"
                )
    return value


SETTING_NAMES = ("config", "user", "port", "identity", "jump", "options")
"""The keywords of :func:`ssh_settings_args`: the ssh settings every call takes."""


def settings_args_of(options: Mapping[str, Any]) -> list[str]:
    """:func:`ssh_settings_args` for the settings among a call's keywords (the others are
    not looked at)."""
    return ssh_settings_args(**{k: options.get(k) for k in SETTING_NAMES})


def ssh_settings_args(
    *,
    config: str | os.PathLike[str] | None = None,
    user: str | None = None,
    port: int | str | None = None,
    identity: str | os.PathLike[str] | None = None,
    jump: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
) -> list[str]:
    """ssh's own options for these settings: ``-F``, ``-l``, ``-p``, ``-i``, ``-J``, ``-o K=V``.

    Nothing here is parsed by sshwrap: ssh reads its config files as usual, and options given
    here come first on ssh's command line, so they win over the config (ssh takes the first
    value it obtains for each option).  Option names must be plain words (``ConnectTimeout``);
    a ``bool`` value becomes ``yes``/``no``.
    """
    out: list[str] = []
    if config is not None:
        out += ["-F", _opt_text(config)]
    if user is not None:
        out += ["-l", check_destination(_opt_text(user), "user")]
    if port is not None:
        out += ["-p", _opt_text(port)]
    if identity is not None:
        out += ["-i", _opt_text(identity)]
    if jump is not None:
        out += ["-J", check_destination(_opt_text(jump), "jump host")]
    for key, value in (options or {}).items():
        if not _OPTION_KEY.match(key):
            raise ValueError(f"not an ssh option name: {key!r}")
        out += ["-o", f"{key}={_opt_text(value)}"]
    return out


def command_arg(item: object) -> str:
    """One item of a command list as text: a ``str`` as it is, ``bytes`` and ``os.PathLike``
    as :mod:`subprocess` takes them (bytes decoded with ``surrogateescape``, so any bytes come
    out unchanged where the command is encoded again); anything else raises
    :class:`TypeError` naming what is accepted."""
    if isinstance(item, str):
        return item
    if isinstance(item, bytes | os.PathLike):
        return os.fsdecode(item)
    raise TypeError(
        f"expected str, bytes or os.PathLike object, not {type(item).__name__} "
        f"(in the command: {item!r})"
    )


def _cd_operand(cwd: str) -> str:
    """``cwd`` as ``cd`` takes it literally: a relative path gets ``./`` in front, so that
    ``-`` (and ``-x``) is a directory's name, not OLDPWD or an option, and ``CDPATH`` is not
    searched (``cd`` prints the directory it found there into stdout)."""
    if cwd and not cwd.startswith(("/", "./", "../")) and cwd not in (".", ".."):
        return "./" + cwd
    return cwd


def remote_command(
    cmd: str | bytes | Sequence[object],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
    session_id: str | None = None,
) -> str:
    """The command string ssh hands to the remote user's shell.

    - a ``str`` goes to the remote shell as it is (like ``shell=True``; ``bytes`` too,
      decoded with ``surrogateescape``);
    - a list is quoted item by item with :func:`shlex.quote`, so each item arrives byte
      identical as one argument (spaces, quotes, ``$``, newlines, empty strings, a leading
      ``-``...); items are ``str``, ``bytes`` or ``os.PathLike`` (:func:`command_arg`);
    - ``cwd``: ``cd -- DIR || exit`` first (a missing directory exits with cd's status and runs
      nothing); a relative DIR is ``./DIR``, so ``-`` is the directory named so;
    - ``env``: ``export NAME='value' ...`` first, so no ``AcceptEnv`` is needed on the server;
    - ``session_id``: exported as :data:`SESSION_ENV` (see there).

    The prefix lines end with a newline and the command follows as its own line, so a ``str``
    command keeps its meaning (``a; b``, comments, here-documents).  A POSIX shell (sh, bash,
    dash, zsh, ksh) is assumed on the remote side, as for any ``ssh host 'cmd'``.  Non-UTF-8
    bytes are kept as surrogates (``os.fsdecode``): ssh's argv and the mux exec request
    encode them back (``surrogateescape``).
    """
    if isinstance(cmd, str):
        body = cmd
    elif isinstance(cmd, bytes):
        body = os.fsdecode(cmd)
    else:
        items = [command_arg(c) for c in cmd]
        if not items:
            raise ValueError("empty command")
        body = " ".join(shlex.quote(c) for c in items)
    lines: list[str] = []
    if session_id is not None:
        if not re.fullmatch(r"[0-9a-f]+", session_id):
            raise ValueError("session_id must be hex")
        lines.append(f"export {SESSION_ENV}={session_id}")
    if cwd is not None:
        lines.append(f"cd -- {shlex.quote(_cd_operand(os.fsdecode(cwd)))} || exit")
    if env:
        parts = []
        for name, value in env.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"not an environment variable name: {name!r}")
            parts.append(f"{name}={shlex.quote(value)}")
        lines.append("export " + " ".join(parts))
    if not lines:
        return body
    return "\n".join([*lines, body])


def remote_signal_script(session_id: str, sig: int, *, escalate: bool = False) -> str:
    """A remote sh script that sends ``sig`` to every process tagged with ``session_id``.

    The tagged processes (Linux remotes: through ``/proc``; elsewhere it finds nothing and does
    nothing) are those whose environment holds ``SSHWRAP_SESSION=<id>`` (everything the
    command started or exec'd), plus the session's own shell, which sshd started as
    ``$SHELL -c "<command>"`` before that export ran: a session leader with ``-c`` as its
    first argument and the tag in its command line.  (A local ssh client on the same machine
    carries the tag in its command line too, but is no ``-c`` session leader.)  The script
    skips its own session, signals the process groups (sshd makes each session its own
    session and process group) and the processes themselves.  With ``escalate`` it leaves a
    watcher behind on the remote host (detached: the script, and so the local ssh, ends once
    the first signal is sent) that polls every 0.1 s until they are gone (a zombie counts as
    gone: nothing reaps it where PID 1 does not) and sends SIGKILL if they are not after ~2 s.
    """
    if not re.fullmatch(r"[0-9a-f]+", session_id):
        raise ValueError("session_id must be hex")
    name = signal.Signals(sig).name.removeprefix("SIG")
    # The tag is put together at run time, so this script's own command line does not hold it.
    script = f"""t={SESSION_ENV}; t="$t={session_id}"
me=$(sed 's/.*) //' /proc/$$/stat 2>/dev/null | cut -d' ' -f4)
ps=; gs=
for f in $(grep -l -F -e "$t" /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null); do
  p=${{f#/proc/}}; p=${{p%/*}}
  case " $ps " in *" $p "*) continue;; esac
  st=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null) || continue
  set -- $st
  [ -n "$4" ] && [ "$4" != "$me" ] || continue
  case $f in
    */cmdline)
      [ "$4" = "$p" ] || continue
      [ "$(tr '\\0' '\\n' < /proc/$p/cmdline | sed -n 2p)" = "-c" ] || continue;;
  esac
  ps="$ps $p"
  [ "$3" != 0 ] && gs="$gs $3"
done
[ -n "$ps" ] || exit 0
sig() {{ for g in $gs; do kill -s "$1" -- "-$g" 2>/dev/null; done; kill -s "$1" $ps 2>/dev/null; }}
sig {name}
"""
    if escalate:
        # The watcher runs on by itself on the remote host (stdio on /dev/null: sshd does not
        # wait for it), so the local ssh is done once the first signal is sent.
        script += """(
i=0
while [ $i -lt 20 ]; do
  alive=
  for p in $ps; do
    st=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null) || continue
    case $st in Z*) ;; *) alive=1;; esac
  done
  [ -n "$alive" ] || exit 0
  sleep 0.1 2>/dev/null || sleep 1
  i=$((i+1))
done
sig KILL
) </dev/null >/dev/null 2>&1 &
"""
    script += "exit 0\n"
    return script


def build_ssh_argv(
    ssh: str,
    host: str,
    remote: str | None,
    *,
    settings: Sequence[str] = (),
    tty: bool = False,
    log_path: str | None = None,
) -> list[str]:
    """The full ssh argv for one call.

    ``-T`` (pipes) or ``-tt -e none`` (tty: no escape character, so data cannot trigger
    ``~.``), then ``-E log -o LogLevel=DEBUG2`` when ``log_path`` is given (ssh's log goes to
    that file instead of stderr; sshwrap reads the remote exit status or signal from it and
    passes ssh's ordinary messages on), then ``settings``, then ``-- host command``.

    ``host`` goes through :func:`check_destination` and the result through
    :func:`check_arg_sizes` (both raise before anything runs).
    """
    check_destination(host)
    argv = [ssh]
    argv += ["-tt", "-e", "none"] if tty else ["-T"]
    if log_path is not None:
        argv += ["-E", log_path, "-o", "LogLevel=DEBUG2"]
    argv += settings
    argv += ["--", host]
    if remote is not None:
        argv.append(remote)
    check_arg_sizes(argv)
    return argv


MAX_ARG_STRLEN = 131072
"""Linux's limit on one argument or environment string, NUL included (32 pages)."""


@functools.cache
def _arg_max() -> int:
    try:
        value = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        return 0
    return value if value > 0 else 0


def check_arg_sizes(argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`~sshwrap.errors.CommandTooLongError` if ``argv`` cannot be exec'd.

    The limits are the kernel's: on Linux one argument may hold at most
    :data:`MAX_ARG_STRLEN` bytes including its NUL (the remote command is one argument of
    ssh's, so this is the remote command's limit), and argv plus the environment (``env``, or
    this process's) at most ``os.sysconf("SC_ARG_MAX")`` bytes, pointers included.  Without
    this, ``exec`` fails with a bare ``OSError(E2BIG)``.
    """
    limit = _arg_max()
    ptr = 8 if sys.maxsize > 2**32 else 4
    # A str encodes to at most 4 bytes a character: far below both limits, nothing to measure
    # (the common case; the fan-out calls this once per host).
    if (
        limit
        and all(len(a) * 4 < MAX_ARG_STRLEN for a in argv)
        and sum(len(a) * 4 + 1 + ptr for a in argv) * 2 < limit
    ):
        return
    if sys.platform.startswith("linux"):
        for arg in argv:
            size = len(os.fsencode(arg)) + 1
            if size > MAX_ARG_STRLEN:
                what = "the remote command" if arg is argv[-1] else "an ssh argument"
                raise CommandTooLongError(
                    f"{what} is {size} bytes; one argument may hold at most {MAX_ARG_STRLEN} "
                    "bytes (Linux MAX_ARG_STRLEN)",
                    limit=MAX_ARG_STRLEN,
                    size=size,
                )
    if not limit:
        return
    total = sum(len(os.fsencode(a)) + 1 + ptr for a in argv)
    if total * 2 < limit:  # far below: skip measuring the environment
        return
    environ = (
        os.environb if env is None else {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    )
    total += sum(len(k) + len(v) + 2 + ptr for k, v in environ.items()) + 2 * ptr
    if total > limit:
        raise CommandTooLongError(
            f"ssh's arguments and environment would be {total} bytes; the limit is {limit} "
            "bytes (SC_ARG_MAX)",
            limit=limit,
            size=total,
        )


class SSHLog:
    """A private file for ssh's ``-E`` log, read back after ssh exits.

    A ``mkstemp`` file (mode 0600, an unguessable name) that :meth:`close` removes; no
    directory is left behind even if the process dies between calls.  (ssh closes every
    inherited descriptor above 2 at start, so the log cannot be an anonymous file passed by
    descriptor.)
    """

    def __init__(self) -> None:
        self.fd, path = tempfile.mkstemp(prefix="sshwrap-", suffix=".log")
        self._tmp: str | None = path
        self.path: str = path
        self.pass_fds: tuple[int, ...] = ()

    def read(self) -> str:
        """Everything ssh has logged so far."""
        if self.fd < 0:
            return ""
        chunks = []
        offset = 0
        while True:
            data = os.pread(self.fd, 65536, offset)
            if not data:
                break
            chunks.append(data)
            offset += len(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Release the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None
