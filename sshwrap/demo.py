"""``make demo`` / ``python -m sshwrap.demo``: sshwrap against a throwaway local sshd.

With a terminal on stdin you get a real interactive session through the ``sshwrap`` command
(resize the window, type ``~?``; ``exit`` ends it).  Without one, a short scripted session
runs through a pseudo-terminal and prints what it did.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

from .terminal.modes import isatty
from .testing import LocalSSHD


def _say(text: str) -> None:
    print(f"\033[1m# {text}\033[0m" if isatty(1) else f"# {text}", flush=True)


def _interactive(sshd: LocalSSHD) -> int:
    argv = [sys.executable, "-m", "sshwrap", *sshd.ssh_args, sshd.host]
    _say(f"throwaway sshd on 127.0.0.1:{sshd.port}, logging in as {sshd.user}")
    _say("running: sshwrap -F <its config> " + sshd.host + "   (type 'exit' to leave)")
    rc = subprocess.call(argv)
    _say(f"sshwrap exited with status {rc}")
    return 0


class _Screen:
    """Just enough of a terminal to script a session: a pty and a transcript."""

    def __init__(self, argv: list[str]) -> None:
        from ptyprocess import PtyProcess

        self.proc = PtyProcess.spawn(argv, dimensions=(24, 80))
        self.out = bytearray()

    def expect(self, pattern: bytes, start: int = 0, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out[start:]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"demo: no {pattern!r} in {bytes(self.out)!r}")
            if self._read(left) is False:
                raise EOFError(f"demo: session ended early: {bytes(self.out)!r}")

    def _read(self, timeout: float) -> bool | None:
        """Read what the terminal has within ``timeout`` s: True if something came, None if
        nothing did, False at the end of the session."""
        r, _, _ = select.select([self.proc.fd], [], [], timeout)
        if not r:
            return None
        try:
            data = os.read(self.proc.fd, 65536)
        except OSError:
            data = b""
        self.out += data
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.proc.fd, text.encode())

    def finish(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._read(1) is False:
                break
        status: int = self.proc.wait()
        self.proc.close()
        return status


def _scripted(sshd: LocalSSHD) -> int:
    base = [sys.executable, "-m", "sshwrap", *sshd.ssh_args]
    _say(
        f"throwaway sshd on 127.0.0.1:{sshd.port} (hosts {', '.join(sshd.hosts)}), user {sshd.user}"
    )
    _say("stdin is not a terminal: sshwrap behaves exactly like ssh (it execs it)")
    cmd = [*base, sshd.host, "echo hello from $(uname -n); echo to-stderr >&2; exit 7"]
    print("$ sshwrap -F <config> host1 'echo hello from $(uname -n); echo to-stderr >&2; exit 7'")
    done = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    print(
        f"stdout: {done.stdout.decode().strip()!r}  stderr: {done.stderr.decode().strip()!r}  "
        f"status: {done.returncode}"
    )
    _say("an interactive session, scripted through a 24x80 pseudo-terminal:")
    screen = _Screen([*base, sshd.host])
    screen.expect(rb"\$ ")
    for line in ("stty size", "echo interactive on $(tty)", "exit 3"):
        mark = len(screen.out)
        screen.send(line + "\r")
        if line != "exit 3":
            screen.expect(rb"\n\$ $", start=mark)
    status = screen.finish()
    for line in screen.out.decode(errors="replace").replace("\r\n", "\n").splitlines():
        print("  | " + line)
    _say(f"session ended with status {status} (the remote 'exit 3')")
    ok = status == 3 and done.returncode == 7
    return 0 if _python_api(sshd) and ok else 1


def _python_api(sshd: LocalSSHD) -> bool:
    """The same server through the Python API: run, a Connection, and a fan-out."""
    import sshwrap

    _say("the Python API:")
    r = sshwrap.run(
        sshd.host,
        ["printf", "%s|", "a b", "$HOME"],
        capture_output=True,
        text=True,
        config=sshd.config,
    )
    print(f">>> sshwrap.run(host, ['printf', '%s|', 'a b', '$HOME']).stdout  ->  {r.stdout!r}")
    with sshwrap.connect(sshd.host, config=sshd.config) as c:
        killed = c.run("kill -9 $$").returncode
        print(f">>> c.run('kill -9 $$').returncode  ->  {killed}   (over one ControlMaster)")
    results = sshwrap.run_many(sshd.hosts, "echo $SSH_CONNECTION", config=sshd.config)
    for res in results:
        print(
            f">>> run_many: {res.host}: {res.status}, server address "
            f"{res.stdout.decode().split()[2]}"
        )
    return r.stdout == "a b|$HOME|" and killed == -9 and all(x.ok for x in results)


def main() -> int:
    """Start a throwaway sshd and show sshwrap at work against it."""
    with LocalSSHD(hosts=2) as sshd:
        if isatty(0) and isatty(1):
            return _interactive(sshd)
        return _scripted(sshd)


if __name__ == "__main__":
    sys.exit(main())
