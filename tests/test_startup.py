"""What the commands import before they run: only what a run uses.

``sshwrap-many`` runs one command on many hosts; its start-up is part of every warm run
(``--persist``), so it must not load what only other paths use: the fleet copy and SFTP
(``--put``/``--get``), the gateways (``--via``), ``Connection``/``Shell``, the ``ssh -S``
fallback and ``Popen`` on a channel.  Checked in a fresh interpreter (this one has imported
everything already).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules of sshwrap that a plain sshwrap-many command run (flat, with or without --persist)
# never uses: each is imported by the path that needs it, when it runs.
NOT_AT_START = (
    "sshwrap.fleet",
    "sshwrap.core.fleet_copy",
    "sshwrap.transfer",
    "sshwrap.io.sftp_session",
    "sshwrap.io.sftp_files",
    "sshwrap.protocol.sftp",
    "sshwrap.connection",
    "sshwrap.core.shell",
    "sshwrap.core.gateway_run",
    "sshwrap.core.gateway_waves",
    "sshwrap.core.gateway_wire",
    "sshwrap.io.bundle",
    "sshwrap.core.ssh_run",
    "sshwrap.core.channel_popen",
    "sshwrap.core.invocation",
    "sshwrap.io.pty",
)


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout))


def test_sshwrap_many_imports_only_what_a_run_uses() -> None:
    loaded = _loaded_after("import sshwrap.many_cli")
    assert "sshwrap.fanout" in loaded  # the check sees the run's own modules
    assert sorted(m for m in NOT_AT_START if m in loaded) == []


@pytest.mark.parametrize(
    ("statement", "needs"),
    [
        ("from sshwrap.fleet import put_many", "sshwrap.core.fleet_copy"),
        ("from sshwrap.fanout import plan_run", "sshwrap.fanout"),
        ("from sshwrap.core.commands import start_command", "sshwrap.core.commands"),
    ],
)
def test_the_paths_still_import_what_they_use(statement: str, needs: str) -> None:
    assert needs in _loaded_after(statement)


def test_lazy_imports_resolve() -> None:
    """Each function that imports lazily finds its names (a typo would fail only at run)."""
    code = (
        "import sshwrap.fanout as f, sshwrap.core.commands as c\n"
        "from sshwrap.core.gateway_run import TreeRun\n"
        "from sshwrap.core.gateway_waves import TreeWaves\n"
        "from sshwrap.core.invocation import MASTER_GONE, MasterGoneError, SessionRefusedError\n"
        "from sshwrap.core.ssh_run import run_ssh, tty_input\n"
        "from sshwrap.core.channel_popen import start_popen\n"
        "from sshwrap.fleet import CopyInterrupted, CopyResult, get_many, put_many\n"
        "from sshwrap.core.host_result import CopyResult as R\n"
        "assert R is CopyResult\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
