"""Typed errors against the real sshd: each ssh failure raises the right class with ssh's words.

Name resolution uses ``bad..host``: glibc rejects the empty label before building a query, so
the test sends nothing to any DNS server (checked with strace: no socket but nscd's).
"""

from __future__ import annotations

import pickle
import re
import subprocess
from pathlib import Path

import pytest
from faults import known_hosts_with_other_key

import sshwrap
from sshwrap.errors import UNKNOWN_SIGNAL, classify_ssh_failure, interpret_exit, ssh_messages
from sshwrap.protocol.sshlog import (
    SHORT_LOG_SETTINGS,
    mux_session_without_status,
    short_log_supported,
)
from sshwrap.testing import LocalSSHD


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_refused_port_is_connection_error(local_sshd: LocalSSHD) -> None:
    port = _free_port()
    with pytest.raises(sshwrap.SSHConnectionError) as info:
        sshwrap.run(local_sshd.host, "true", config=local_sshd.config, port=port)
    e = info.value
    assert e.host == local_sshd.host
    assert "Connection refused" in e.message
    assert f"port {port}" in e.message
    assert "debug" not in e.stderr
    assert isinstance(e, sshwrap.SSHError)
    assert isinstance(e, sshwrap.SSHWrapError)


def test_unknown_host_name_is_connection_error(local_sshd: LocalSSHD) -> None:
    with pytest.raises(sshwrap.SSHConnectionError) as info:
        sshwrap.run("bad..host", "true", config=local_sshd.config)
    assert info.value.host == "bad..host"
    assert "Could not resolve hostname bad..host" in info.value.message


