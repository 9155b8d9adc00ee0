"""sshwrap as one archive for a gateway's ``python3``: built in memory, sent over ssh's stdin.

:func:`package_zip` zips every ``.py`` file of the installed ``sshwrap`` package (once per
process; nothing is written to disk; an agent that runs from such an archive sends that one on
to the gateway behind it).  :func:`bootstrap_command` is the remote command that
receives it: ``python3 -I -S -c CODE sshwrap-gateway-agent N``, where CODE (a few lines, stdlib
only) checks the interpreter's version against the package's ``requires-python``, reads ``N``
bytes of archive from stdin into an anonymous temporary file (``tempfile.TemporaryFile``: it
has no name on disk, so nothing is left behind whatever happens), imports the package from it
through ``zipimport`` (by the file's ``/proc/self/fd`` path) and runs
``sshwrap.core.gateway_agent``, which reads the rest of stdin.  ``-S`` keeps site-packages out:
the agent runs on the standard library and the archive alone.

Exit statuses the control side reads: :data:`EXIT_OLD_PYTHON` (the version check failed: the
message on stderr says which version), 127 (the shell found no ``python3``).
"""

from __future__ import annotations

import functools
import io
import shlex
import zipfile
import zipimport
from pathlib import Path

__all__ = [
    "AGENT_MARK",
    "EXIT_OLD_PYTHON",
    "MIN_PYTHON",
    "bootstrap_command",
    "package_zip",
]

MIN_PYTHON = (3, 11)
"""The oldest Python the package runs on (pyproject's ``requires-python``)."""
EXIT_OLD_PYTHON = 97
"""The bootstrap's exit status when the gateway's ``python3`` is older than :data:`MIN_PYTHON`."""
_LEVEL = 1
AGENT_MARK = "sshwrap-gateway-agent"
"""An argument of the gateway's ``python3`` command line that names it for what it is."""

_BOOTSTRAP = """\
import sys
if sys.version_info < {min!r}:
    sys.stderr.write("sshwrap: python3 %s is older than {min_text}\\n" % sys.version.split()[0])
    sys.exit({old})
import tempfile
n = int(sys.argv[2])
data = sys.stdin.buffer.read(n)
if len(data) != n:
    sys.exit("sshwrap: the archive was cut short")
f = tempfile.TemporaryFile()
f.write(data)
f.flush()
del data
sys.path.insert(0, "/proc/self/fd/%d" % f.fileno())
import runpy
runpy.run_module("sshwrap.core.gateway_agent", run_name="__main__", alter_sys=True)
"""


@functools.cache
def package_zip() -> bytes:
    """The ``sshwrap`` package's ``.py`` files as a zip archive (built once per process; on a
    gateway, whose package came as such an archive, that archive: it is sent on as it is)."""
    loader = globals().get("__loader__")
    if isinstance(loader, zipimport.zipimporter):
        with open(loader.archive, "rb") as f:
            return f.read()
    root = Path(__file__).resolve().parent.parent
    buf = io.BytesIO()
    # Deflate level 1: half the CPU of the default level (the build is a fresh process's
    # first run's cost) for an archive 13% larger (the bytes cost ssh next to nothing).
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=_LEVEL) as z:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent)
            if "__pycache__" in rel.parts:
                continue
            info = zipfile.ZipInfo(str(rel), date_time=(2000, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, path.read_bytes(), compresslevel=_LEVEL)
    return buf.getvalue()


def bootstrap_command(size: int, python: str = "python3") -> str:
    """The remote command that loads an archive of ``size`` bytes from stdin and runs the
    agent (``python`` as the remote shell finds it)."""
    code = _BOOTSTRAP.format(
        min=MIN_PYTHON, min_text=".".join(map(str, MIN_PYTHON)), old=EXIT_OLD_PYTHON
    )
    return shlex.join([python, "-I", "-S", "-c", code, AGENT_MARK, str(size)])
