"""Fault injection for the test suite: hung and cut hosts, full disks, child programs, leaks.

Everything here uses real parts and removes what it made, also when the test fails:

- :func:`freeze` / :func:`thaw`: SIGSTOP / SIGCONT a :class:`LocalSSHD`'s listeners *and* its
  session processes: a host that stops answering in the middle of a session (the TCP peer stays
  up, nothing comes back).  ``sshd.suspend()`` stops only the listeners (new connections hang).
- :func:`netns_sshd`: a :class:`LocalSSHD` whose sshd runs in a network namespace of its own,
  reached from here over a veth pair; :meth:`NetnsSSHD.cut` pulls the cable (the far end goes
  down and the near end keeps a permanent neighbour entry, so packets vanish without an error,
  a RST or an ICMP reply: connects and sessions hang until their own timeouts).
- :func:`known_hosts_with_other_key`: a known_hosts file in which a host's key has changed.
- :func:`tmpfs`: a small tmpfs mounted on a fresh directory (a full disk).
- :func:`run_child` / :func:`start_child`: a Python snippet in a fresh interpreter, marked with a
  random environment variable that every process it starts inherits; :func:`leftovers` finds
  the marked processes still alive (an ssh orphaned when the program exited).
- :class:`InProcessLeaks`: this process's fds, threads and children before and after;
  :func:`cmdline` and :func:`describe` to look at (and name) processes.

Namespaces, veths and mounts need root; the fixtures skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from sshwrap.testing import LocalSSHD, comm, descendants, is_running, pids_with_env, proc_stat

MARK_VAR = "SSHWRAP_FAULT_MARK"


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


# -- hung hosts -------------------------------------------------------------------------------
def _all_pids(sshd: LocalSSHD) -> list[int]:
    return [*sshd.pids, *sshd.session_pids(), *sshd.stray_pids()]


def freeze(sshd: LocalSSHD) -> list[int]:
    """SIGSTOP sshd's listeners and every session process: returns the pids stopped."""
    pids = _all_pids(sshd)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(sshd: LocalSSHD, pids: list[int] | None = None) -> None:
    """SIGCONT what :func:`freeze` stopped (or every process of ``sshd`` now)."""
    for pid in pids if pids is not None else _all_pids(sshd):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(sshd: LocalSSHD) -> Iterator[list[int]]:
    """``with frozen(sshd):`` the host hangs; it answers again afterwards."""
    pids = freeze(sshd)
    try:
        yield pids
    finally:
        thaw(sshd, pids)


# -- cut links --------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class NetnsSSHD:
    """A namespace ``ns`` joined to this one by a veth pair, with a :class:`LocalSSHD` in it."""

    ns: str
    near: str
    far: str
    near_addr: str
    far_addr: str
    sshd: LocalSSHD = field(init=False)

    def cut(self) -> None:
        """Pull the cable: packets in both directions vanish, with no error to either end."""
        _ip("netns", "exec", self.ns, "ip", "link", "set", self.far, "down")

    def restore(self) -> None:
        """Plug it back in."""
        _ip("netns", "exec", self.ns, "ip", "link", "set", self.far, "up")


