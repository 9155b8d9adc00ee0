"""File descriptors for a fan-out: what a host in flight holds, and whether the limit allows it.

Every host in flight holds a handful of fds (:data:`FDS_PER_HOST`); :func:`check_fd_budget`
refuses, before anything starts, a concurrency that ``RLIMIT_NOFILE`` cannot hold, raising
the soft limit up to the hard one first when that is enough.
"""

from __future__ import annotations

import contextlib
import os
import resource

from ..errors import SSHWrapError

__all__ = ["FDS_PER_HOST", "FdBudgetError", "check_fd_budget"]

FDS_PER_HOST = 6
"""File descriptors sshwrap holds per host in flight: stdout, stderr, the log FIFO (read end
and, until ssh opens it, a write end), the pidfd, and a stdin pipe when ``input`` is given."""

# Pipes that exist only while a child is being started (Popen's ends, its error pipe,
# /dev/null), plus what the caller may open for each result (``--outdir`` files).
_SPAWN_FDS = 10
_RESERVE_FDS = 16


class FdBudgetError(SSHWrapError, ValueError):
    """The requested concurrency needs more file descriptors than ``RLIMIT_NOFILE`` allows."""

    def __init__(self, concurrency: int, needed: int, soft: int, hard: int, most: int) -> None:
        self.concurrency = concurrency
        self.needed = needed
        self.soft = soft
        self.hard = hard
        self.max_concurrency = most
        hard_s = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        super().__init__(
            f"concurrency {concurrency} needs about {needed} open files "
            f"({FDS_PER_HOST} per host in flight), but the open-files limit is {soft} "
            f"(hard limit {hard_s}); use a concurrency of at most {most}, "
            "or raise the limit (ulimit -n)"
        )


def _open_fds() -> int:
    for d in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(d))
    return 32


def check_fd_budget(concurrency: int, *, extra: int = 0) -> int:
    """Make sure ``concurrency`` hosts in flight fit the open-files limit; return the need.

    The soft ``RLIMIT_NOFILE`` is raised (up to the hard limit) when that is enough;
    otherwise ``FdBudgetError`` says the largest concurrency that fits.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    base = _open_fds() + _SPAWN_FDS + _RESERVE_FDS + extra
    needed = base + concurrency * FDS_PER_HOST
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return needed
    if hard == resource.RLIM_INFINITY or needed <= hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return needed
    limit = soft if hard == resource.RLIM_INFINITY else max(soft, hard)
    most = max(0, (limit - base) // FDS_PER_HOST)
    raise FdBudgetError(concurrency, needed, soft, hard, most)
