"""``sudo=True``: a command run through ``sudo -S`` with a password that only stdin ever sees.

Written once for every path (``sshwrap.run`` and ``sshwrap.aio.run`` through
:func:`~sshwrap.core.ssh_run.run_ssh`, a Connection's channel through
:class:`~sshwrap.core.channel_streams.RunStreams`); nothing here touches a descriptor:

- :func:`sudo_settings` reads a call's ``sudo``/``sudo_password``/``sudo_user`` keywords
  (bad ones are a :class:`ValueError` / :class:`TypeError` before anything starts);
- :class:`Password` holds the password (``str``, ``bytes``, or a callable returning one,
  called once, when first needed) and never shows it (``repr`` says ``<hidden>``);
- :class:`SudoRun` is one command under sudo: :meth:`SudoRun.command` wraps the remote
  command line as ``sudo -S -p PROMPT [-u USER] -- sh -c 'printf %s STARTED >&2<newline>CMD'``
  (``CMD`` quoted once, as :func:`~sshwrap.core.argv.remote_command` made it), with ``PROMPT``
  and ``STARTED`` random per call; :meth:`SudoRun.feed` is a small state machine fed the
  command's stderr bytes.  Until ``STARTED`` shows, the stderr is sudo's: ``PROMPT`` is cut
  out and answered with the password on stdin (sudo reads it byte by byte up to the newline,
  so nothing after it is taken), a second ``PROMPT`` or sudo's "Sorry, try again" /
  "incorrect password attempt" fails the call with :class:`~sshwrap.errors.SudoError` at once
  (no second try: a wrong password is not retried into a locked account).  Once
  ``STARTED`` shows (cut out too), the caller's ``input=`` goes to stdin, then its end, and
  the stderr passes through untouched: the command's output can print anything, a
  ``[sudo] password for`` line too.  A sudo that asks nothing (cached, ``NOPASSWD``) never
  gets the password: ``STARTED`` comes first.  A command that ended before ``STARTED``
  never ran: :meth:`SudoRun.outcome` makes that a ``SudoError`` with sudo's words.

The password travels only on the command's stdin: never in an argv (local or remote), the
environment, ssh's ``-E`` log (which never sees channel data), a result or an exception.
Limits: sudoers' ``passprompt_override`` replaces the prompt, so sudo waits for a password
that sshwrap never sends (the call's ``timeout`` ends it); a remote stop (timeout) reaches the
command through sudo, which relays the signals it gets.
"""

from __future__ import annotations

import secrets
import shlex
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import SudoError

__all__ = ["MAX_SAID", "Password", "PasswordSpec", "SudoRun", "SudoSettings", "sudo_settings"]

PasswordSpec = str | bytes | Callable[[], str | bytes] | None
"""What ``sudo_password=`` takes: the password, or a callable that returns it (asked once)."""

MAX_SAID = 8192
"""Most bytes of sudo's own stderr kept for a :class:`~sshwrap.errors.SudoError`."""

_REFUSED = (b"Sorry, try again", b"incorrect password attempt")


def _checked(value: object) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError("sudo_password must be a str, bytes, or a callable returning one")
    data = bytes(value)
    if any(c in data for c in b"\n\r\0"):
        raise ValueError("a sudo password cannot hold a newline, a carriage return or a NUL")
    return data


class Password:
    """A sudo password: given, or asked of a callable once, when first needed (thread-safe;
    one :class:`Password` shared by several calls is asked once for all)."""

    __slots__ = ("_asked", "_lock", "_spec", "_value")

    def __init__(self, spec: PasswordSpec) -> None:
        if spec is not None and not callable(spec):
            spec = _checked(spec)
        self._spec: Any = spec
        self._value: bytes | None = spec if isinstance(spec, bytes) else None
        self._asked = not callable(spec)
        self._lock = threading.Lock()

    @property
    def given(self) -> bool:
        """Whether there is a password (or a callable to ask)."""
        return self._spec is not None

    def get(self) -> bytes | None:
        """The password as bytes (None: none given); a callable is called the first time."""
        with self._lock:
            if not self._asked:
                self._value = _checked(self._spec())
                self._asked = True
            return self._value

    def __call__(self) -> bytes:
        """The password, for a callable's place: a :class:`Password` given as
        ``sudo_password`` to several calls (or attempts) is asked once for all of them."""
        value = self.get()
        if value is None:
            raise ValueError("no sudo password was given")
        return value

    def __repr__(self) -> str:
        return "Password(<hidden>)"


class SudoSettings:
    """A call's sudo keywords, checked: the :class:`Password` and ``sudo -u``'s user."""

    __slots__ = ("password", "user")

    def __init__(self, password: Password, user: str | None) -> None:
        self.password = password
        self.user = user

    def __repr__(self) -> str:
        return f"SudoSettings(user={self.user!r}, password=<hidden>)"


def sudo_settings(options: Mapping[str, Any]) -> SudoSettings | None:
    """The :class:`SudoSettings` of a call's keywords (None without ``sudo=True``).

    ``sudo_password`` / ``sudo_user`` without ``sudo=True``, ``tty=True`` with it, or a
    ``sudo_user`` that is not a plain user name (or ``#uid``) is a :class:`ValueError`."""
    spec = options.get("sudo_password")
    user = options.get("sudo_user")
    if not options.get("sudo", False):
        if spec is not None or user is not None:
            raise ValueError("sudo_password= and sudo_user= need sudo=True")
        return None
    if options.get("tty", False):
        raise ValueError(
            "sudo=True cannot take tty=True: sudo -S reads the password from the command's "
            "stdin, which a terminal would echo"
        )
    if user is not None:
        if not isinstance(user, str):
            raise TypeError("sudo_user must be a str")
        if not user or user.startswith("-") or any(c.isspace() or ord(c) < 32 for c in user):
            raise ValueError(f"not a user name for sudo -u: {user!r}")
    password = spec if isinstance(spec, Password) else Password(spec)
    return SudoSettings(password, user)


