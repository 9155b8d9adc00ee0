"""The README's examples run here, against a real sshd, so a README that drifts fails the suite.

Every fenced block of README.md is an example (tests/readme_blocks.py): a ```python block is
one, a shell block gives one per command line.  Each is one test, named by its heading and
README line.  Python examples run in this process, in one namespace per ``##`` section and in
README order (a later block may use what an earlier one defined: running one example alone
runs the earlier ones of its section first).  Shell lines run under ``sh -c``.

How the examples reach the test sshd without being edited: the README's hosts (``web1``,
``web2``, ``db1``) are Host aliases of one ``LocalSSHD``, in a client config that includes
the sshd's own.  sshwrap runs the ssh that ``SSHWRAP_SSH`` names (documented in the README),
and here that is a test-only wrapper script that execs the real ``ssh`` with ``-F`` that
config: nothing else of the call changes.  Each section runs in a directory of its own that
holds the local files the examples name (``build/app.tar.gz``, ``site/``, ``hosts.txt`` ...).
On the remote side (the login user's home) the module writes the ``app.log`` the examples
follow; what the examples put there is removed afterwards (and refused if it was there before),
and ``python3 -i``'s history file is put back as it was.

Examples that cannot run here, that need a terminal (run through a real pty), or that fail
because of an open bug are listed in ``PLANS`` with the reason; a ``PLANS`` entry that matches
no example (or several) fails ``test_plans_match_the_readme``.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ptyterm import Term
from readme_blocks import README, Example, read_examples

from sshwrap.testing import LocalSSHD

ALIASES = ("web1", "web2", "db1")
"""The host names the README's examples use, all made aliases of the test sshd."""

REMOTE_NAMES = ("app.tar.gz", "www", "app.log")
"""What the examples write into the remote home (relative remote paths): removed afterwards,
and refused if present before (they would be someone's own files)."""

REMOTE_HISTORY = ".python_history"
"""Written in the remote home by the examples' ``python3 -i``: put back as it was."""

BLOCK_TIMEOUT = 40.0
"""Bound on one example (a shell line, a pty program); generous for a loaded machine."""


@dataclass(frozen=True)
class Plan:
    """How one example runs, when not simply executed.

    ``kind``: ``run`` (executed; ``stdin`` is fed to a shell line), ``skip`` (cannot run here:
    ``reason`` says why), ``define`` (executed, but what it defines is the reader's to call),
    ``pty`` (run as a program in a real terminal: ``steps`` are pairs of a regex of the output
    to wait for, each after the previous one's match, and the text to type then; the program
    must then exit 0; it cannot use names that earlier examples defined).

    ``xfail``: the example fails because of an open bug, named here (issue 11's items another
    helper is fixing): a strict xfail, so the entry must go once the fix lands.  ``timeout``
    bounds the example (a hang is how some of those bugs show).
    """

    kind: str = "run"
    reason: str = ""
    steps: tuple[tuple[bytes, str], ...] = ()
    stdin: bytes = b""
    xfail: str = ""
    timeout: float = 2 * BLOCK_TIMEOUT


