"""Prompts answered from Python (askpass over a private socket) against the real sshd."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from sshwrap.errors import AuthenticationError, HostKeyError
from sshwrap.io.prompts import PromptServer, classify_prompt
from sshwrap.testing import LocalSSHD

SSHDFactory = Callable[..., LocalSSHD]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="password logins need root (to give the test user a password)"
)


class Master:
    """A ControlMaster started with plain ssh under a PromptServer; stopped with -O exit."""

    def __init__(self, sshd: LocalSSHD, tmp: Path, extra: list[str]) -> None:
        d = tmp / "cm"
        d.mkdir(mode=0o700)
        self.host = sshd.host
        self.log = tmp / "ssh.log"
        self.args = [*sshd.ssh_args, *extra, "-o", f"ControlPath={d / 's'}"]
        self.started = False

    def start(self, ps: PromptServer, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        argv = [
            "ssh",
            *ps.ssh_options(),
            *self.args,
            "-E",
            str(self.log),
            "-M",
            "-N",
            "-f",
            "-o",
            "ControlPersist=yes",
            self.host,
        ]
        # stdio on /dev/null: a backgrounded master must not hold a pipe of ours
        proc = subprocess.run(
            argv,
            env=ps.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
        self.started = proc.returncode == 0
        return proc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def run(self, command: str) -> str:
        out = subprocess.run(
            ["ssh", *self.args, "-o", "BatchMode=yes", self.host, command],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        return out.stdout.decode()

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                ["ssh", *self.args, "-O", "exit", self.host], capture_output=True, timeout=30
            )
            self.started = False


@pytest.fixture
def masters(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    made: list[Master] = []

    def make(sshd: LocalSSHD, *extra: str) -> Master:
        m = Master(sshd, tmp_path / f"m{len(made)}", list(extra))
        made.append(m)
        return m

    for p in range(8):
        (tmp_path / f"m{p}").mkdir()
    yield make
    for m in made:
        m.stop()


def _processes_holding(secret: bytes) -> list[str]:
    """Every process whose argv or environment contains ``secret``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as f:
                    if secret in f.read():
                        found.append(f"{entry}/{part}")
            except OSError:
                continue
    return found


def _ssh_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", "rb") as f:
                    if f.read().strip() == b"ssh":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@needs_root
def test_password_answered_and_never_exposed(
    local_sshd_factory: SSHDFactory, masters: Callable[..., Master]
) -> None:
    password = "pw-" + secrets.token_hex(12)
    sshd = local_sshd_factory(password=password)
    m = masters(sshd, "-o", "PubkeyAuthentication=no")
    seen_during_prompt: list[list[str]] = []
    ssh_during_prompt: list[int] = []

    def on_prompt(text: str, kind: str) -> str | None:
        # ssh and the askpass helper are alive right now, waiting for this answer
        ssh_during_prompt.extend(_ssh_pids())
        seen_during_prompt.append(_processes_holding(password.encode()))
        return password if kind == "password" else None

    with PromptServer(on_prompt=on_prompt) as ps:
        assert m.start(ps).returncode == 0, m.log_text()
        assert [(p.kind, p.answered) for p in ps.prompts] == [("password", True)]
        assert "password" in ps.prompts[0].text
    assert ssh_during_prompt and seen_during_prompt == [[]]
    # connected: the master runs, commands go over it, and no process shows the password
    assert m.run("echo over-master") == "over-master\n"
    assert _processes_holding(password.encode()) == []
    assert password not in m.log_text()


@needs_root
def test_password_keyword_while_connected(
    local_sshd_factory: SSHDFactory, masters: Callable[..., Master]
) -> None:
    password = "pw-" + secrets.token_hex(12)
    sshd = local_sshd_factory(password=password)
    m = masters(sshd, "-o", "PubkeyAuthentication=no")
    with PromptServer(password=password) as ps:
        env = ps.env()
        assert password not in "".join(f"{k}={v}" for k, v in env.items())
        assert m.start(ps).returncode == 0, m.log_text()
        assert [p.kind for p in ps.prompts] == ["password"]
        assert _processes_holding(password.encode()) == []
        private_dir = ps.dir
        assert private_dir is not None and (os.stat(private_dir).st_mode & 0o777) == 0o700
    assert not private_dir.exists()  # removed on close
    assert m.run("id -un").strip() == sshd.user