def _prefix_tail(buf: bytes | bytearray, *marks: bytes) -> int:
    """How many bytes at the end of ``buf`` could begin one of ``marks`` (kept back)."""
    longest = 0
    for mark in marks:
        for n in range(min(len(mark) - 1, len(buf)), longest, -1):
            if buf.endswith(mark[:n]):
                longest = n
                break
    return longest


class SudoRun:
    """One command under sudo: its command line and the state machine of its stderr.

    Feed every stderr chunk to :meth:`feed` in order; it returns ``(output, consumed,
    send, end)``: the bytes to pass on as the command's stderr, how many of the fed bytes
    are done with besides ``output`` (cut out; for a channel's window), bytes to write to
    the command's stdin now, and whether its stdin ends after them.  :attr:`failed` is then
    the :class:`~sshwrap.errors.SudoError` to raise (stop the command at once); at the end
    of the stream :meth:`end` gives what was held back and :meth:`outcome` the error for a
    command that never started.
    """

    def __init__(self, host: str, settings: SudoSettings, input: bytes | None) -> None:
        self.host = host
        self.settings = settings
        self.prompt = f"sshwrap-sudo-prompt-{secrets.token_hex(12)}:".encode()
        self.started_mark = f"sshwrap-sudo-started-{secrets.token_hex(12)}:".encode()
        self.started = False
        self.failed: SudoError | None = None
        self.prompts = 0
        self._input = input or b""
        self._held = bytearray()
        self._said = bytearray()  # sudo's own stderr (bounded), for the error

    def __repr__(self) -> str:
        state = "failed" if self.failed else "started" if self.started else "authenticating"
        return f"SudoRun(host={self.host!r}, user={self.settings.user!r}, {state})"

    def command(self, remote: str) -> str:
        """``remote`` (a command line for a POSIX shell) run through ``sudo -S``."""
        script = f"printf %s {self.started_mark.decode()} >&2\n{remote}"
        argv = ["sudo", "-S", "-p", self.prompt.decode()]
        if self.settings.user is not None:
            argv += ["-u", self.settings.user]
        argv += ["--", "sh", "-c", script]
        return " ".join(shlex.quote(a) for a in argv)

    def feed(self, data: bytes) -> tuple[bytes, int, bytes, bool]:
        """Take the next stderr bytes (see the class docstring for the result)."""
        if self.started or self.failed is not None:
            return data, 0, b"", False
        held_before = len(self._held)
        buf = self._held + data
        out = bytearray()
        send = bytearray()
        end = False
        while True:
            p = buf.find(self.prompt)
            s = buf.find(self.started_mark)
            if s >= 0 and (p < 0 or s < p):
                self._say(out, buf[:s])
                if self.failed is not None:
                    break
                rest = buf[s + len(self.started_mark) :]
                self.started = True
                send += self._input
                end = True
                out += rest
                buf = bytearray()
                break
            if p < 0:
                keep = _prefix_tail(buf, self.prompt, self.started_mark)
                self._say(out, buf[: len(buf) - keep])
                buf = buf[len(buf) - keep :]
                break
            self._say(out, buf[:p])
            buf = buf[p + len(self.prompt) :]
            if self.failed is not None:
                break
            self.prompts += 1
            if self.prompts > 1:
                self._fail("sudo refused the password (it asked for it again)")
                break
            password = self.settings.password.get()
            if password is None:
                self._fail("sudo asked for a password and none was given (sudo_password=)")
                break
            send += password + b"\n"
        if self.failed is not None:
            out += buf
            buf = bytearray()
            send.clear()
        self._held = buf
        consumed = len(data) + held_before - len(self._held) - len(out)
        return bytes(out), consumed, bytes(send), end

    def _say(self, out: bytearray, text: bytes | bytearray) -> None:
        """sudo's own words: passed on, kept for the error, read for a refused password."""
        out += text
        if len(self._said) < MAX_SAID:
            self._said += text[: MAX_SAID - len(self._said)]
        if self.prompts and self.failed is None and any(r in self._said for r in _REFUSED):
            self._fail("sudo refused the password")

    def _fail(self, message: str) -> None:
        self.failed = SudoError(self.host, message, stderr=self._words())

    def _words(self) -> str:
        said = bytes(self._said)
        password = self.settings.password.get() if self.prompts else None
        if password:
            said = said.replace(password, b"<hidden>")
        return said.decode("utf-8", "replace")

    def end(self) -> bytes:
        """The stream ended: what was held back (a partial prompt that never completed)."""
        tail = bytes(self._held)
        self._held.clear()
        if not self.started and tail:
            self._said += tail[: max(0, MAX_SAID - len(self._said))]
        return tail

    def outcome(self, returncode: int | None) -> SudoError | None:
        """The error of a command that ended (``returncode``: what the session reported):
        :attr:`failed`, or one saying sudo ended before the command started; None if it
        started."""
        if self.failed is not None:
            return self.failed
        if self.started:
            return None
        words = self._words().strip()
        last = words.splitlines()[-1] if words else ""
        status = "" if returncode is None else f" (exit status {returncode})"
        message = f"sudo did not run the command{status}" + (f": {last}" if last else "")
        return SudoError(self.host, message, stderr=words, returncode=returncode)
