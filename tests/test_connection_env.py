"""ssh_config's SetEnv / SendEnv reach commands run over a Connection, as they do with ssh."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import sshwrap
from sshwrap.testing import LocalSSHD


def test_setenv_and_sendenv_from_config(local_sshd_factory: Callable[..., LocalSSHD]) -> None:
    sshd = local_sshd_factory(
        extra_client_config=["SetEnv LC_SSHWRAP_SET=from-config", "SendEnv LC_SSHWRAP_SENT"]
    )
    os.environ["LC_SSHWRAP_SENT"] = "from-env"
    try:
        cmd = 'printf "%s/%s" "$LC_SSHWRAP_SET" "$LC_SSHWRAP_SENT"'
        plain = subprocess.run(
            sshd.ssh(sshd.host, cmd), capture_output=True, check=True, timeout=60
        ).stdout
        assert plain == b"from-config/from-env"
        with sshwrap.connect(sshd.host, config=sshd.config) as c:
            assert c.check_output(cmd) == plain
    finally:
        del os.environ["LC_SSHWRAP_SENT"]