@needs_root
def test_wrong_password_is_authentication_error_fast(
    local_sshd_factory: SSHDFactory, masters: Callable[..., Master]
) -> None:
    sshd = local_sshd_factory(password="pw-" + secrets.token_hex(12))
    wrong = "wrong-" + secrets.token_hex(12)
    m = masters(sshd, "-o", "PubkeyAuthentication=no")
    with PromptServer(password=wrong) as ps:
        t0 = time.monotonic()
        proc = m.start(ps, timeout=20)
        assert proc.returncode == 255
        with pytest.raises(AuthenticationError) as info:
            ps.raise_for_failure(proc.returncode, m.log_text(), sshd.host)
        elapsed = time.monotonic() - t0
    assert elapsed < 5, elapsed
    err = info.value
    assert err.host == sshd.host and "Permission denied" in str(err)
    for text in (str(err), repr(err), err.stderr, err.message):
        assert wrong not in text
    # each prompt was answered at most once (no retry loop with the same wrong answer)
    assert sum(p.answered for p in ps.prompts) == 1


def _passphrase_key(sshd: LocalSSHD, tmp: Path, passphrase: str) -> str:
    """A passphrase-protected key that is the ONLY key this sshd accepts."""
    key = tmp / "pkey"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "pp", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    auth = sshd.dir / "authorized_keys"
    auth.write_text((tmp / "pkey.pub").read_text())  # the default test key no longer works
    return str(key)


def test_key_passphrase_answered(
    local_sshd_factory: SSHDFactory, masters: Callable[..., Master], tmp_path: Path
) -> None:
    sshd = local_sshd_factory()
    passphrase = "pp-" + secrets.token_hex(12)
    key = _passphrase_key(sshd, tmp_path, passphrase)
    m = masters(sshd, "-o", f"IdentityFile={key}", "-o", "IdentitiesOnly=yes")
    with PromptServer(passphrase=passphrase) as ps:
        assert m.start(ps).returncode == 0, m.log_text()
        kinds = [(p.kind, p.answered) for p in ps.prompts]
        assert kinds == [("passphrase", True)]
        assert key in ps.prompts[0].text
        assert _processes_holding(passphrase.encode()) == []
    assert m.run("echo keyed") == "keyed\n"


def test_wrong_passphrase_fails_promptly(
    local_sshd_factory: SSHDFactory, masters: Callable[..., Master], tmp_path: Path
) -> None:
    sshd = local_sshd_factory()
    key = _passphrase_key(sshd, tmp_path, "pp-" + secrets.token_hex(12))
    m = masters(sshd, "-o", f"IdentityFile={key}", "-o", "IdentitiesOnly=yes")
    wrong = "bad-" + secrets.token_hex(8)
    with PromptServer(passphrase=wrong) as ps:
        t0 = time.monotonic()
        proc = m.start(ps, timeout=20)
        with pytest.raises(AuthenticationError) as info:
            ps.raise_for_failure(proc.returncode, m.log_text(), sshd.host)
        assert time.monotonic() - t0 < 5
        # answered once; ssh did not loop asking again (NumberOfPasswordPrompts=1, and a
        # repeated question would be refused)
        assert [(p.kind, p.answered) for p in ps.prompts] == [("passphrase", True)]
    assert wrong not in str(info.value)


def _unknown_host_args(tmp_path: Path, strict: str) -> list[str]:
    kh = tmp_path / "empty_known_hosts"
    kh.touch()
    return ["-o", f"UserKnownHostsFile={kh}", "-o", f"StrictHostKeyChecking={strict}"]


def test_unknown_host_key_refused_by_default(
    local_sshd: LocalSSHD, masters: Callable[..., Master], tmp_path: Path
) -> None:
    m = masters(local_sshd, *_unknown_host_args(tmp_path, "ask"))
    with PromptServer() as ps:
        proc = m.start(ps)
        assert proc.returncode == 255
        with pytest.raises(HostKeyError) as info:
            ps.raise_for_failure(proc.returncode, m.log_text(), local_sshd.host)
        assert [(p.kind, p.answered) for p in ps.prompts] == [("hostkey", False)]
    assert "host key" in str(info.value).lower()
    assert (tmp_path / "empty_known_hosts").read_text() == ""