@contextlib.contextmanager
def netns_sshd(hosts: int = 1, **kwargs: Any) -> Iterator[NetnsSSHD]:
    """A :class:`NetnsSSHD` whose sshd serves ``hosts`` aliases; everything removed afterwards.

    The namespace gets a random name and a /24 out of 10.250.0.0/16 that no interface here
    uses yet (addresses that exist only on this test's own veth pair and namespace).
    """
    _need_root("a network namespace")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2's ip")
    tag = secrets.token_hex(3)
    ns, near, far = f"sw-{tag}", f"swn{tag}", f"swf{tag}"
    third = _free_subnet()
    near_addr = f"10.250.{third}.1"
    far_addrs = [f"10.250.{third}.{2 + i}" for i in range(hosts)]
    prefix = "24"
    made_ns = made_link = False
    try:
        _ip("netns", "add", ns)
        made_ns = True
        _ip("link", "add", near, "type", "veth", "peer", "name", far)
        made_link = True
        _ip("link", "set", far, "netns", ns)
        _ip("addr", "add", f"{near_addr}/{prefix}", "dev", near)
        _ip("link", "set", near, "up")
        inside = ["netns", "exec", ns, "ip"]
        _ip(*inside, "link", "set", "lo", "up")
        for addr in far_addrs:
            _ip(*inside, "addr", "add", f"{addr}/{prefix}", "dev", far)
        _ip(*inside, "link", "set", far, "up")
        # Permanent neighbours both ways: once cut, nothing answers ARP, and without these the
        # kernel would report "No route to host" after a few seconds instead of staying silent.
        far_mac = _mac(far, ns)
        near_mac = _mac(near, None)
        for addr in far_addrs:
            _ip("neigh", "replace", addr, "lladdr", far_mac, "dev", near, "nud", "permanent")
        _ip(
            *inside,
            "neigh",
            "replace",
            near_addr,
            "lladdr",
            near_mac,
            "dev",
            far,
            "nud",
            "permanent",
        )
        box = NetnsSSHD(ns, near, far, near_addr, far_addrs[0])
        box.sshd = LocalSSHD(hosts, addresses=far_addrs, netns=ns, **kwargs)
        with box.sshd:
            try:
                yield box
            finally:
                box.restore()  # so that stop() can reach its processes' sockets cleanly
    finally:
        if made_link:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", near)
        if made_ns:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)


def _free_subnet() -> int:
    out = subprocess.run(["ip", "-j", "addr"], check=True, capture_output=True, timeout=30).stdout
    used = {
        int(a["local"].split(".")[2])
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if a.get("local", "").startswith("10.250.")
    }
    free = [n for n in range(1, 255) if n not in used]
    return free[secrets.randbelow(len(free))]


def _mac(dev: str, ns: str | None) -> str:
    argv = ["ip", "-j", "link", "show", dev]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    out = subprocess.run(argv, check=True, capture_output=True, timeout=30).stdout
    mac: str = json.loads(out)[0]["address"]
    return mac


@pytest.fixture
def cut_sshd() -> Iterator[NetnsSSHD]:
    """One host behind a link the test can cut (``cut_sshd.cut()``)."""
    with netns_sshd() as box:
        yield box


# -- a changed host key -----------------------------------------------------------------------
def known_hosts_with_other_key(sshd: LocalSSHD, directory: Path) -> Path:
    """A known_hosts file in ``directory`` that gives ``sshd``'s first address and port a
    fresh ed25519 key of another host (so ssh sees the host key as changed)."""
    key = directory / "fake_host_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    kind, blob = (directory / "fake_host_key.pub").read_text().split()[:2]
    known = directory / "known_hosts"
    known.write_text(f"[{sshd.addresses[0]}]:{sshd.port} {kind} {blob}\n")
    return known


# -- full disks -------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(size: str = "1m", mode: int = 0o777) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (mount's units) on a new directory; unmounted afterwards."""
    _need_root("mounting a tmpfs")
    path = Path(tempfile.mkdtemp(prefix="sshwrap-tmpfs-"))
    os.chmod(path, 0o755)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    with tmpfs("1m") as path:
        yield path


# -- child programs ---------------------------------------------------------------------------
def _child_env(mark: str, env: dict[str, str] | None) -> dict[str, str]:
    base = dict(os.environ if env is None else env)
    base[MARK_VAR] = mark
    here = str(Path(__file__).resolve().parent)
    base["PYTHONPATH"] = os.pathsep.join(p for p in (here, base.get("PYTHONPATH", "")) if p)
    return base


@dataclass
class ChildRun:
    """What :func:`run_child` saw: exit status, output, wall time, and the child's mark."""

    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    mark: str


