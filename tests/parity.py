"""Faces for the parity tests: one adapter per way of running a remote command, so that a test
body is written once and run through every face (tests/test_parity.py).

A face is a *mode* and a *flavour*:

- mode ``proxy``: a ``Connection`` whose commands run on mux proxy channels
  (``sshwrap.connect(host)``); ``fallback``: a ``Connection`` forced onto ``ssh -S``
  subprocesses (``sshwrap.connect(host, proxy=False)``); ``plain``: one ssh per call
  (``sshwrap.run`` / ``sshwrap.Popen``);
- flavour ``sync`` (``c.run``, ``c.Popen``, Ctrl-C) or ``async`` (``await ac.run``,
  ``await ac.create_process``, ``sshwrap.aio.run`` / ``create_process``, task cancellation).

The reference face ``subprocess`` (:class:`SubprocessFace`, tests/test_parity_api.py) makes the
same call with :mod:`subprocess` itself on this machine: a ``str`` command as ``sh -c``, a list
exec'd, a relative ``cwd`` taken from the remote user's home (where a remote command starts).

What a test expects may depend on the mode (the fallback has ``sshwrap.process``'s semantics),
never on the flavour: the two flavours of a mode must agree field by field.

The async flavour runs its own event loop in a thread for the test's duration, so that a test
body written as plain code can call it, keep a call in flight (``background``) and look at the
remote side meanwhile.  Ctrl-C is ``signal.pthread_kill(main thread, SIGINT)`` while the sync
call runs in the main thread; cancellation is ``task.cancel()`` on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, cast

from faults import cmdline
from waiting import wait_until

import sshwrap
import sshwrap.aio
from sshwrap.testing import LocalSSHD, wait_exited

MODES = ("proxy", "fallback", "plain")
FLAVOURS = ("sync", "async")
Command = str | list[Any]
READY_WAIT = 30.0  # longest wait for the state a test interrupts in (a loaded machine)
CANCEL_WAIT = 5.0  # longest wait for a cancelled call to end (its bound is far shorter)


@dataclass
class Outcome:
    """How one call ended: its result's fields or its exception, and how long it took."""

    returncode: int | None = None
    stdout: Any = None
    stderr: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0

    @property
    def kind(self) -> str:
        """``"result"``, ``"interrupted"`` (KeyboardInterrupt or CancelledError) or the
        exception's class name."""
        if self.error is None:
            return "result"
        if isinstance(self.error, KeyboardInterrupt | asyncio.CancelledError):
            return "interrupted"
        return type(self.error).__name__

    @property
    def message(self) -> str:
        """``str()`` of the exception ("" for a result)."""
        return "" if self.error is None else str(self.error)


def outcome(call: Callable[[], Any]) -> Outcome:
    """Run ``call`` and describe how it ended (a result's fields, or what it raised)."""
    t0 = time.monotonic()
    try:
        r = call()
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as e:
        return Outcome(error=e, elapsed=time.monotonic() - t0)
    return Outcome(r.returncode, r.stdout, r.stderr, elapsed=time.monotonic() - t0)


def token() -> str:
    """A number no other test's remote command uses: ``sleep TOKEN`` is findable by pid."""
    return str(100_000 + secrets.randbelow(900_000))


def remote_sleeps(sshd: LocalSSHD, tok: str) -> list[int]:
    """Live ``sleep TOK`` processes of ``sshd`` (its sessions and those that left its tree)."""
    want = b"sleep\0" + tok.encode() + b"\0"
    return [p for p in (*sshd.session_pids(), *sshd.stray_pids()) if cmdline(p) == want]