def test_unknown_host_key_accepted_by_on_prompt(
    local_sshd: LocalSSHD, masters: Callable[..., Master], tmp_path: Path
) -> None:
    m = masters(local_sshd, *_unknown_host_args(tmp_path, "ask"))
    asked: list[tuple[str, str]] = []

    def on_prompt(text: str, kind: str) -> bool:
        asked.append((text, kind))
        return kind == "hostkey"

    with PromptServer(on_prompt=on_prompt) as ps:
        assert m.start(ps).returncode == 0, m.log_text()
    assert [k for _, k in asked] == ["hostkey"]
    assert "SHA256:" in asked[0][0]
    assert "ssh-ed25519" in (tmp_path / "empty_known_hosts").read_text()
    assert m.run("echo accepted") == "accepted\n"


def test_strict_config_is_never_overridden(
    local_sshd: LocalSSHD, masters: Callable[..., Master], tmp_path: Path
) -> None:
    m = masters(local_sshd, *_unknown_host_args(tmp_path, "yes"))
    asked: list[str] = []

    def on_prompt(text: str, kind: str) -> bool:
        asked.append(kind)
        return True

    with PromptServer(on_prompt=on_prompt) as ps:
        proc = m.start(ps)
        with pytest.raises(HostKeyError):
            ps.raise_for_failure(proc.returncode, m.log_text(), local_sshd.host)
    assert asked == []  # the config does not allow asking, so nothing could say yes


def test_classify_prompt_texts() -> None:
    assert classify_prompt("alice@10.0.0.1's password: ") == "password"
    assert classify_prompt("Enter passphrase for key '/home/a/.ssh/id_ed25519': ") == "passphrase"
    assert classify_prompt("(alice@web1) Verification code: ") == "keyboard-interactive"
    # a server's keyboard-interactive text cannot pass for ssh's own prompts
    assert classify_prompt("(alice@web1) bob@web1's password: ") == "keyboard-interactive"
    assert (
        classify_prompt("(a@h) Are you sure you want to continue connecting (yes/no)? ")
        == "keyboard-interactive"
    )
    assert classify_prompt("Allow shared connection to web1? ", "confirm") == "confirm"
    assert classify_prompt("anything", "none") == "notify"


# -- keyboard-interactive (an OTP-style challenge) through PAM -------------------------------


def _pam_unix() -> str | None:
    for d in (
        "/lib/x86_64-linux-gnu/security",
        "/usr/lib/x86_64-linux-gnu/security",
        "/lib/security",
        "/usr/lib/security",
        "/lib64/security",
        "/usr/lib64/security",
    ):
        if os.path.exists(f"{d}/pam_unix.so"):
            return f"{d}/pam_unix.so"
    return None


