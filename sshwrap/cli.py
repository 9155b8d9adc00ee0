"""The drop-in ``sshwrap`` command: ``sshwrap [ssh options] destination [command]``.

Every argument goes to ssh unchanged.  sshwrap reads them only to decide, by ssh's own rules,
whether ssh would use a terminal here:

- Not interactive (stdin is not a terminal, ``-T``, a command without ``-t``, ``-N``, ``-f``,
  ``-n``, ``-W``, ``-O``, ``-G``, ``-V``, ``-Q``, ``RequestTTY no`` ...): sshwrap execs ssh, so
  bytes, stdin handling and exit status are ssh's own.
- Interactive: ssh runs as ``ssh -tt ...`` in a local pty sized like the user's terminal, the
  terminal goes to raw mode (always restored), and the relay copies bytes both ways and
  forwards window-size changes.  The exit status is ssh's.

``RequestTTY``, ``SessionType``, ``StdinNull``, ``ForkAfterAuthentication`` and
``RemoteCommand`` may come from ssh_config: when the command line leaves them open, sshwrap
asks ``ssh -G`` (which parses the config, no connection) instead of parsing configs itself.

Recording (docs/recording.md): ``sshwrap --record FILE [--record-input] [--record-overwrite]
[ssh arguments]``, or ``SSHWRAP_RECORD=FILE`` (and ``SSHWRAP_RECORD_INPUT=1``) in the
environment, writes an interactive session to an asciicast v2 file.  sshwrap's own options
are taken only from the very start of the command line, before any ssh argument, and they
are words ssh itself refuses (its getopt reads ``--record`` as the unknown option ``-``), so
none of them can change what an ssh command line means.  A session that is not interactive
is not recorded (``--record`` says so on stderr; the environment variable stays quiet).
"""

from __future__ import annotations

import os
import sys

__all__ = ["RecordRequest", "main", "record_request", "wants_tty"]

# Options that mean ssh opens no interactive session.
_NO_SESSION = {"V", "G", "Q", "O", "N", "f", "n", "W"}