class Proc:
    """A started remote command (``Popen`` / ``create_process``) behind one interface."""

    def communicate(self, input: bytes | None = None, timeout: float = 30.0) -> tuple[Any, Any]:
        """Send ``input``, read both outputs to their end, wait."""
        raise NotImplementedError

    def wait(self, timeout: float = 30.0) -> int:
        """The returncode once the command ended."""
        raise NotImplementedError

    def readline(self, timeout: float = 30.0) -> bytes:
        """One line of stdout."""
        raise NotImplementedError

    @property
    def returncode(self) -> int | None:
        """The returncode once the command ended, else None (``poll()``)."""
        raise NotImplementedError

    def send_signal(self, sig: int) -> None:
        """``send_signal``; ``terminate`` and ``kill`` are the same for SIGTERM and SIGKILL."""
        raise NotImplementedError

    def terminate(self) -> None:
        """``terminate()``."""
        raise NotImplementedError

    def kill(self) -> None:
        """``kill()``."""
        raise NotImplementedError


class Face:
    """One face against one sshd: ``run``, ``start``, ``interrupt`` and ``background``."""

    flavour = ""

    def __init__(self, mode: str, sshd: LocalSSHD) -> None:
        self.mode = mode
        self.sshd = sshd

    @property
    def name(self) -> str:
        """``mode-flavour``, the test id."""
        return f"{self.mode}-{self.flavour}"

    def open(self) -> None:
        """Connect (the Connection modes)."""

    def close(self) -> None:
        """Disconnect and release what the face holds."""

    @property
    def master_pid(self) -> int:
        """The Connection's master (Connection modes)."""
        raise NotImplementedError

    def run(self, cmd: Command, **kw: Any) -> Any:
        """``run(cmd, **kw)``: the result, or what it raised."""
        raise NotImplementedError

    def start(self, cmd: Command, **kw: Any) -> Proc:
        """``Popen(cmd, **kw)`` / ``create_process(cmd, **kw)``."""
        raise NotImplementedError

    def interrupt(
        self, cmd: Command, ready: Callable[[], object], **kw: Any
    ) -> tuple[Outcome, float]:
        """``run(cmd, **kw)``, interrupted (Ctrl-C or cancel) once ``ready()`` holds: how it
        ended, and the seconds from the interrupt to the end of the call."""
        raise NotImplementedError

    def background(self, cmd: Command, **kw: Any) -> concurrent.futures.Future[Outcome]:
        """``run(cmd, **kw)`` in flight while the test goes on: its outcome later."""
        raise NotImplementedError

    def getstatusoutput(self, cmd: Command, **kw: Any) -> tuple[int, str]:
        """``getstatusoutput(cmd, **kw)`` (``subprocess.getstatusoutput``'s shape)."""
        raise NotImplementedError

    def getoutput(self, cmd: Command, **kw: Any) -> str:
        """``getoutput(cmd, **kw)``."""
        raise NotImplementedError

    def loop_errors(self) -> list[str]:
        """What the event loop reported as unhandled (an exception never retrieved)."""
        return []


