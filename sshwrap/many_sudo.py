"""``sshwrap-many --sudo``: the sudo keywords of its arguments (:mod:`sshwrap.many_cli`).

The password is read once, before any host starts: from ``--sudo-password-file`` (one
trailing newline dropped) or asked on the terminal (``/dev/tty``, not echoed).  No terminal
and no file, a file that cannot be read, ``--put``/``--get`` or gateways with ``--sudo``: a
usage error (exit 64).
"""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

__all__ = ["sudo_keywords"]


def sudo_keywords(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The sudo keywords of ``--sudo``: the password read from its file, or asked on the
    terminal, once (before any host starts); Ctrl-C at the prompt goes up as
    ``KeyboardInterrupt``."""
    if not args.sudo:
        if args.sudo_user is not None or args.sudo_password_file is not None:
            ap.error("--sudo-user and --sudo-password-file go with --sudo")
        return {}
    if args.put or args.get or args.via or args.topology:
        ap.error(
            "--sudo is for a command run directly (not --put/--get, nor gateways: sudo "
            "through gateways is not supported yet)"
        )
    path = args.sudo_password_file
    if path is not None:
        try:
            with open(os.path.expanduser(path), "rb") as f:
                password = f.read().removesuffix(b"\n")
        except OSError as e:
            ap.error(f"--sudo-password-file {path}: {e.strerror or e}")
    else:
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError:
            ap.error(
                "--sudo asks the password on a terminal and there is none (/dev/tty): "
                "give --sudo-password-file FILE"
            )
        try:
            password = getpass.getpass("sshwrap-many: sudo password: ").encode()
        except EOFError:
            ap.error("--sudo: no password was read from the terminal")
    return {"sudo": True, "sudo_user": args.sudo_user, "sudo_password": password}