def test_wrong_key_is_authentication_error(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    key = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    # The fixture's config names the right key; a copy that names only the wrong one.
    config = tmp_path / "config"
    lines = Path(local_sshd.config).read_text().splitlines()
    config.write_text(
        "\n".join(
            f"    IdentityFile {key}" if ln.strip().startswith("IdentityFile") else ln
            for ln in lines
        )
        + "\n"
    )
    config.chmod(0o600)
    with pytest.raises(sshwrap.AuthenticationError) as info:
        sshwrap.run(
            local_sshd.host,
            "true",
            config=config,
            options={"BatchMode": True},
            stderr=subprocess.PIPE,
        )
    assert "Permission denied" in info.value.message
    assert info.value.host == local_sshd.host


def test_changed_host_key_is_host_key_error(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    known = known_hosts_with_other_key(local_sshd, tmp_path)
    with pytest.raises(sshwrap.HostKeyError) as info:
        sshwrap.run(
            local_sshd.host, "true", config=local_sshd.config, options={"UserKnownHostsFile": known}
        )
    e = info.value
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in e.stderr
    assert "Host key verification failed" in e.stderr
    assert e.message


def test_changed_host_key_message_is_the_line_that_says_so(
    local_sshd: LocalSSHD, tmp_path: Path
) -> None:
    """Not the banner of ``@`` (was: ``@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!``)."""
    known = known_hosts_with_other_key(local_sshd, tmp_path)
    with pytest.raises(sshwrap.HostKeyError) as info:
        sshwrap.run(
            local_sshd.host,
            "true",
            config=local_sshd.config,
            options={"UserKnownHostsFile": known},
            capture_output=True,
        )
    m = info.value.message
    assert not m.startswith("@"), m
    assert re.search(r"Host key for \S+ has changed", m), m
    assert m.endswith("(Host key verification failed.)"), m  # and ssh's last line


def test_early_stderr_counts_only_without_a_session() -> None:
    """ssh's own stderr lines are used when the log shows no session (else they may be the
    remote command's)."""
    e = classify_ssh_failure("h", "", stderr="Bad port '99999'\n")
    assert type(e) is sshwrap.SSHConfigError and e.message == "Bad port '99999'"
    session = 'Authenticated to h ([127.0.0.1]:22) using "publickey".\r\n'
    e = classify_ssh_failure(
        "h", session + "Connection to h closed by remote host.\r\n", stderr="Bad port 'x'\n"
    )
    assert type(e) is sshwrap.SSHConnectionError and "Bad port" not in e.message


def test_unknown_host_key_is_host_key_error(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(sshwrap.HostKeyError) as info:
        sshwrap.run(
            local_sshd.host, "true", config=local_sshd.config, options={"UserKnownHostsFile": empty}
        )
    assert "host key is known" in info.value.stderr or "verification failed" in info.value.stderr


def test_remote_exit_255_is_not_an_ssh_error(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(local_sshd.host, "exit 255", config=local_sshd.config)
    assert r.returncode == 255
    assert sshwrap.call(local_sshd.host, "exit 255", config=local_sshd.config) == 255


def test_remote_kill_9_gives_negative_returncode(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(local_sshd.host, "kill -9 $$", config=local_sshd.config)
    assert r.returncode < 0
    assert r.returncode == UNKNOWN_SIGNAL  # ssh does not say which signal: documented value
    with pytest.raises(subprocess.CalledProcessError) as info:
        sshwrap.run(local_sshd.host, "kill -9 $$", config=local_sshd.config, check=True)
    assert isinstance(info.value, sshwrap.CalledProcessError)
    assert "died with a signal" in str(info.value)


def test_signal_sent_by_sshwrap_is_named(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(
        local_sshd.host, "echo up; exec sleep 60", stdout=subprocess.PIPE, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"up\n"
        p.terminate()
        assert p.wait(timeout=30) == -15
    e = sshwrap.CalledProcessError(p.returncode, p.args, host=p.host)
    assert "died with SIGTERM" in str(e)
    assert "host1" in str(e)


def test_called_process_error_is_subprocess_one(local_sshd: LocalSSHD) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        sshwrap.run(
            local_sshd.host,
            "echo out; exit 3",
            config=local_sshd.config,
            check=True,
            capture_output=True,
        )
    e = info.value
    assert isinstance(e, sshwrap.CalledProcessError)
    assert isinstance(e, sshwrap.SSHWrapError)
    assert e.returncode == 3
    assert e.output == b"out\n" and e.stdout == b"out\n"
    assert e.host == local_sshd.host
    assert "returned non-zero exit status 3" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert again.host == local_sshd.host and again.returncode == 3


def test_check_call_and_check_output_raise(local_sshd: LocalSSHD) -> None:
    with pytest.raises(sshwrap.CalledProcessError):
        sshwrap.check_call(local_sshd.host, "exit 4", config=local_sshd.config)
    with pytest.raises(sshwrap.CalledProcessError) as info:
        sshwrap.check_output(local_sshd.host, "echo partial; exit 5", config=local_sshd.config)
    assert info.value.output == b"partial\n"


def test_timeout_expired_is_subprocess_one(local_sshd: LocalSSHD) -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        sshwrap.run(
            local_sshd.host,
            "echo so-far; exec sleep 30",
            config=local_sshd.config,
            timeout=1.5,
            capture_output=True,
        )
    e = info.value
    assert isinstance(e, sshwrap.TimeoutExpired) and isinstance(e, sshwrap.SSHWrapError)
    assert e.host == local_sshd.host
    assert e.output == b"so-far\n"
    assert "timed out after 1.5 seconds" in str(e)


def test_ssh_messages_reach_callers_stderr(
    local_sshd: LocalSSHD, capfd: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    with pytest.raises(sshwrap.SSHConnectionError):
        sshwrap.run(local_sshd.host, "true", config=local_sshd.config, port=port)
    err = capfd.readouterr().err
    assert "Connection refused" in err
    assert "debug" not in err


def test_no_debug_lines_in_captured_stderr(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host, "echo to-err >&2", config=local_sshd.config, capture_output=True
    )
    assert r.stderr == b"to-err\n"


# -- the classifier on ssh's own texts (as printed by OpenSSH 9.2) ------------------------


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        (
            "ssh: connect to host 10.0.0.1 port 22: Connection timed out\r\n",
            sshwrap.SSHConnectionError,
        ),
        ("ssh: connect to host h port 22: No route to host\r\n", sshwrap.SSHConnectionError),
        (
            "kex_exchange_identification: Connection closed by remote host\r\n"
            "Connection closed by 127.0.0.1 port 22\r\n",
            sshwrap.SSHConnectionError,
        ),
        ("user@h: Permission denied (publickey,password).\r\n", sshwrap.AuthenticationError),
        (
            "Received disconnect from h port 22:2: Too many authentication failures\r\n",
            sshwrap.AuthenticationError,
        ),
        (
            "No ED25519 host key is known for [h]:22 and you have requested strict checking.\r\n"
            "Host key verification failed.\r\n",
            sshwrap.HostKeyError,
        ),
        ("something new\r\n", sshwrap.SSHError),
    ],
)
def test_classifier(text: str, cls: type[sshwrap.SSHError]) -> None:
    e = classify_ssh_failure("h", "debug1: Connecting to h\r\n" + text)
    assert type(e) is cls
    assert e.message and "debug1" not in e.stderr


def test_interpret_exit_needs_the_log() -> None:
    assert (
        interpret_exit(
            "h", 255, "debug1: client_input_channel_req: channel 0 rtype exit-status reply 0\r\n"
        ).returncode
        == 255
    )
    sig = interpret_exit(
        "h",
        255,
        "debug1: client_input_channel_req: channel 0 rtype exit-signal reply 0\r\n",
        sent_signal=15,
    )
    assert sig.returncode == -15 and sig.error is None
    failed = interpret_exit("h", 255, "ssh: connect to host h port 1: Connection refused\r\n")
    assert isinstance(failed.error, sshwrap.SSHConnectionError)
    assert ssh_messages("debug1: Sending command: a\nb\r\nWarning: x\r\n") == "Warning: x\r\n"


def test_short_log_tagged_lines_read_as_in_debug1() -> None:
    """The fan-out's short log (LogVerbose) tags the lines it selects: every marker reads them."""
    tag = "clientloop.c:client_loop():1520 (pid=42): "
    killed = interpret_exit("h", 255, f"{tag}Killed by signal 15.\r\n")
    assert (killed.returncode, killed.local_signal, killed.error) == (-15, 15, None)
    assert interpret_exit("h", 255, f"debug1: {tag}Exit status 255\r\n").returncode == 255
    mux = "debug1: mux.c:mux_client_request_session():2053 (pid=42): master session id: 2\r\n"
    assert mux_session_without_status(mux + "debug2: Control master terminated unexpectedly\r\n")
    log = (
        'Authenticated to h ([127.0.0.1]:22) using "publickey".\r\n'
        f"debug1: {tag}Sending command: x\r\n{tag}Transferred: sent 1, received 2 bytes\r\n"
        "mux.c:mux_client_request_session():2066 (pid=42): session request failed: x\r\n"
    )
    # shown as ssh shows an error_f() line by default: after its function's name
    assert ssh_messages(log) == "mux_client_request_session: session request failed: x\r\n"
    # a session was up, so stderr is the remote command's, not ssh's
    up = f"debug1: {tag}Sending command: x\r\n"
    e = classify_ssh_failure("h", up, 255, stderr="ssh: connect to host h: Connection refused")
    assert not isinstance(e, sshwrap.SSHConnectionError)


def test_short_log_needs_openssh_8_5() -> None:
    assert "LogLevel=VERBOSE" in SHORT_LOG_SETTINGS
    assert short_log_supported("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19 27 Jan 2026")
    assert short_log_supported("OpenSSH_8.5p1, OpenSSL 1.1.1k")
    assert short_log_supported("OpenSSH_10.0p2")
    assert not short_log_supported("OpenSSH_8.4p1 Debian-5+deb11u3, OpenSSL 1.1.1w")
    assert not short_log_supported("")
