"""Answering ssh's prompts from Python: password, key passphrase, keyboard-interactive, host key.

Design: ssh is started with ``SSH_ASKPASS_REQUIRE=force`` and ``SSH_ASKPASS`` pointing at a tiny
helper script in a private directory (mode 0700, created by us).  For every prompt ssh runs the
helper with the prompt text as its argument; the helper connects to a unix socket in the same
directory, sends the prompt text (and ssh's ``SSH_ASKPASS_PROMPT`` hint) and prints whatever
sshwrap answers on its stdout, which ssh reads through a pipe.  So:

- no secret ever appears in an argv, in any environment (only the socket *path* is passed, in
  ``SSHWRAP_ASKPASS_SOCKET``; it is not a secret), in a log or in an exception message;
- the socket lives in a 0700 directory and the server also checks the peer's uid
  (``SO_PEERCRED``), so no other user can ask it anything;
- prompts are told apart by ssh's own (local) prompt strings, never by screen scraping: banners
  and MOTD go to ssh's stderr, not to the askpass helper (they can look like prompts).  Keyboard-
  interactive prompts come from the server, but OpenSSH prefixes them with ``(user@host)``, so a
  server cannot pass one off as ssh's own password or host-key prompt.

We chose askpass over a pty on the master: a pty would need prompt scraping, would tie the
master's lifetime to a pty (a master started in a pty dies with it) and could not tell a
server's text from ssh's.

Every static answer (``password=`` / ``passphrase=``) is given once per prompt text: when ssh asks
the same question again the previous answer was wrong, so the helper refuses (exit status 1) and
the failure is recorded; ssh then gives up promptly instead of retrying.  ``ssh_options()`` also
sets ``NumberOfPasswordPrompts=1``.

Host keys: ssh asks only when the user's configuration allows asking (``StrictHostKeyChecking
ask``, the default).  sshwrap answers ``no`` unless ``on_prompt(text, "hostkey")`` returns True (or
the literal ``"yes"`` / a fingerprint).  A key the configuration rejects outright (``yes``, or a
changed key) is never asked about and stays rejected.

Usage (this is what ``Connection`` does when starting its master)::

    with PromptServer(password=pw) as ps:
        proc = subprocess.run(["ssh", *ps.ssh_options(), "-M", "-N", "-f", ..., host],
                              env=ps.env(), stdin=subprocess.DEVNULL, ...)
        ps.raise_for_failure(proc.returncode, ssh_log_text, host)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import AuthenticationError, HostKeyError, classify_ssh_failure
from .threads import signals_unblocked, start_daemon

__all__ = ["OnPrompt", "Prompt", "PromptKind", "PromptServer", "classify_prompt"]

PromptKind = Literal[
    "password", "passphrase", "keyboard-interactive", "hostkey", "confirm", "notify", "unknown"
]
#: ``on_prompt(prompt_text, kind)``: a str answers, True/False say yes/no, None declines.
OnPrompt = Callable[[str, str], str | bool | None]

SOCKET_ENV = "SSHWRAP_ASKPASS_SOCKET"
_MAX_REQUEST = 1 << 16

_HELPER = r"""
import json, os, socket, sys
def main():
    prompt = sys.argv[1] if len(sys.argv) > 1 else ""
    hint = os.environ.get("SSH_ASKPASS_PROMPT", "")
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3600)
        s.connect(os.environ["SSHWRAP_ASKPASS_SOCKET"])
        s.sendall(json.dumps({"prompt": prompt, "hint": hint}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    except Exception:
        return 1
    if not reply.get("ok"):
        return 1
    answer = reply.get("answer")
    if answer is not None:
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    return 0
sys.exit(main())
"""

_HOSTKEY = re.compile(
    r"continue connecting \(yes/no(/\[fingerprint\])?\)\?\s*$"
    r"|^Please type 'yes', 'no' or the fingerprint:\s*$"
)
_PASSPHRASE = re.compile(r"^Enter (passphrase|PIN) for ")
_KBDINT = re.compile(r"^\([^()\s]+\) ")
_PASSWORD = re.compile(r"^\S+'s password:\s*$")


def classify_prompt(prompt: str, hint: str = "") -> PromptKind:
    """Which kind of question ssh asks, from its prompt text and ``SSH_ASKPASS_PROMPT`` hint."""
    if hint == "confirm":
        return "confirm"
    if hint == "none":
        return "notify"
    if _KBDINT.match(prompt):
        return "keyboard-interactive"
    if _HOSTKEY.search(prompt):
        return "hostkey"
    if _PASSPHRASE.match(prompt):
        return "passphrase"
    if _PASSWORD.match(prompt):
        return "password"
    return "unknown"


@dataclass(frozen=True)
class Prompt:
    """A question ssh asked (never the answer)."""

    text: str
    kind: PromptKind
    answered: bool  # False: refused (ssh was told no / got no answer)


class PromptServer:
    """Answers ssh's askpass prompts from Python while it is open; a context manager.

    - ``password``: answers ssh's password prompt, and keyboard-interactive prompts that ask
      for a password, once each.
    - ``passphrase``: answers "Enter passphrase for key ..." once per key.
    - ``on_prompt(text, kind)``: asked for everything else (and first, for keyboard-interactive
      prompts such as OTPs); it runs in the server's thread.  Return a str to answer, True/False
      for yes/no questions (``hostkey``, ``confirm``), None to decline.  If it raises, the prompt
      is declined and the exception is kept in ``callback_error``.

    ``env()`` gives the environment for ssh; ``ssh_options()`` extra ``-o`` arguments;
    ``prompts`` what was asked; ``raise_for_failure()`` turns ssh's failure into a typed error.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        passphrase: str | None = None,
        on_prompt: OnPrompt | None = None,
    ) -> None:
        self._password = password
        self._passphrase = passphrase
        self._on_prompt = on_prompt
        self._lock = threading.Lock()
        self._asked: dict[tuple[str, str], int] = {}
        self._prompts: list[Prompt] = []
        self.callback_error: BaseException | None = None
        self.dir: Path | None = None
        self.socket_path = ""
        self.helper_path = ""
        self._listener: socket.socket | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> PromptServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the private directory, the helper and the socket; start serving."""
        if self._thread is not None:
            return
        d = Path(tempfile.mkdtemp(prefix="sshwrap-ask-"))  # mkdtemp makes it 0700
        os.chmod(d, 0o700)
        self.dir = d
        try:
            self.socket_path = str(d / "s")
            helper_py = d / "askpass.py"
            helper_py.write_text(_HELPER)
            self.helper_path = str(d / "askpass")
            fd = os.open(self.helper_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as f:
                f.write(
                    "#!/bin/sh\nexec "
                    + shlex.join([sys.executable, "-I", "-S", str(helper_py)])
                    + ' "$@"\n'
                )
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.socket_path)
            listener.listen(16)
            listener.setblocking(False)
            self._listener = listener
            self._wake_r, self._wake_w = os.pipe()
            self._thread = start_daemon(self._serve, "sshwrap-askpass")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop serving and remove the private directory."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- what ssh needs ----------------------------------------------------------------
    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to start ssh with: ``base`` (default ``os.environ``) plus askpass.

        Holds only paths, never a secret.
        """
        if self._thread is None:
            raise RuntimeError("PromptServer is not started")
        env = dict(os.environ if base is None else base)
        env["SSH_ASKPASS"] = self.helper_path
        env["SSH_ASKPASS_REQUIRE"] = "force"
        env[SOCKET_ENV] = self.socket_path
        return env

    def ssh_options(self) -> list[str]:
        """``-o`` options that make ssh ask (not fail in batch mode) and ask only once."""
        return ["-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1"]

    @property
    def prompts(self) -> list[Prompt]:
        """Every question ssh asked so far, in order (texts and kinds, never answers)."""
        with self._lock:
            return list(self._prompts)

    def refused(self, kind: str | None = None) -> bool:
        """True if a prompt (of ``kind``) was refused or left unanswered."""
        return any(not p.answered and (kind is None or p.kind == kind) for p in self.prompts)

    def raise_for_failure(
        self, returncode: int, ssh_log: str, host: str = "", *, stderr: str = ""
    ) -> None:
        """Raise ``AuthenticationError`` / ``HostKeyError`` if ssh failed at a prompt.

        ``ssh_log`` is ssh's stderr (or its ``-E`` log, with ``stderr`` what ssh wrote on its
        stderr beside it).  Does nothing when ssh succeeded or failed for another reason (the
        caller classifies that, e.g. with ``classify_ssh_failure``).  Messages never hold an
        answer, only the kinds of prompt.
        """
        if returncode == 0:
            return
        err = classify_ssh_failure(host, ssh_log, returncode, stderr=stderr)
        if isinstance(err, HostKeyError) or self.refused("hostkey"):
            message = err.message
            if self.refused("hostkey"):
                message = "unknown host key refused (on_prompt did not accept it): " + message
            raise HostKeyError(host, message, err.stderr, returncode)
        if isinstance(err, AuthenticationError):
            message = err.message
            asked = sorted({p.kind for p in self.prompts if p.kind != "hostkey"})
            if asked:
                message += " [prompts: " + ", ".join(asked)
                rejected = sorted({p.kind for p in self.prompts if not p.answered})
                if rejected:
                    message += "; asked again or declined: " + ", ".join(rejected)
                message += "]"
            raise AuthenticationError(host, message, err.stderr, returncode)

    # -- serving -----------------------------------------------------------------------
    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    with conn, contextlib.suppress(OSError, ValueError):
                        self._handle(conn)
        finally:
            sel.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (os.getuid(), 0):
            return
        conn.settimeout(10)
        with conn.makefile("rb") as f:
            data = f.readline(_MAX_REQUEST)
        if not data.endswith(b"\n"):
            return  # the helper went away, or sent more than a request can hold
        req = json.loads(data)
        prompt = str(req.get("prompt", ""))
        hint = str(req.get("hint", ""))
        answer = self._answer(prompt, hint)
        reply: dict[str, object] = (
            {"ok": False} if answer is None else {"ok": True, "answer": answer}
        )
        conn.settimeout(3600)
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def _ask_callback(self, prompt: str, kind: str) -> str | bool | None:
        if self._on_prompt is None:
            return None
        try:
            with signals_unblocked():  # the user's code, in our signal-blocking thread
                return self._on_prompt(prompt, kind)
        except BaseException as e:  # kept for the caller; the prompt is declined
            self.callback_error = e
            return None

    def _answer(self, prompt: str, hint: str) -> str | None:
        """The line to give ssh, "" for a plain yes (confirm/notify), None to refuse."""
        kind = classify_prompt(prompt, hint)
        with self._lock:
            times = self._asked.get((kind, prompt), 0)
            self._asked[(kind, prompt)] = times + 1
        answer: str | None = None
        if kind == "notify":
            answer = ""  # nothing to answer; ssh only shows a message
        elif kind in ("hostkey", "confirm"):
            if not (kind == "hostkey" and times > 0):  # asked again: our answer was not valid
                got = self._ask_callback(prompt, kind)
                if got is True or got == "yes":
                    answer = "yes" if kind == "hostkey" else ""
                elif isinstance(got, str) and kind == "hostkey" and got.startswith("SHA256:"):
                    answer = got
        elif kind == "password" and self._password is not None:
            answer = self._password if times == 0 else None
        elif kind == "passphrase" and self._passphrase is not None:
            answer = self._passphrase if times == 0 else None
        else:
            got = self._ask_callback(prompt, kind)
            if isinstance(got, str):
                answer = got
            elif (
                got is None
                and kind == "keyboard-interactive"
                and self._password is not None
                and times == 0
                and "password" in prompt[prompt.index(")") + 1 :].lower()
            ):
                answer = self._password
        with self._lock:
            self._prompts.append(Prompt(prompt, kind, answer is not None))
        return answer
