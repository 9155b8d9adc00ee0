"""API parity with :mod:`subprocess` (issue 11): each behaviour through every face it applies
to with one test body, and through ``subprocess`` itself where subprocess defines it.

Faces (tests/parity.py): ``proxy`` (a Connection on mux channels), ``fallback`` (a Connection
on ``ssh -S``), ``plain`` (one ssh per call), each ``sync`` and ``async``, and the reference
``subprocess`` (the same call made locally, ``sh -c`` for a ``str``).  The faces are opened once
for the module.  Real sshd, real ssh.
"""

from __future__ import annotations

import contextlib
import locale
import pathlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from parity import FLAVOURS, MODES, Face, SubprocessFace, open_face

import sshwrap
from sshwrap.testing import LocalSSHD

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
SSH_FACES = tuple(f"{m}-{f}" for m in MODES for f in FLAVOURS)
SYNC_FACES = tuple(f"{m}-sync" for m in MODES)
REFERENCE = "subprocess"


def apis(
    names: tuple[str, ...] = (*SSH_FACES, REFERENCE),
    marks: dict[str, pytest.MarkDecorator] | None = None,
) -> list[Any]:
    """Face names as parameters, some with a mark."""
    marks = marks or {}
    return [pytest.param(n, id=n, marks=[marks[n]] if n in marks else []) for n in names]


@pytest.fixture(scope="module")
def home(local_sshd: LocalSSHD) -> str:
    """The remote user's home (where a remote command starts), with a directory ``-`` in it."""
    r = sshwrap.run(local_sshd.host, "mkdir -p ./-; pwd", config=local_sshd.config, stdout=PIPE)
    return str(r.stdout.decode().strip())


@pytest.fixture(scope="module")
def opened(local_sshd: LocalSSHD, home: str) -> Iterator[Callable[[str], Face]]:
    """``get(name)``: the face of that name, opened once for the module."""
    faces: dict[str, Face] = {}
    with contextlib.ExitStack() as stack:

        def get(name: str) -> Face:
            if name not in faces:
                if name == REFERENCE:
                    faces[name] = SubprocessFace(local_sshd, home)
                else:
                    mode, flavour = name.split("-")
                    faces[name] = stack.enter_context(open_face(mode, flavour, local_sshd))
            return faces[name]

        yield get


@pytest.fixture
def face(request: pytest.FixtureRequest, opened: Callable[[str], Face]) -> Face:
    """The face the test is parametrized with."""
    return opened(request.param)


def raised(call: Callable[[], Any]) -> BaseException:
    """What ``call`` raised (AssertionError if it returned)."""
    try:
        got = call()
    except Exception as e:
        return e
    raise AssertionError(f"no exception: {got!r}")


# -- 1. input= with stdin= ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("face", "stdin"),
    [
        pytest.param(
            n,
            s,
            id=f"{n}-{s}",
        )
        for n in (*SSH_FACES, REFERENCE)
        for s in ("PIPE", "DEVNULL", "file")
    ],
    indirect=["face"],
)
def test_input_with_stdin_is_refused(face: Face, stdin: str) -> None:
    with tempfile.TemporaryFile() as f:
        spec = {"PIPE": PIPE, "DEVNULL": DEVNULL, "file": f}[stdin]
        e = raised(lambda: face.run("cat", input=b"x", stdin=spec, capture_output=True))
    assert type(e) is ValueError, e
    assert str(e) == "stdin and input arguments may not both be used."


@pytest.mark.parametrize("face", apis(), indirect=True)
def test_input_with_stdin_none_is_input(face: Face) -> None:
    r = face.run("cat", input=b"x", stdin=None, capture_output=True)
    assert (r.returncode, r.stdout) == (0, b"x")


# -- 2. universal_newlines= -----------------------------------------------------------------
@pytest.mark.parametrize("face", apis(), indirect=True)
def test_universal_newlines_is_text(face: Face) -> None:
    r = face.run("printf 'a\\r\\nb\\n'", capture_output=True, universal_newlines=True)
    assert (r.stdout, r.stderr) == ("a\nb\n", "")


@pytest.mark.parametrize("face", apis(), indirect=True)
def test_text_and_universal_newlines_disagreeing(face: Face) -> None:
    e = raised(lambda: face.run("true", text=True, universal_newlines=False))
    assert type(e) is subprocess.SubprocessError, e
    assert "Cannot disambiguate when both text and universal_newlines" in str(e)


@pytest.mark.parametrize("face", apis((*SYNC_FACES, REFERENCE)), indirect=True)
def test_popen_text_and_universal_newlines_disagreeing(face: Face) -> None:
    e = raised(lambda: face.start("true", text=False, universal_newlines=True))
    assert type(e) is subprocess.SubprocessError, e


def subprocess_encoding() -> str:
    """What ``subprocess.Popen(text=True).encoding`` is here (Python >= 3.10: the locale's
    encoding, "utf-8" in UTF-8 mode; None before 3.10)."""
    with subprocess.Popen(["true"], stdout=DEVNULL, text=True) as p:
        encoding: str = cast(Any, p).encoding
    return encoding