def _ssh_G(ssh: str, argv: list[str]) -> dict[str, str]:
    """Resolved client config from ``ssh -G`` (empty if ssh could not say)."""
    import subprocess

    try:
        out = subprocess.run(
            [ssh, "-G", *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    conf: dict[str, str] = {}
    for line in out.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value)
    return conf


def wants_tty(ssh: str, argv: list[str], stdin_is_tty: bool) -> bool:
    """Would ssh, given ``argv`` and this stdin, allocate a terminal we should relay?"""
    from .core.sshparse import parse_ssh_argv

    if not stdin_is_tty:
        return False
    parsed = parse_ssh_argv(argv)
    if parsed.error or parsed.destination is None:
        return False
    if any(parsed.has(letter) for letter in _NO_SESSION):
        return False
    # -t / -T on the command line: the last one decides (two -t mean force).
    request: str | None = None
    for opt, _ in parsed.options:
        if opt == "T":
            request = "no"
        elif opt == "t":
            request = "force" if request == "yes" else "yes"
    conf = _ssh_G(ssh, argv)
    if not conf:
        return False  # let ssh itself report what is wrong
    if request is None:
        value = conf.get("requesttty", "auto")
        request = {"false": "no", "true": "yes"}.get(value, value)
    if conf.get("sessiontype", "default") != "default":
        return False
    if conf.get("stdinnull", "no") == "yes" or conf.get("forkafterauthentication") == "yes":
        return False
    has_command = bool(parsed.command) or bool(conf.get("remotecommand"))
    if request == "no":
        return False
    if not has_command:
        return True
    return request in ("yes", "force")


class RecordRequest:
    """What the command line and the environment ask to record (``path`` None: nothing)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.input = False
        self.overwrite = False
        self.from_option = False  # asked on the command line (not only the environment)


def record_request(argv: list[str], environ: dict[str, str]) -> tuple[RecordRequest, list[str]]:
    """sshwrap's own leading options taken out of ``argv`` (the rest goes to ssh), merged with
    ``SSHWRAP_RECORD`` / ``SSHWRAP_RECORD_INPUT``; ``ValueError`` for ``--record`` alone."""
    req = RecordRequest()
    req.path = environ.get("SSHWRAP_RECORD") or None
    req.input = environ.get("SSHWRAP_RECORD_INPUT", "") not in ("", "0")
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--record" or word.startswith("--record="):
            if word == "--record":
                if i + 1 >= len(argv):
                    raise ValueError("--record needs a file name")
                i += 1
                value = argv[i]
            else:
                value = word.partition("=")[2]
            if not value:
                raise ValueError("--record needs a file name")
            req.path, req.from_option = value, True
        elif word == "--record-input":
            req.input = True
        elif word == "--record-overwrite":
            req.overwrite = True
        else:
            break
        i += 1
    return req, argv[i:]


def _exec_ssh(ssh: str, argv: list[str]) -> int:
    try:
        sys.stdout.flush()
        os.execv(ssh, [ssh, *argv])
    except OSError as e:
        sys.stderr.write(f"sshwrap: cannot run {ssh}: {e.strerror}\n")
    return 255


def _interactive(ssh: str, argv: list[str], record: RecordRequest | None = None) -> int:
    import contextlib
    import signal
    import termios

    from ptyprocess import PtyProcess

    from .core.sshparse import parse_ssh_argv
    from .io.recording import Record, Recorder
    from .terminal.jobcontrol import child_stopped, resume_child, supervised_preexec
    from .terminal.modes import Attrs, get_attrs, get_size, raw_mode, set_size
    from .terminal.relay import relay

    stdin_fd, stdout_fd = 0, 1
    size = get_size(stdin_fd) or get_size(stdout_fd) or (24, 80)
    attrs = get_attrs(stdin_fd)

    def copy_modes() -> None:
        # The pty starts with the user's terminal modes, so ssh sends the remote the same
        # modes (erase char, iutf8 ...) it would send from the user's own terminal.
        if attrs is not None:
            termios.tcsetattr(0, termios.TCSANOW, attrs)

    recorder: Recorder | None = None
    if record is not None and record.path is not None:
        spec = Record(record.path, input=record.input, overwrite=record.overwrite)
        try:
            recorder = Recorder(spec, size, title=f"ssh {parse_ssh_argv(argv).destination}")
        except OSError as e:
            why = f"{e.filename}: {e.strerror}" if e.filename else str(e)
            sys.stderr.write(f"sshwrap: cannot record: {why}\n")
            return 255
    try:
        # ssh runs under a job-control supervisor (see sshwrap.terminal.jobcontrol) so ~^Z works.
        proc = PtyProcess.spawn(
            [ssh, "-tt", *argv], dimensions=size, preexec_fn=supervised_preexec(copy_modes)
        )
    except OSError as e:
        sys.stderr.write(f"sshwrap: cannot run {ssh}: {e.strerror or e}\n")
        if recorder is not None:
            recorder.close()
        return 255

    def forward(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    def alive() -> bool:
        return bool(proc.isalive())

    saved: Attrs | None = None

    def on_child() -> None:
        # ssh stopped itself (~^Z): give the user the terminal back and stop as ssh would
        # have; once continued (fg), go raw again and let ssh go on at the current size.
        if not child_stopped(proc.pid):
            return
        raw = get_attrs(stdin_fd)
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        os.kill(os.getpid(), signal.SIGTSTP)
        if raw is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, raw)
        now = get_size(stdin_fd)
        if now is not None:
            with contextlib.suppress(OSError):
                set_size(proc.fd, *now)
        resume_child(proc.pid)

    try:
        with raw_mode(stdin_fd) as saved:
            relay(
                proc.fd,
                stdin_fd=stdin_fd,
                stdout_fd=stdout_fd,
                is_alive=alive,
                on_signal=forward,
                on_child=on_child,
                tap=recorder,
            )
        # ssh has gone (EOF); collect its status.
        status: int | None = proc.wait() if proc.isalive() else proc.exitstatus
        signum = proc.signalstatus
    finally:
        if proc.isalive():
            proc.kill(signal.SIGKILL)
            proc.wait()
        proc.close(force=True)
        if recorder is not None:
            recorder.close()
            if recorder.error is not None:
                sys.stderr.write(f"sshwrap: recording {recorder.path} stopped: {recorder.error}\n")
    if signum is not None:
        # ssh itself died of a signal: die of the same one, so our parent sees what it
        # would have seen from ssh (the terminal is already restored).
        sys.stdout.flush()
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + int(signum)
    return int(status) if status is not None else 255


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sshwrap`` command; returns (or exits with) ssh's status."""
    args = sys.argv[1:] if argv is None else argv
    from .core.sshparse import SSHNotFound, find_ssh

    try:
        record, args = record_request(list(args), dict(os.environ))
    except ValueError as e:
        sys.stderr.write(f"sshwrap: {e}\n")
        return 255

    try:
        ssh = find_ssh()
    except SSHNotFound as e:
        sys.stderr.write(f"sshwrap: {e}\n")
        return 255
    from .terminal.modes import isatty

    if wants_tty(ssh, args, isatty(0)):
        return _interactive(ssh, args, record)
    if record.from_option:
        sys.stderr.write("sshwrap: --record: not an interactive session, nothing recorded\n")
    return _exec_ssh(ssh, args)