@pytest.fixture
def kbdint_sshd(
    local_sshd_factory: SSHDFactory, tmp_path: Path
) -> Iterator[tuple[LocalSSHD, list[str], str]]:
    """An sshd that offers only keyboard-interactive auth (PAM: the user's password).

    LocalSSHD runs with ``UsePAM no`` (no keyboard-interactive device then), so this starts a
    second sshd from its config with PAM on, under a PAM service of its own: sshd names its
    PAM service after its program name, so it runs through a symlink with a unique name and a
    matching ``/etc/pam.d`` file exists for the test only.  Yields (sshd, ssh args, password).
    """
    if os.geteuid() != 0:
        pytest.skip("keyboard-interactive needs root (PAM service file, test user's password)")
    if _pam_unix() is None:
        pytest.skip("pam_unix.so not found")
    password = "otp-" + secrets.token_hex(10)
    base = local_sshd_factory(password=password)
    name = "sshwrap-kbd-" + secrets.token_hex(4)
    pam_file = Path("/etc/pam.d") / name
    pam_file.write_text(
        "auth required pam_unix.so nodelay\naccount required pam_permit.so\n"
        "session required pam_permit.so\npassword required pam_deny.so\n"
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        lines = []
        for line in (base.dir / "sshd_config").read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key == "ListenAddress":
                line = f"ListenAddress 127.0.0.1:{port}"
            elif key == "PidFile":
                line = f"PidFile {tmp_path / 'kbd.pid'}"
            elif key == "UsePAM":
                line = "UsePAM yes"
            elif key == "PasswordAuthentication":
                line = "PasswordAuthentication no"
            lines.append(line)
        lines.append("AuthenticationMethods keyboard-interactive")
        cfg = tmp_path / "sshd_kbd_config"
        cfg.write_text("\n".join(lines) + "\n")
        prog = tmp_path / name
        prog.symlink_to("/usr/sbin/sshd")
        log = open(tmp_path / "kbd-sshd.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(prog), "-D", "-e", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        log.close()

        def banner() -> bool:
            if proc.poll() is not None:
                pytest.fail(
                    "kbd-int sshd did not start: "
                    + (tmp_path / "kbd-sshd.log").read_text(errors="replace")
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    return c.recv(64).startswith(b"SSH-")
            except OSError:
                return False

        wait_until(banner, 20, "the kbd-int sshd's banner")
        kh = tmp_path / "kbd_known_hosts"
        hostkey = (base.dir / "host_ed25519.pub").read_text().split()
        kh.write_text(f"[127.0.0.1]:{port} {hostkey[0]} {hostkey[1]}\n")
        args = [
            "-o",
            f"Port={port}",
            "-o",
            f"UserKnownHostsFile={kh}",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "KbdInteractiveAuthentication=yes",
        ]
        yield base, args, password
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        pam_file.unlink(missing_ok=True)


def test_keyboard_interactive_answered_by_on_prompt(
    kbdint_sshd: tuple[LocalSSHD, list[str], str], masters: Callable[..., Master]
) -> None:
    sshd, args, code = kbdint_sshd
    m = masters(sshd, *args)
    asked: list[tuple[str, str]] = []

    def on_prompt(text: str, kind: str) -> str | None:
        asked.append((text, kind))
        assert _processes_holding(code.encode()) == []  # not even while ssh waits for it
        return code if kind == "keyboard-interactive" else None

    with PromptServer(on_prompt=on_prompt) as ps:
        assert m.start(ps).returncode == 0, m.log_text()
        assert [(p.kind, p.answered) for p in ps.prompts] == [("keyboard-interactive", True)]
    assert [k for _, k in asked] == ["keyboard-interactive"]
    assert asked[0][0].startswith(f"({sshd.user}@")  # OpenSSH's prefix for server prompts
    assert m.run("echo kbd-ok") == "kbd-ok\n"
    assert _processes_holding(code.encode()) == []


def test_keyboard_interactive_wrong_answer(
    kbdint_sshd: tuple[LocalSSHD, list[str], str], masters: Callable[..., Master]
) -> None:
    sshd, args, _code = kbdint_sshd
    m = masters(sshd, *args)
    with PromptServer(on_prompt=lambda text, kind: "000000") as ps:
        t0 = time.monotonic()
        proc = m.start(ps, timeout=20)
        with pytest.raises(AuthenticationError):
            ps.raise_for_failure(proc.returncode, m.log_text(), sshd.host)
        assert time.monotonic() - t0 < 5


def test_keyboard_interactive_password_prompt_gets_password(
    kbdint_sshd: tuple[LocalSSHD, list[str], str], masters: Callable[..., Master]
) -> None:
    # PAM asks "Password: " through keyboard-interactive: password= answers it (once)
    sshd, args, password = kbdint_sshd
    m = masters(sshd, *args)
    with PromptServer(password=password) as ps:
        assert m.start(ps).returncode == 0, m.log_text()
        assert [(p.kind, p.answered) for p in ps.prompts] == [("keyboard-interactive", True)]


@needs_root
def test_repeated_question_is_refused_not_answered_again(
    local_sshd_factory: SSHDFactory, tmp_path: Path
) -> None:
    # Even without ssh_options() (NumberOfPasswordPrompts=1), the same wrong answer is never
    # sent twice: ssh asking again means the answer was wrong.
    sshd = local_sshd_factory(password="pw-" + secrets.token_hex(12))
    with PromptServer(password="wrong-" + secrets.token_hex(8)) as ps:
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                "ssh",
                *sshd.ssh_args,
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "NumberOfPasswordPrompts=3",
                sshd.host,
                "true",
            ],
            env=ps.env(),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        assert proc.returncode == 255
        with pytest.raises(AuthenticationError):
            ps.raise_for_failure(proc.returncode, proc.stderr.decode(), sshd.host)
        assert time.monotonic() - t0 < 5
    answered = [p.answered for p in ps.prompts]
    assert answered[0] is True and len(answered) >= 2 and not any(answered[1:])