PLANS: dict[str, Plan] = {
    # Keys: a piece of the example's code that names it in the README, exactly once.
    "make demo": Plan(
        "skip",
        "it runs `make install` first (which may reach the package index); the demo program "
        "itself is tests/test_demo.py's subject",
    ),
    "installs what the tests need": Plan("skip", "it runs this whole suite, this module included"),
    "# interactive shell": Plan(
        "pty", steps=((rb"[$#] ", "echo READ''ME-OK; exit\r"), (b"README-OK", ""))
    ),
    "-J bastion -p 2222 db1": Plan(
        "skip", "a jump host and a port of the reader's network (jump= is tested in test_process)"
    ),
    "/opt/openssh/bin/ssh": Plan(
        "skip",
        "no OpenSSH under /opt here (SSHWRAP_SSH itself is what "
        "this module uses to reach its sshd)",
    ),
    'config="/etc/myapp/ssh_config"': Plan(
        "skip", "a config file, user, port, key and jump host of the reader's own setup"
    ),
    "def on_prompt(": Plan("pty", steps=((b"Password: ", "not-asked-for\r"),)),
    "sudo -k; sudo true": Plan("skip", "it needs sudo and the login user's password on the host"),
    "sudo_password=pw)": Plan(
        "skip", "it needs sudo, a password and nginx on the host (tests/test_sudo.py's subject)"
    ),
    "sudo_password=lambda": Plan(
        "skip", "it needs sudo, a password and nginx on 50 hosts (tests/test_fanout_sudo.py)"
    ),
    's.sendline("import curses")': Plan(
        "pty",
        steps=(
            # s.interact() shows the prompt expect() had not consumed: hand control back.
            (rb"import curses\r\n>>> ", "\x1d"),
            # c.interact()'s login shell prompts: leave it with a status, which comes back.
            (rb"[$#] ", "exit 3\r"),
            (rb"the shell exited with 3", ""),
        ),
    ),
    "-H - --outdir": Plan("run", stdin=b"web1\nweb2\n"),
    '"dc1-gw": "dc1-web[001-500]"': Plan(
        "skip", "gateways and 1,000 hosts of the reader's network (tests/test_gateway.py)"
    ),
    '"gw1": "gw2,leaf[1-5]"': Plan(
        "skip", "two levels of gateways of the reader's network (tests/test_gateway_netns.py)"
    ),
    "sshwrap --record session.cast web1": Plan(
        "pty", steps=((rb"[$#] ", "echo REC''ORDED; exit\r"), (b"RECORDED", ""))
    ),
    "def test_deploy(": Plan("define", "my_deploy is the reader's code: the test is only defined"),
}


# -- the examples and their plans -------------------------------------------------------------

EXAMPLES = read_examples()


def plan_of(ex: Example) -> Plan | None:
    """The entry of ``PLANS`` whose key is in this example's code (None: just run it)."""
    return next((p for key, p in PLANS.items() if key in ex.code), None)


def test_plans_match_the_readme() -> None:
    """Every entry names exactly one example, and no example has two: a stale entry fails
    here instead of leaving an example unplanned or planned by accident."""
    for key in PLANS:
        hits = [ex.id for ex in EXAMPLES if key in ex.code]
        assert len(hits) == 1, f"PLANS key {key!r} matches {hits or 'no example'}"
    for ex in EXAMPLES:
        keys = [key for key in PLANS if key in ex.code]
        assert len(keys) <= 1, f"{ex.id} matches several PLANS keys: {keys}"


# -- the world the examples run in -------------------------------------------------------------