def run_child(code: str, *, timeout: float, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``code`` with this interpreter in a fresh process; bounded by ``timeout``."""
    mark = secrets.token_hex(8)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_child_env(mark, env),
        stdin=subprocess.DEVNULL,
    )
    return ChildRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, mark)


class ChildProc:
    """A running :func:`start_child` program: wait for its lines, signal it, reap it."""

    def __init__(self, code: str, env: dict[str, str] | None) -> None:
        self.mark = secrets.token_hex(8)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(self.mark, env),
        )
        self.out = b""
        self.err = b""
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self._sel.register(self.proc.stderr, selectors.EVENT_READ, "err")

    def _pump(self, until: float) -> bool:
        """Read what is there until ``until``; False when both pipes are at EOF."""
        if not self._sel.get_map():
            return False
        for key, _ in self._sel.select(max(0.0, until - time.monotonic())):
            data = os.read(key.fd, 65536)
            if not data:
                self._sel.unregister(key.fileobj)
                continue
            if key.data == "out":
                self.out += data
            else:
                self.err += data
        return True

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        """Wait until a whole line of the child's stdout (ended by its newline) contains
        ``text``: a line printed in several writes is not taken before it is complete."""
        deadline = time.monotonic() + timeout
        want = text.encode()
        while not any(want in line for line in self.out.split(b"\n")[:-1]):
            if time.monotonic() > deadline or not self._pump(deadline):
                raise AssertionError(
                    f"child never printed {text!r}: out={self.out!r} err={self.err[-2000:]!r}"
                )

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Reap the child within ``timeout``, reading its output; AssertionError if not."""
        deadline = time.monotonic() + timeout
        while self._pump(deadline) and time.monotonic() < deadline:
            pass
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"child still running after {timeout} s: {self.err!r}") from None

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._sel.close()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@contextlib.contextmanager
def start_child(code: str, env: dict[str, str] | None = None) -> Iterator[ChildProc]:
    """``with start_child(code) as c:`` a running child; killed and reaped afterwards."""
    child = ChildProc(code, env)
    try:
        yield child
    finally:
        child.close()


def leftovers(mark: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment carries ``mark``."""
    return pids_with_env(f"{MARK_VAR}={mark}")


def cmdline(pid: int) -> bytes:
    """``/proc/PID/cmdline`` (arguments separated by NUL bytes), or b"" if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def describe(pids: list[int]) -> str:
    """``pid: cmdline`` of each pid, for assertion messages."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        out.append(f"{pid}: {cmd}")
    return "; ".join(out)


# -- leaks in this process --------------------------------------------------------------------
def _children() -> set[int]:
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None and int(st[1]) == me:
            kids.add(int(entry))
    return kids


class InProcessLeaks:
    """``with InProcessLeaks() as leaks: ...; leaks.assert_clean(2)``: fds, threads, children."""

    def __enter__(self) -> InProcessLeaks:
        self.fds = set(os.listdir("/proc/self/fd"))
        self.threads = {t.ident for t in threading.enumerate()}
        self.children = _children()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def extra(self) -> tuple[set[str], list[str], set[int]]:
        fds = set(os.listdir("/proc/self/fd")) - self.fds
        threads = [t.name for t in threading.enumerate() if t.ident not in self.threads]
        kids = _children() - self.children
        return fds, threads, kids

    def assert_clean(self, timeout: float = 2.0) -> None:
        """Wait up to ``timeout`` until no new fd, thread or child remains."""
        try:
            wait_until(lambda: not any(self.extra()), timeout, "the call's fds/threads/children")
        except AssertionError:
            fds, threads, kids = self.extra()
            targets = {}
            for fd in fds:
                with contextlib.suppress(OSError):
                    targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
            raise AssertionError(
                f"left behind: fds {targets}, threads {threads}, children {describe(sorted(kids))}"
            ) from None


def ssh_descendants() -> list[int]:
    """Live ssh processes below this one."""
    return [p for p in descendants(os.getpid()) if is_running(p) and comm(p) == "ssh"]