class SyncFace(Face):
    """``sshwrap.connect(...).run/Popen`` or ``sshwrap.run/Popen``; Ctrl-C for interrupts."""

    flavour = "sync"

    def __init__(self, mode: str, sshd: LocalSSHD) -> None:
        super().__init__(mode, sshd)
        self.conn: sshwrap.Connection | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="parity-bg")

    def open(self) -> None:
        if self.mode != "plain":
            self.conn = sshwrap.connect(
                self.sshd.host, config=self.sshd.config, proxy=self.mode == "proxy"
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.conn is not None:
            self.conn.close()

    @property
    def master_pid(self) -> int:
        assert self.conn is not None
        return self.conn.master_pid

    def run(self, cmd: Command, **kw: Any) -> Any:
        if self.conn is not None:
            return self.conn.run(cmd, **kw)
        return sshwrap.run(self.sshd.host, cmd, config=self.sshd.config, **kw)

    def start(self, cmd: Command, **kw: Any) -> Proc:
        if self.conn is not None:
            return SyncProc(self.conn.Popen(cmd, **kw))
        return SyncProc(sshwrap.Popen(self.sshd.host, cmd, config=self.sshd.config, **kw))

    def interrupt(
        self, cmd: Command, ready: Callable[[], object], **kw: Any
    ) -> tuple[Outcome, float]:
        assert threading.current_thread() is threading.main_thread()
        main = threading.main_thread().ident
        assert main is not None
        lock = threading.Lock()
        done = threading.Event()
        sent: list[float] = []
        failure: list[BaseException] = []

        def ctrl_c() -> None:
            try:
                wait_until(lambda: done.is_set() or ready(), READY_WAIT, "the state to interrupt")
            except AssertionError as e:
                failure.append(e)  # interrupt anyway: the call must not hang the test
            with lock:
                if not done.is_set():
                    sent.append(time.monotonic())
                    signal.pthread_kill(main, signal.SIGINT)

        t = threading.Thread(target=ctrl_c, name="parity-ctrl-c")
        t.start()
        try:
            got = outcome(lambda: self.run(cmd, **kw))
        finally:
            with lock:
                done.set()
            t.join()
        end = time.monotonic()
        if failure:
            raise failure[0]
        assert sent, f"the call ended before the interrupt: {got}"
        return got, end - sent[0]

    def background(self, cmd: Command, **kw: Any) -> concurrent.futures.Future[Outcome]:
        return self._pool.submit(outcome, lambda: self.run(cmd, **kw))

    def getstatusoutput(self, cmd: Command, **kw: Any) -> tuple[int, str]:
        if self.conn is not None:
            got: tuple[int, str] = cast(Any, self.conn).getstatusoutput(cmd, **kw)
            return got
        return sshwrap.getstatusoutput(self.sshd.host, cmd, config=self.sshd.config, **kw)

    def getoutput(self, cmd: Command, **kw: Any) -> str:
        if self.conn is not None:
            out: str = cast(Any, self.conn).getoutput(cmd, **kw)
            return out
        return sshwrap.getoutput(self.sshd.host, cmd, config=self.sshd.config, **kw)


class SyncProc(Proc):
    """``ChannelPopen`` or ``sshwrap.Popen``."""

    def __init__(self, p: Any) -> None:
        self.p = p

    def communicate(self, input: bytes | None = None, timeout: float = 30.0) -> tuple[Any, Any]:
        out, err = self.p.communicate(input, timeout=timeout)
        return out, err

    def wait(self, timeout: float = 30.0) -> int:
        rc: int = self.p.wait(timeout)
        return rc

    def readline(self, timeout: float = 30.0) -> bytes:
        line: bytes = self.p.stdout.readline()
        return line

    @property
    def returncode(self) -> int | None:
        rc: int | None = self.p.poll()
        return rc

    def send_signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def terminate(self) -> None:
        self.p.terminate()

    def kill(self) -> None:
        self.p.kill()


class LoopThread:
    """An asyncio event loop running in a thread of its own, for the async faces."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[str] = []
        self.loop.set_exception_handler(lambda _, ctx: self.errors.append(str(ctx["message"])))
        self._thread = threading.Thread(target=self.loop.run_forever, name="parity-loop")
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Schedule ``coro`` on the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        """Run ``coro`` on the loop and wait for it (its exception is raised here)."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Cancel what is left, stop the loop, join its thread."""

        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_default_executor()

        with contextlib.suppress(Exception):
            self.call(cancel_rest(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


class AsyncFace(Face):
    """``await sshwrap.aio.connect(...)`` + ``ac.run/create_process``, or ``sshwrap.aio.run/
    create_process``, on a loop of the face's own; ``task.cancel()`` for interrupts."""

    flavour = "async"

    def __init__(self, mode: str, sshd: LocalSSHD) -> None:
        super().__init__(mode, sshd)
        self.lt = LoopThread()
        self.conn: Any = None

    def open(self) -> None:
        if self.mode != "plain":
            self.conn = self.lt.call(
                sshwrap.aio.connect(
                    self.sshd.host, config=self.sshd.config, proxy=self.mode == "proxy"
                )
            )

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.lt.call(self.conn.close())
        finally:
            self.lt.close()

    @property
    def master_pid(self) -> int:
        pid: int = self.conn.master_pid
        return pid

    async def arun(self, cmd: Command, **kw: Any) -> Any:
        """The async call itself."""
        if self.conn is not None:
            return await self.conn.run(cmd, **kw)
        return await sshwrap.aio.run(self.sshd.host, cmd, config=self.sshd.config, **kw)

    def run(self, cmd: Command, **kw: Any) -> Any:
        return self.lt.call(self.arun(cmd, **kw))

    def start(self, cmd: Command, **kw: Any) -> Proc:
        async def create() -> Any:
            if self.conn is not None:
                return await self.conn.create_process(cmd, **kw)
            return await sshwrap.aio.create_process(
                self.sshd.host, cmd, config=self.sshd.config, **kw
            )

        return AsyncProc(self.lt, self.lt.call(create()))

    def interrupt(
        self, cmd: Command, ready: Callable[[], object], **kw: Any
    ) -> tuple[Outcome, float]:
        async def main() -> tuple[Outcome, float]:
            t0 = time.monotonic()
            task = asyncio.ensure_future(self.arun(cmd, **kw))
            done = threading.Event()
            task.add_done_callback(lambda _: done.set())
            await asyncio.to_thread(
                wait_until, lambda: done.is_set() or ready(), READY_WAIT, "the state to interrupt"
            )
            assert not done.is_set(), f"the call ended before the interrupt: {task!r}"
            sent = time.monotonic()
            task.cancel()
            await asyncio.wait([task], timeout=CANCEL_WAIT)
            if not task.done():
                raise AssertionError(f"the cancelled call did not end within {CANCEL_WAIT} s")
            try:
                r = task.result()
            except (Exception, asyncio.CancelledError) as e:
                # Without its traceback: the frames of the cancelled call would keep what it
                # left behind alive (and unreported) for as long as the test holds the outcome.
                got = Outcome(error=e.with_traceback(None))
                e.__context__ = e.__cause__ = None
            else:
                got = Outcome(r.returncode, r.stdout, r.stderr)
            del task
            end = time.monotonic()
            got.elapsed = end - t0
            return got, end - sent

        result: tuple[Outcome, float] = self.lt.call(main(), READY_WAIT + 60)
        return result

    def loop_errors(self) -> list[str]:
        return list(self.lt.errors)

    def _aio(self, name: str, cmd: Command, **kw: Any) -> Any:
        async def call() -> Any:
            if self.conn is not None:
                return await getattr(self.conn, name)(cmd, **kw)
            func = getattr(sshwrap.aio, name)
            return await func(self.sshd.host, cmd, config=self.sshd.config, **kw)

        return self.lt.call(call())

    def getstatusoutput(self, cmd: Command, **kw: Any) -> tuple[int, str]:
        got: tuple[int, str] = self._aio("getstatusoutput", cmd, **kw)
        return got

    def getoutput(self, cmd: Command, **kw: Any) -> str:
        out: str = self._aio("getoutput", cmd, **kw)
        return out

    def background(self, cmd: Command, **kw: Any) -> concurrent.futures.Future[Outcome]:
        async def call() -> Outcome:
            t0 = time.monotonic()
            try:
                r = await self.arun(cmd, **kw)
            except Exception as e:
                return Outcome(error=e, elapsed=time.monotonic() - t0)
            return Outcome(r.returncode, r.stdout, r.stderr, elapsed=time.monotonic() - t0)

        future: concurrent.futures.Future[Outcome] = self.lt.submit(call())
        return future


class AsyncProc(Proc):
    """``AsyncChannelProcess`` or ``sshwrap.aio.Process``, driven on the face's loop."""

    def __init__(self, lt: LoopThread, p: Any) -> None:
        self.lt = lt
        self.p = p

    def communicate(self, input: bytes | None = None, timeout: float = 30.0) -> tuple[Any, Any]:
        out, err = self.lt.call(self.p.communicate(input), timeout)
        return out, err

    def wait(self, timeout: float = 30.0) -> int:
        rc: int = self.lt.call(self.p.wait(), timeout)
        return rc

    def readline(self, timeout: float = 30.0) -> bytes:
        line: bytes = self.lt.call(self.p.stdout.readline(), timeout)
        return line

    @property
    def returncode(self) -> int | None:
        async def get() -> int | None:
            rc: int | None = self.p.returncode
            return rc

        rc: int | None = self.lt.call(get())
        return rc

    def _signal(self, method: str, *args: int) -> None:
        async def call() -> None:
            r = getattr(self.p, method)(*args)
            if inspect.isawaitable(r):  # sshwrap.aio.Process: send_signal/terminate await
                await r

        self.lt.call(call())

    def send_signal(self, sig: int) -> None:
        self._signal("send_signal", sig)

    def terminate(self) -> None:
        self._signal("terminate")

    def kill(self) -> None:
        self._signal("kill")


class SubprocessFace(Face):
    """The reference: the same call made with :mod:`subprocess` on this machine (``sh -c``
    for a ``str``, a list exec'd), started in ``home`` (a relative ``cwd`` is taken from
    there, as a remote command's is from the remote user's home).  ``stdin`` defaults to
    DEVNULL as in sshwrap, unless ``input`` is given (then subprocess's own rules apply)."""

    flavour = "reference"

    def __init__(self, sshd: LocalSSHD, home: str) -> None:
        super().__init__("subprocess", sshd)
        self.home = home

    @property
    def name(self) -> str:
        return "subprocess"

    def _local(self, cmd: Command, kw: dict[str, Any]) -> Any:
        if "stdin" not in kw and kw.get("input") is None:
            kw["stdin"] = subprocess.DEVNULL
        kw["cwd"] = os.path.join(self.home, os.fsdecode(kw.get("cwd") or "."))
        return ["sh", "-c", cmd] if isinstance(cmd, str) else cmd

    def run(self, cmd: Command, **kw: Any) -> Any:
        return subprocess.run(self._local(cmd, kw), **kw)

    def start(self, cmd: Command, **kw: Any) -> Proc:
        return SyncProc(subprocess.Popen(self._local(cmd, kw), **kw))

    def getstatusoutput(self, cmd: Command, **kw: Any) -> tuple[int, str]:
        assert isinstance(cmd, str)
        return subprocess.getstatusoutput(cmd, **kw)

    def getoutput(self, cmd: Command, **kw: Any) -> str:
        assert isinstance(cmd, str)
        return subprocess.getoutput(cmd, **kw)


@contextlib.contextmanager
def open_face(mode: str, flavour: str, sshd: LocalSSHD) -> Iterator[Face]:
    """A connected face (its Connection closed and its loop stopped afterwards)."""
    face: Face = SyncFace(mode, sshd) if flavour == "sync" else AsyncFace(mode, sshd)
    try:
        face.open()
        yield face
    finally:
        face.close()


def kill_master(face: Face) -> int:
    """SIGKILL the face's master and wait until it is gone; its pid."""
    pid = face.master_pid
    os.kill(pid, signal.SIGKILL)
    assert wait_exited([pid], 10) == [], "the master outlived SIGKILL"
    return pid


def _socket_inodes(pids: list[int]) -> set[str]:
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        found.add(target[8:-1])
    return found


def _rx_queues(pids: list[int], state: str) -> int:
    """The sum of ``rx_queue`` (``/proc/net/tcp``) over the TCP sockets of ``pids`` in
    ``state`` (01 established: bytes not read yet; 0A listening: connections not accepted)."""
    inodes = _socket_inodes(pids)
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes and fields[3] == state:
                    total += int(fields[4].split(":")[1], 16)
    return total


def server_unread(sshd: LocalSSHD) -> int:
    """Bytes waiting unread in the TCP sockets of ``sshd``'s sessions: what a client sent
    to a frozen server.  Grows when a request (a channel open) reaches a frozen host."""
    return _rx_queues(sshd.session_pids(), "01")


def server_backlog(sshd: LocalSSHD) -> int:
    """Connections waiting for ``sshd``'s (suspended) listeners to accept them."""
    return _rx_queues(sshd.pids, "0A")
