"""A real, throwaway OpenSSH server on the loopback interface, for tests.

``LocalSSHD`` starts ``/usr/sbin/sshd -D`` on 127.0.0.1 (or several 127.0.0.x addresses) on a
free port, with fresh ed25519 host and user keys in a private temporary directory.  It writes
an ``ssh_config`` with one ``Host`` alias per simulated host and a ``known_hosts`` holding the
host key, so host key checking stays strict.  It waits until a login succeeds, and on exit it
stops sshd and every session process it forked, by pid, and removes its directory::

    with LocalSSHD(hosts=3) as sshd:
        subprocess.run(["ssh", "-F", sshd.config, sshd.hosts[0], "true"], check=True)

As root, sessions log in as a dedicated user (``sshwrap-test``, shell ``/bin/sh``, no rc
files) so the remote side is quiet and fast; that user is created if missing and is the one
thing left behind (with its home ``/home/sshwrap-test`` and, if it was missing, sshd's
privilege separation directory ``/run/sshd``).  As any other user, sshd runs unprivileged and
can only log in as that same user.

Password authentication is off unless ``password`` is given: then the login user gets that
password (root only) and ``PasswordAuthentication``/``KbdInteractiveAuthentication`` are
allowed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "TEST_USER",
    "LocalSSHD",
    "SSHDError",
    "comm",
    "descendants",
    "is_running",
    "pids_with_env",
    "proc_stat",
    "wait_exited",
]

TEST_USER = "sshwrap-test"
SSHD = os.environ.get("SSHWRAP_SSHD", "/usr/sbin/sshd")
_LISTEN_MAX = 16  # sshd's MAX_LISTEN_SOCKS
_MARK_VAR = "SSHWRAP_LOCALSSHD"


class SSHDError(RuntimeError):
    """The throwaway sshd could not be started; the message includes its log."""


def _run(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def _keygen(comment: str, path: str) -> None:
    """A new ed25519 key without passphrase at ``path``."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])


def ensure_test_user(name: str = TEST_USER) -> pwd.struct_passwd:
    """Create (as root) the login user for test sessions if it does not exist yet."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise SSHDError(f"user {name!r} is missing and only root can create it")
    home = f"/home/{name}"
    _run(["useradd", "--no-create-home", "--home-dir", home, "--shell", "/bin/sh", name])
    # '*' rather than useradd's '!': a '!' password marks the account locked for sshd.
    _run(["usermod", "--password", "*", name])
    entry = pwd.getpwnam(name)
    os.makedirs(home, mode=0o755, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return entry


def _free_port(addresses: Sequence[str]) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port: int = s.getsockname()[1]
        ok = True
        for addr in addresses[1:]:
            with socket.socket() as s:
                try:
                    s.bind((addr, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise SSHDError("no free port found on " + ", ".join(addresses))


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or None.

    Index ``i`` here is field ``i + 3`` of proc(5): 0 state, 1 ppid, 11-14 utime, stime,
    cutime, cstime (in clock ticks).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, ppid) of ``pid`` from /proc, or None if it is gone."""
    fields = proc_stat(pid)
    return None if fields is None else (fields[0], int(fields[1]))


def is_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie is gone for our purposes)."""
    st = _stat(pid)
    return st is not None and st[0] != b"Z"


def comm(pid: int) -> str:
    """The process's command name (``/proc/PID/comm``), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Running (non-zombie) descendants of ``pid``, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[0] != b"Z":
            kids.setdefault(st[1], []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def pids_with_env(entry: str, exclude: Collection[int] = ()) -> list[int]:
    """Pids of running (non-zombie) processes whose environment holds ``entry`` exactly.

    ``entry`` is one ``NAME=value`` item of ``/proc/PID/environ``; processes whose environment
    cannot be read (gone, or not ours to read) and the pids in ``exclude`` are passed over.
    """
    needle = entry.encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and is_running(int(name)):
            out.append(int(name))
    return out


def wait_exited(pids: list[int], timeout: float) -> list[int]:
    """Wait on pidfds until every pid has exited (or is a zombie); return those still running."""
    deadline = time.monotonic() + timeout
    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready and is_running(pid):
                left.append(pid)
        finally:
            os.close(fd)
    return left


def _config_lines(value: str | Iterable[str], name: str = "config") -> list[str]:
    """Config lines from a ``str`` (one or more lines) or an iterable of lines.

    Each item may itself hold several lines; blank lines are dropped.  Anything else (bytes,
    a number, an item that is not a ``str``) raises ``TypeError`` naming ``name``.
    """
    if isinstance(value, str):
        items: list[object] = [value]
    elif isinstance(value, bytes | bytearray) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a str or a list of str, not {type(value).__name__}")
    else:
        items = list(value)
    lines: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"{name}[{i}] must be a str (a config line), not {type(item).__name__} {item!r}"
            )
        lines += [line for line in item.splitlines() if line.strip()]
    return lines