@pytest.mark.parametrize("face", apis((*SYNC_FACES, REFERENCE)), indirect=True)
@pytest.mark.parametrize("keyword", ["text", "universal_newlines"])
def test_popen_text_encoding_is_subprocess_s(face: Face, keyword: str) -> None:
    p: Any = face.start("printf 'x\\r\\ny'", stdout=PIPE, **{keyword: True})
    try:
        assert p.p.encoding == subprocess_encoding() == locale.getpreferredencoding(False)
        assert p.p.stdout.encoding == subprocess_encoding()
        out, _ = p.communicate()
    finally:
        p.wait()
    assert out == "x\ny"


@pytest.mark.parametrize("face", apis(SYNC_FACES), indirect=True)
def test_tty_popen_text_encoding_is_subprocess_s(face: Face) -> None:
    p: Any = face.start("echo x", tty=True, stdout=PIPE, text=True)
    try:
        assert p.p.encoding == subprocess_encoding()
        out, _ = p.communicate()
    finally:
        p.wait()
    assert out == "x\n"


# -- 4. getoutput / getstatusoutput ---------------------------------------------------------


@pytest.mark.parametrize("face", apis(), indirect=True)
def test_getstatusoutput(face: Face) -> None:
    # One trailing newline goes, the status is the command's; stderr is in the output.
    assert face.getstatusoutput("printf 'out\\n\\n'; exit 3") == (3, "out\n")
    assert face.getstatusoutput("echo err >&2") == (0, "err")


@pytest.mark.parametrize("face", apis(), indirect=True)
def test_getoutput(face: Face) -> None:
    assert face.getoutput("printf 'a\\r\\nb\\n'; exit 1") == "a\nb"


# -- 5. size= without tty=True --------------------------------------------------------------
@pytest.mark.parametrize(
    "face",
    apis(SSH_FACES),
    indirect=True,
)
def test_size_without_tty_is_refused(face: Face) -> None:
    e = raised(lambda: face.run("true", size=(30, 100)))
    assert type(e) is ValueError, e
    assert "size" in str(e) and "tty=True" in str(e)


@pytest.mark.parametrize("face", apis(SYNC_FACES), indirect=True)
def test_popen_size_without_tty_is_refused(face: Face) -> None:
    e = raised(lambda: face.start("true", size=(30, 100)))
    assert type(e) is ValueError, e


# -- 6. bytes and os.PathLike arguments -----------------------------------------------------
@pytest.mark.parametrize("face", apis(), indirect=True)
def test_bytes_arguments_arrive_unchanged(face: Face) -> None:
    r = face.run([b"printf", b"%s|", b"a\xffb", pathlib.PurePosixPath("x/y")], capture_output=True)
    assert (r.returncode, r.stdout) == (0, b"a\xffb|x/y|")


@pytest.mark.parametrize("face", apis(), indirect=True)
def test_an_int_argument_names_what_is_accepted(face: Face) -> None:
    e = raised(lambda: face.run(["echo", 5]))
    assert type(e) is TypeError, e
    assert "str, bytes or os.PathLike" in str(e) and "int" in str(e), e


# -- 7. cwd starting with "-" ----------------------------------------------------------------
@pytest.mark.parametrize("face", apis(), indirect=True)
def test_cwd_dash_is_the_directory_named_so(face: Face, home: str) -> None:
    r = face.run("pwd", cwd="-", capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{home}/-\n", "")


# -- 8. tty: stderr is merged, so what is captured of it is empty ------------------------------
@pytest.mark.parametrize("face", apis(SSH_FACES), indirect=True)
@pytest.mark.parametrize("text", [False, True])
def test_tty_capture_gives_an_empty_stderr(face: Face, text: bool) -> None:
    r = face.run("echo out; echo err >&2", tty=True, capture_output=True, text=text)
    nl, empty = ("\n", "") if text else ("\r\n", "")
    assert (r.returncode, r.stderr) == (0, empty if text else b"")
    assert r.stdout == (f"out{nl}err{nl}" if text else b"out\r\nerr\r\n")


@pytest.mark.parametrize("face", apis(SYNC_FACES), indirect=True)
def test_tty_popen_communicate_gives_an_empty_stderr(face: Face) -> None:
    p = face.start("echo out; echo err >&2", tty=True, stdout=PIPE, stderr=PIPE)
    out, err = p.communicate()
    assert (p.wait(), out, err) == (0, b"out\r\nerr\r\n", b"")


# -- 9. repr(Popen) ---------------------------------------------------------------------------
@pytest.mark.parametrize("face", apis((*SYNC_FACES, REFERENCE)), indirect=True)
def test_popen_repr_is_subprocess_s_with_host_and_state(face: Face) -> None:
    p: Any = face.start(["cat"], stdin=PIPE)
    try:
        running = repr(p.p)
        assert running.startswith(f"<{type(p.p).__name__}: returncode: None args: ['cat']"), running
        if face.name != REFERENCE:
            assert f"host: {p.p.host!r}" in running and "running" in running, running
    finally:
        p.communicate()
    done = repr(p.p)
    assert done.startswith(f"<{type(p.p).__name__}: returncode: 0 args: ['cat']"), done
    if face.name != REFERENCE:
        assert "running" not in done and "exited" in done, done
