"""Reading ssh's own command line the way ssh(1) does (kept light: the command imports it).

``parse_ssh_argv`` follows OpenSSH's ``ssh.c``: POSIX getopt with ssh's option
string, where options may also follow the destination (ssh restarts getopt once after it),
and ``--`` ends the options.  sshwrap reads only what it needs to decide whether ssh would
use a terminal; everything else goes to ssh untouched.
"""

from __future__ import annotations

import os

__all__ = ["SSH_OPTSTRING", "ParsedSSHArgv", "SSHNotFound", "find_ssh", "parse_ssh_argv"]

# OpenSSH 9.x ssh.c getopt string: a letter followed by ':' takes an argument.
SSH_OPTSTRING = "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:MNO:PQ:R:S:TVw:W:XYy"


def _takes_arg() -> set[str]:
    out = set()
    for i, ch in enumerate(SSH_OPTSTRING):
        if ch != ":" and i + 1 < len(SSH_OPTSTRING) and SSH_OPTSTRING[i + 1] == ":":
            out.add(ch)
    return out


_WITH_ARG = _takes_arg()
_FLAGS = set(SSH_OPTSTRING.replace(":", "")) - _WITH_ARG


class ParsedSSHArgv:
    """What ssh would make of its arguments, as far as sshwrap needs to know."""

    def __init__(self) -> None:
        self.options: list[tuple[str, str | None]] = []
        self.destination: str | None = None
        self.command: list[str] = []
        self.error = False  # an argument ssh itself would reject (ssh prints its usage)

    def has(self, letter: str) -> bool:
        """True if option ``-letter`` was given."""
        return any(o == letter for o, _ in self.options)

    def values(self, letter: str) -> list[str]:
        """The arguments given to option ``-letter``, in order."""
        return [v for o, v in self.options if o == letter and v is not None]

    def o_option(self, key: str) -> str | None:
        """The first ``-o Key=Value`` for ``key`` (case-insensitive), as ssh takes the first."""
        want = key.lower()
        for value in self.values("o"):
            k, sep, v = value.replace("=", " ", 1).partition(" ")
            if sep and k.strip().lower() == want:
                return v.strip()
        return None


def _getopt(args: list[str], out: ParsedSSHArgv) -> tuple[int, bool]:
    """Parse options from ``args``; return (index of first non-option, saw ``--``)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return i + 1, True
        if not arg.startswith("-") or arg == "-":
            return i, False
        j = 1
        while j < len(arg):
            ch = arg[j]
            if ch in _WITH_ARG:
                if j + 1 < len(arg):
                    out.options.append((ch, arg[j + 1 :]))
                elif i + 1 < len(args):
                    i += 1
                    out.options.append((ch, args[i]))
                else:
                    out.error = True
                    out.options.append((ch, None))
                break
            if ch not in _FLAGS:
                out.error = True
            out.options.append((ch, None))
            j += 1
        i += 1
    return i, False


def parse_ssh_argv(argv: list[str]) -> ParsedSSHArgv:
    """Split ssh's arguments (without the program name) like ssh.c does."""
    out = ParsedSSHArgv()
    n, terminated = _getopt(argv, out)
    rest = argv[n:]
    if rest:
        out.destination = rest[0]
        rest = rest[1:]
        if rest and not terminated:
            # ssh restarts getopt once after the destination (``ssh host -t cmd``).
            m, _ = _getopt(rest, out)
            rest = rest[m:]
        out.command = rest
    return out


class SSHNotFound(FileNotFoundError):
    """No ssh client binary could be found."""


def find_ssh() -> str:
    """The ssh binary to run: ``$SSHWRAP_SSH`` if set, else ``ssh`` from ``PATH``."""
    name = os.environ.get("SSHWRAP_SSH") or "ssh"
    if os.sep in name:
        if os.access(name, os.X_OK) and not os.path.isdir(name):
            return name
        raise SSHNotFound(f"ssh client not found or not executable: {name}")
    # A plain PATH walk: shutil.which would cost the command ~5 ms of imports at start-up.
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise SSHNotFound(f"ssh client {name!r} not found on PATH; install OpenSSH's client")