@dataclass
class World:
    """One sshd, the ssh wrapper, a directory per section and the namespaces."""

    sshd: LocalSSHD
    root: Path
    env: dict[str, str]
    remote_home: Path
    namespaces: dict[str, dict[str, object]] = field(default_factory=dict)
    outcomes: dict[str, BaseException | None] = field(default_factory=dict)

    def cwd(self, ex: Example) -> Path:
        """The section's own working directory, with the local files the examples name."""
        d = self.root / re.sub(r"[^a-z0-9]+", "-", ex.section.lower()).strip("-")
        if not d.exists():
            d.mkdir()
            (d / "build").mkdir()
            (d / "build" / "app.tar.gz").write_bytes(os.urandom(300_000))
            (d / "site").mkdir()
            (d / "site" / "index.html").write_text("<h1>hello</h1>\n")
            (d / "logs").mkdir()
            (d / "backup").mkdir()
            (d / "hosts.txt").write_text("# the README's hosts\n" + "\n".join(ALIASES) + "\n")
        return d


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A LocalSSHD whose aliases are the README's hosts, reached through ``SSHWRAP_SSH``."""
    with LocalSSHD() as sshd:
        root = tmp_path_factory.mktemp("readme")
        config = root / "ssh_config"
        config.write_text(
            f"Host {' '.join(ALIASES)}\n"
            f"    HostName {sshd.addresses[0]}\n"
            "Host *\n"
            f"Include {sshd.config}\n"
        )
        real_ssh = shutil.which("ssh")
        assert real_ssh is not None
        wrapper = root / "ssh"
        argv = shlex.join([real_ssh, "-F", str(config)])
        wrapper.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        wrapper.chmod(0o755)
        home = Path(pwd.getpwnam(sshd.user).pw_dir)
        present = [n for n in REMOTE_NAMES if (home / n).exists()]
        assert not present, f"the examples would overwrite {present} in {home}: move them away"
        env = {
            "SSHWRAP_SSH": str(wrapper),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        history = home / REMOTE_HISTORY
        saved = history.read_bytes() if history.exists() else None
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            try:
                # The log the examples follow (tail -f app.log): a line, then one with "error".
                log = home / "app.log"
                log.write_text("starting\nerror: disk full\n")
                shutil.chown(log, sshd.user)
                yield World(sshd, root, dict(os.environ), home)
            finally:
                for n in REMOTE_NAMES:
                    p = home / n
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    elif p.exists():
                        p.unlink()
                if saved is None:
                    history.unlink(missing_ok=True)
                else:
                    history.write_bytes(saved)


# -- running one example ------------------------------------------------------------------------


def run_python(world: World, ex: Example) -> None:
    """Execute a python example in its section's namespace (README line numbers kept)."""
    ns = world.namespaces.setdefault(ex.section, {"__name__": "__readme__"})
    exec(compile("\n" * (ex.line - 1) + ex.code, str(README), "exec"), ns)


def run_in_order(world: World, ex: Example, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the section's earlier python examples (once each), then this one; raise its error."""
    monkeypatch.chdir(world.cwd(ex))
    for prior in EXAMPLES:
        if prior == ex:
            break
        plan = plan_of(prior)
        if (
            prior.section != ex.section
            or prior.lang != "python"
            or prior.id in world.outcomes
            or (plan is not None and plan.kind in ("skip", "pty"))
        ):
            continue
        try:
            run_python(world, prior)
            world.outcomes[prior.id] = None
        except Exception as e:
            world.outcomes[prior.id] = e
    if ex.id in world.outcomes:
        err = world.outcomes[ex.id]
        if err is not None:
            raise err
        return
    try:
        run_python(world, ex)
    except Exception as e:
        world.outcomes[ex.id] = e
        raise
    world.outcomes[ex.id] = None


def run_shell(world: World, ex: Example, plan: Plan | None) -> None:
    """Run one shell line; it must exit 0."""
    r = subprocess.run(
        ["sh", "-c", ex.code],
        input=plan.stdin if plan else b"",
        capture_output=True,
        cwd=world.cwd(ex),
        env=world.env,
        timeout=BLOCK_TIMEOUT,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def run_pty(world: World, ex: Example, plan: Plan) -> None:
    """Run the example as a program in a real terminal, typing ``plan.steps``; it must exit 0."""
    if ex.lang == "python":
        script = world.cwd(ex) / f"example_L{ex.line}.py"
        script.write_text("\n" * (ex.line - 1) + ex.code)
        argv = [sys.executable, str(script)]
    else:
        argv = ["sh", "-c", ex.code]
    cd = f'cd {shlex.quote(str(world.cwd(ex)))} && exec "$@"'
    t = Term(["sh", "-c", cd, "sh", *argv], env=world.env, screen=False)
    try:
        start = 0
        for wait_for, typed in plan.steps:
            start = t.wait_raw(re.compile(wait_for), BLOCK_TIMEOUT, start).end()
            t.send(typed)
        status = t.wait_exit(BLOCK_TIMEOUT)
        assert status == (0, None), (status, bytes(t.raw[-2000:]))
    finally:
        t.close()


def _param(ex: Example) -> object:
    """The example as a test parameter: its id, its xfail, its bound (pytest-timeout's: an
    example run in this process has no other)."""
    plan = plan_of(ex)
    marks = []
    if plan is not None and plan.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=plan.xfail))
    marks.append(pytest.mark.timeout(plan.timeout if plan else 2 * BLOCK_TIMEOUT))
    return pytest.param(ex, id=ex.id, marks=marks)


# A deprecated call in an example (the warning's module is the examples' namespace) is drift.
@pytest.mark.filterwarnings("error::DeprecationWarning:__readme__")
@pytest.mark.parametrize("ex", [_param(ex) for ex in EXAMPLES])
def test_readme_example(ex: Example, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example runs as the README shows it, against the test sshd."""
    plan = plan_of(ex)
    if plan is not None and plan.kind == "skip":
        pytest.skip(f"README line {ex.line} not run: {plan.reason}")
    if plan is not None and plan.kind == "pty":
        run_pty(world, ex, plan)
    elif ex.lang == "sh":
        run_shell(world, ex, plan)
    else:
        run_in_order(world, ex, monkeypatch)