class LocalSSHD:
    """A real OpenSSH sshd on loopback with throwaway keys; a context manager.

    ``extra_sshd_config`` and ``extra_client_config`` take a ``str`` (one or more lines) or a
    list of lines: ``LocalSSHD(extra_sshd_config="MaxSessions 2")``.  The server's lines go
    before its defaults, so they win (sshd keeps an option's first value), and a ``Match``
    block goes last; the client's go under ``Host *``.

    ``addresses`` replaces the 127.0.0.x addresses (one per host) and ``netns`` names an existing
    network namespace (``ip netns``, root only) to run sshd in: with both, a test can put a host
    behind a link it controls (see the fault-injection helpers in the test suite).  With
    ``probe_in_netns``, the readiness wait and login probe run inside that namespace too (a
    host that this namespace cannot reach at all, e.g. a leaf behind a gateway namespace).

    Attributes after ``start()`` (or entering the ``with``):

    - ``hosts``: the Host aliases, one per simulated host (``host1`` ... ``hostN``);
      ``host`` is the first.
    - ``addresses``: the 127.0.0.x address of each alias; ``port``: the shared port.
    - ``config``: path of the client ``ssh_config`` (pass it as ``ssh -F``).
    - ``known_hosts``, ``identity`` (private user key), ``user`` (login name).
    - ``ssh_args``: ``["-F", config]``, to put in front of ssh's other arguments.
    - ``pid``: sshd's pid (``pids``: one sshd per 16 addresses, sshd's listen-socket limit);
      ``netns``: the network namespace sshd runs in (``None``: this one).
      ``log``: path of sshd's log; ``sshd_config``: the (first) server config.
    """

    def __init__(
        self,
        hosts: int = 1,
        *,
        password: str | None = None,
        extra_sshd_config: str | Iterable[str] = (),
        extra_client_config: str | Iterable[str] = (),
        user: str | None = None,
        start_timeout: float = 20.0,
        addresses: Sequence[str] | None = None,
        netns: str | None = None,
        probe_in_netns: bool = False,
    ) -> None:
        if not 1 <= hosts <= 254:
            raise ValueError("hosts must be between 1 and 254")
        if addresses is not None and len(addresses) != hosts:
            raise ValueError("addresses must give one address per host")
        self.nhosts = hosts
        self.password = password
        self.extra_sshd_config = _config_lines(extra_sshd_config, "extra_sshd_config")
        self.extra_client_config = _config_lines(extra_client_config, "extra_client_config")
        self.start_timeout = start_timeout
        self._want_user = user
        self.hosts: list[str] = [f"host{i + 1}" for i in range(hosts)]
        self.addresses: list[str] = (
            list(addresses) if addresses is not None else [f"127.0.0.{i + 1}" for i in range(hosts)]
        )
        self.netns = netns
        self.probe_in_netns = probe_in_netns and netns is not None
        self.port = 0
        self.pid = 0
        self.user = ""
        self.dir = Path()
        self.config = ""
        self.known_hosts = ""
        self.identity = ""
        self.log = ""
        self.pids: list[int] = []
        self.sshd_config = ""
        self._procs: list[subprocess.Popen[bytes]] = []
        self._mark = os.urandom(8).hex()
        self._stopped_pids: set[int] = set()

    # -- convenience -------------------------------------------------------------------
    @property
    def host(self) -> str:
        """The first Host alias."""
        return self.hosts[0]

    @property
    def ssh_args(self) -> list[str]:
        """Arguments that make ``ssh`` use this server's client config."""
        return ["-F", self.config]

    def ssh(self, *args: str) -> list[str]:
        """An argv for plain ``ssh`` against this server: ``sshd.ssh(sshd.host, "true")``."""
        return ["ssh", *self.ssh_args, *args]

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> LocalSSHD:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Generate keys and configs, start sshd, and wait until a login works."""
        if not os.path.exists(SSHD):
            raise SSHDError(f"{SSHD} not found: install OpenSSH's server (Debian: openssh-server)")
        root = os.geteuid() == 0
        if root:
            entry = pwd.getpwnam(self._want_user) if self._want_user else ensure_test_user()
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        else:
            entry = pwd.getpwuid(os.geteuid())
            if self._want_user and self._want_user != entry.pw_name:
                raise SSHDError("an unprivileged sshd can only log in as its own user")
        self.user = entry.pw_name
        if self.password is not None:
            if not root:
                raise SSHDError("password logins need root (to set the test user's password)")
            subprocess.run(
                ["chpasswd"],
                input=f"{self.user}:{self.password}\n".encode(),
                check=True,
                capture_output=True,
            )
        # A short directory name keeps ControlPath-style socket paths well within sun_path.
        self.dir = Path(tempfile.mkdtemp(prefix="sshwrap-sshd-"))
        try:
            self._start(root, entry)
        except BaseException:
            self.stop()
            raise

    def _start(self, root: bool, entry: pwd.struct_passwd) -> None:
        d = self.dir
        # The login user must read authorized_keys; everything secret stays 0600/0700.
        os.chmod(d, 0o711)
        _keygen("sshwrap-host", str(d / "host_ed25519"))
        client = d / "client"
        client.mkdir(mode=0o700)
        self.identity = str(client / "id_ed25519")
        _keygen("sshwrap-user", self.identity)
        auth = d / "authorized_keys"
        shutil.copyfile(self.identity + ".pub", auth)
        os.chmod(auth, 0o644)
        self.port = self._free_port()
        host_pub = (d / "host_ed25519.pub").read_text().split()
        self.known_hosts = str(client / "known_hosts")
        with open(self.known_hosts, "w") as f:
            for addr in self.addresses:
                f.write(f"[{addr}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.log = str(d / "sshd.log")
        pw = "yes" if self.password is not None else "no"
        # sshd keeps the first value of an option: extra lines go first so they override our
        # defaults; a Match block (which runs to the end of the file) goes last.
        extra = self.extra_sshd_config
        cut = next(
            (i for i, x in enumerate(extra) if x.strip().lower().startswith("match ")), len(extra)
        )
        common = [
            *extra[:cut],
            f"HostKey {d / 'host_ed25519'}",
            # Marks every session process, so stop() also finds those that left sshd's tree.
            f"SetEnv {_MARK_VAR}={self._mark}",
            f"AuthorizedKeysFile {auth}",
            f"AllowUsers {self.user}",
            "StrictModes no",  # the key file sits under /tmp, which StrictModes rejects
            "UsePAM no",
            f"PasswordAuthentication {pw}",
            f"KbdInteractiveAuthentication {pw}",
            "PermitRootLogin prohibit-password",
            "PrintMotd no",
            "PrintLastLog no",
            "Banner none",
            "UseDNS no",
            "AcceptEnv LANG LC_*",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "GatewayPorts no",
            "PermitTTY yes",
            "MaxSessions 256",
            "MaxStartups 2000:100:2000",
            "LoginGraceTime 60",
            "Subsystem sftp internal-sftp",
            *extra[cut:],
        ]
        # sshd listens on at most 16 sockets (MAX_LISTEN_SOCKS): one sshd per 16 addresses.
        configs: list[Path] = []
        for i in range(0, len(self.addresses), _LISTEN_MAX):
            suffix = "" if i == 0 else f"-{i // _LISTEN_MAX}"
            lines = [
                *(f"ListenAddress {a}:{self.port}" for a in self.addresses[i : i + _LISTEN_MAX]),
                f"PidFile {d / f'sshd{suffix}.pid'}",
                *common,
            ]
            path = d / f"sshd_config{suffix}"
            path.write_text("\n".join(lines) + "\n")
            configs.append(path)
        self.sshd_config = str(configs[0])
        self.config = str(client / "ssh_config")
        client_lines: list[str] = []
        for alias, addr in zip(self.hosts, self.addresses, strict=True):
            client_lines += [f"Host {alias}", f"    HostName {addr}"]
        client_lines += [
            "Host *",
            f"    Port {self.port}",
            f"    User {self.user}",
            f"    IdentityFile {self.identity}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {self.known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    UpdateHostKeys no",
            f"    PasswordAuthentication {pw}",
            f"    KbdInteractiveAuthentication {pw}",
            *(f"    {line}" for line in self.extra_client_config),
        ]
        with open(self.config, "w") as f:
            f.write("\n".join(client_lines) + "\n")
        os.chmod(self.config, 0o600)
        # Check the config first, so a bad option gives sshd's message, not a timeout.
        check = subprocess.run(
            [*self._prefix, SSHD, "-t", "-f", str(configs[0])], capture_output=True
        )
        if check.returncode != 0:
            raise SSHDError("sshd rejected its config: " + check.stderr.decode(errors="replace"))
        with open(self.log, "ab") as log:
            for path in configs:
                proc = subprocess.Popen(
                    [*self._prefix, SSHD, "-D", "-e", "-f", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    start_new_session=True,
                )
                self._procs.append(proc)
        self.pids = [p.pid for p in self._procs]
        self.pid = self.pids[0]
        self._wait_ready()

    @property
    def _prefix(self) -> list[str]:
        """What runs sshd inside ``netns`` (``ip netns exec`` execs it: the pid is sshd's)."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _free_port(self) -> int:
        if not self.netns:
            return _free_port(self.addresses)
        # The addresses live in the namespace: ask the kernel there for a free port.
        probe = (
            "import socket,sys\n"
            "ss=[socket.socket() for a in sys.argv[1:]]\n"
            "ss[0].bind((sys.argv[1],0)); p=ss[0].getsockname()[1]\n"
            "[s.bind((a,p)) for s,a in zip(ss[1:],sys.argv[2:])]\n"
            "print(p)\n"
        )
        out = _run([*self._prefix, "python3", "-c", probe, *self.addresses])
        return int(out.stdout)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        probe_prefix = self._prefix if self.probe_in_netns else []
        if probe_prefix:
            # The banner wait below, run where the addresses can be reached (bounded there).
            code = (
                "import socket,sys,time\n"
                "port, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])\n"
                "err = None\n"
                "for a in sys.argv[3:]:\n"
                "    while True:\n"
                "        try:\n"
                "            with socket.create_connection((a, port), timeout=2) as s:\n"
                "                if s.recv(64).startswith(b'SSH-'): break\n"
                "        except OSError as e: err = e\n"
                "        if time.monotonic() > end: sys.exit(f'{a}:{port} not accepting ({err})')\n"
                "        time.sleep(0.02)\n"
            )
            left = str(max(0.0, deadline - time.monotonic()))
            wait = subprocess.run(
                [*probe_prefix, "python3", "-c", code, str(self.port), left, *self.addresses],
                capture_output=True,
                timeout=self.start_timeout + 5,
            )
            if wait.returncode != 0:
                raise SSHDError(f"sshd not accepting: {wait.stderr.decode(errors='replace')}")
        for addr in [] if probe_prefix else self.addresses:
            while True:
                for proc in self._procs:
                    if proc.poll() is not None:
                        raise SSHDError(f"sshd exited with {proc.returncode}: {self.read_log()}")
                try:
                    with socket.create_connection((addr, self.port), timeout=2) as s:
                        if s.recv(64).startswith(b"SSH-"):
                            break
                except OSError as e:
                    last = str(e)
                if time.monotonic() > deadline:
                    raise SSHDError(f"sshd on {addr}:{self.port} not accepting ({last})")
                # The banner is the event we wait for; this bounds the retry rate only.
                time.sleep(0.02)
        probe = subprocess.run(
            [*probe_prefix, "ssh", *self.ssh_args, "-o", "BatchMode=yes", self.host, "true"],
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if probe.returncode != 0:
            raise SSHDError(
                "login probe failed: " + probe.stderr.decode(errors="replace") + self.read_log()
            )

    def read_log(self) -> str:
        """sshd's log so far (empty once stopped)."""
        try:
            return Path(self.log).read_text(errors="replace")
        except (OSError, ValueError):
            return ""

    def session_pids(self) -> list[int]:
        """Pids of every process sshd has forked that is still running (its sessions)."""
        return [kid for pid in self.pids for kid in descendants(pid)]

    def stray_pids(self) -> list[int]:
        """Session processes that left sshd's process tree (reparented after their connection
        closed): found by the variable sshd sets in every session's environment."""
        return pids_with_env(f"{_MARK_VAR}={self._mark}", exclude=set(self.session_pids()))

    def suspend(self) -> None:
        """Stop the listeners with SIGSTOP: new connections hang (hosts that do not answer)."""
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``suspend()``."""
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop sshd and every process it forked, by pid, and remove the directory."""
        for proc in self._procs:
            if proc.poll() is not None:
                continue
            kids = descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._kill_all(kids)
        if self._procs:
            self._kill_all(self.stray_pids())
        self._procs = []
        if self.dir != Path() and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _kill_all(pids: list[int]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            pids = wait_exited(alive, 2)
            if not pids:
                return


@contextlib.contextmanager
def local_sshd(hosts: int = 1, **kwargs: object) -> Iterator[LocalSSHD]:
    """Function form of ``LocalSSHD``."""
    with LocalSSHD(hosts, **kwargs) as s:  # type: ignore[arg-type]
        yield s
