"""Writers that replace things on disk, tried as an attacker and a careless user would (issue 8, items 1, 5, 6
and the output-directory items): `--force` replaces only a prunevlm export, a signal or a kill leaves nothing
that the next run does not clean, two exports to one `--out` never both win, and every refusal is one line.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibration.options import CalibrationError, CalibrationOptions
from contract import files
from contract.errors import ExportError
from engines.plan import BuildError, BuildOptions
from tests.helpers import ROOT, assert_one_line, assert_refused, cli, leftovers, snapshot

KEEP = 32


def export(out: Path, checkpoint: Path, force: bool = False) -> Path:
    from export.api import Progress, run
    from export.spec import ExportOptions

    options = ExportOptions("llava15", KEEP, model=str(checkpoint), out=out, force=force, validate=False)
    return run(options, Progress(stream=io.StringIO()))


def _left(parent: Path) -> list[str]:
    return leftovers(parent) + sorted(p.name for p in parent.glob(".*.lock"))


def nothing_left(parent: Path) -> None:
    assert _left(parent) == [], f"left behind: {_left(parent)}"


def nothing_left_soon(parent: Path, why: str = "") -> None:
    """What a writer that died without unwinding left is removed by its janitor, which notices at once."""
    deadline = time.monotonic() + 10
    while _left(parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _left(parent) == [], f"left behind: {_left(parent)} {why}"


def fake_export(directory: Path) -> Path:
    """A directory --force may replace: an export of an older format version is still prunevlm's."""
    directory.mkdir()
    (directory / "manifest.json").write_text('{"format_version": 1}')
    (directory / "vision.onnx").write_bytes(b"old graph")
    return directory


# ---------------------------------------------------------------- --force replaces only an export


def _hostile(tmp: Path, case: str) -> Path:
    if case == "foreign directory":
        (tmp / "thesis").mkdir()
        (tmp / "thesis" / "chapter1.tex").write_text("years of work")
        return tmp / "thesis"
    if case == "regular file":
        (tmp / "notes.txt").write_text("the user's notes")
        return tmp / "notes.txt"
    if case == "character device":  # what /dev/null is, made here so a bug cannot touch the real one
        try:
            os.mknod(tmp / "null", 0o20666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root")
        return tmp / "null"
    if case == "fifo":
        os.mkfifo(tmp / "fifo")
        return tmp / "fifo"
    if case == "symlink to an export":
        fake_export(tmp / "real")
        (tmp / "link").symlink_to("real")
        return tmp / "link"
    if case == "under a regular file":
        (tmp / "file").write_text("x")
        return tmp / "file" / "out"
    if case == "manifest without format_version":
        (tmp / "other").mkdir()
        (tmp / "other" / "manifest.json").write_text('{"name": "some other tool"}')
        return tmp / "other"
    if case == "manifest.json is a fifo":  # must not hang reading it
        (tmp / "trap").mkdir()
        os.mkfifo(tmp / "trap" / "manifest.json")
        return tmp / "trap"
    return Path(case)  # ".", "..": relative to the test's working directory, tmp


HOSTILE = {
    "foreign directory": "not a prunevlm export",
    "regular file": "regular file",
    "character device": "character device",
    "fifo": "FIFO",
    "symlink to an export": "symbolic link",
    "under a regular file": "not a directory",
    "manifest without format_version": "not a prunevlm export",
    "manifest.json is a fifo": "not a prunevlm export",
    ".": "does not name a directory",
    "..": "does not name a directory",
}


def _state(tmp: Path) -> dict[str, tuple]:
    """Every entry under tmp (links not followed): type, and the bytes of regular files."""
    state = {}
    for root, dirs, names in os.walk(tmp):
        for name in dirs + names:
            path = Path(root) / name
            info = os.lstat(path)
            state[str(path.relative_to(tmp))] = (info.st_mode, info.st_rdev,
                                                 path.read_bytes() if path.is_file() and not path.is_symlink() else b"")
    return state


@pytest.mark.parametrize("case", HOSTILE)
def test_force_refuses_what_is_not_an_export(case, tmp_path, monkeypatch, tiny_checkpoint):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = _hostile(work, case)
    before = _state(tmp_path)
    with pytest.raises(ExportError) as raised:
        export(out, tiny_checkpoint, force=True)
    assert_one_line(raised, HOSTILE[case], "--out")
    assert _state(tmp_path) == before, "something changed on disk"
    nothing_left(work)


def test_force_refusal_on_the_command_line(tmp_path):
    out = _hostile(tmp_path, "foreign directory")
    before = snapshot(out)
    run = cli("export", "llava15", "--keep", KEEP, "--model", "tiny", "--out", out, "--force", "--no-validate",
              cwd=tmp_path)
    assert_refused(run, repr(str(out)), "not a prunevlm export", "--force")
    assert snapshot(out) == before
    nothing_left(tmp_path)


def test_empty_directory_is_replaced_only_with_force(tmp_path):
    """An empty directory loses nothing when replaced: like an export, it needs --force."""
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(ExportError) as raised:
        with files.replacing(out, False, ExportError):
            pass
    assert_one_line(raised, "already exists", "--force")
    with files.replacing(out, True, ExportError) as tmp:
        (tmp / "manifest.json").write_text('{"format_version": 3}')
    assert files.is_export(out)
    nothing_left(tmp_path)


def test_newline_in_the_path_gives_one_line(tmp_path, tiny_checkpoint):
    blocker = tmp_path / "evil\nerror: forged second line"
    blocker.write_text("a regular file")
    with pytest.raises(ExportError) as raised:
        export(blocker / "out", tiny_checkpoint)
    assert_one_line(raised, "is under", repr(str(blocker)))
    assert blocker.read_text() == "a regular file"


# ---------------------------------------------------------------- read-only, immutable, full disk


def _chattr(path: Path, flag: str) -> None:
    try:
        done = subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        done = False
    if not done:
        pytest.skip("chattr is not available or not permitted here")


def test_immutable_directories_are_refused(tmp_path, tiny_checkpoint):
    parent = tmp_path / "locked-parent"
    parent.mkdir()
    old = fake_export(tmp_path / "immutable-export")
    before = snapshot(old)
    _chattr(parent, "+i")
    try:
        _chattr(old, "+i")
        try:
            with pytest.raises(ExportError) as raised:
                export(parent / "out", tiny_checkpoint)
            assert_one_line(raised, "not writable", repr(str(parent)))
            with pytest.raises(ExportError) as raised:
                export(old, tiny_checkpoint, force=True)
            assert_one_line(raised, "read-only", repr(str(old)))
        finally:
            _chattr(old, "-i")
    finally:
        _chattr(parent, "-i")
    assert list(parent.iterdir()) == [] and snapshot(old) == before
    nothing_left(tmp_path)


def test_full_disk_is_one_line_and_leaves_the_old_export(tmp_path, tiny_checkpoint, monkeypatch):
    from export import api

    def full_disk(directory, *args, **kwargs):
        (directory / "vision.onnx").write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "vision.onnx.data"))

    monkeypatch.setattr(api, "_write", full_disk)
    old = fake_export(tmp_path / "e")
    before = snapshot(old)
    for out, force in [(tmp_path / "new" / "e", False), (old, True)]:
        with pytest.raises(ExportError) as raised:
            export(out, tiny_checkpoint, force=force)
        assert_one_line(raised, "disk is full", repr(str(out)), "nothing was written")
    assert not (tmp_path / "new").exists(), "created parent directories were left"
    assert snapshot(old) == before
    nothing_left(tmp_path)


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    from export import checkpoints

    (tmp_path / "file").write_text("x")
    (tmp_path / "readonly").mkdir()
    for cache in [tmp_path / "file" / "cache\nerror: forged", tmp_path / "readonly" / "cache"]:
        monkeypatch.setattr(checkpoints, "CACHE_DIR", cache)
        if cache.parent.name == "readonly":
            _chattr(cache.parent, "+i")
        try:
            with pytest.raises(ExportError) as raised:
                export(tmp_path / "out", "tiny")
        finally:
            if cache.parent.name == "readonly":
                _chattr(cache.parent, "-i")
        assert_one_line(raised, "PRUNEVLM_CACHE", repr(str(cache)))
    assert not (tmp_path / "out").exists()


def test_cache_entry_is_built_once_by_processes_started_together(tmp_path, monkeypatch):
    """checkpoints.cached: while another process holds an entry's lock (it is building it), a second caller says it
    waits and then takes that build instead of building again; a build that fails leaves nothing in the cache."""
    import contextlib
    import threading

    from filelock import FileLock

    from export import checkpoints

    monkeypatch.setattr(checkpoints, "CACHE_DIR", tmp_path)
    said, builds = [], []

    @contextlib.contextmanager
    def step(what):
        said.append(what)
        yield

    def build(directory):
        builds.append(directory)
        (directory / "config.json").write_text("{}")

    other = FileLock(tmp_path / ".entry.lock")  # what the other process's cached() holds while it builds
    other.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(checkpoints.cached("entry", build, step, "the entry")))
    waiter.start()
    deadline = time.monotonic() + 30
    while not said and time.monotonic() < deadline:
        time.sleep(0.05)
    assert said == ["waiting for another process to finish building the entry"]
    (tmp_path / "entry").mkdir()  # the other process's build lands
    build(tmp_path / "entry")
    other.release()
    waiter.join(30)
    assert got == [tmp_path / "entry"] and len(builds) == 1, "the waiting caller built the entry again"

    def failing(directory):
        (directory / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted build")

    with pytest.raises(RuntimeError):
        checkpoints.cached("broken", failing, step, "the broken entry")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["entry"]


# ---------------------------------------------------------------- signals, kills, races


def _start(out: Path, checkpoint: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "export", "llava15", "--keep", str(KEEP), "--model", str(checkpoint), "--out", str(out),
         "--no-validate"],
        cwd=out.parent, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _wait_for_partial(process: subprocess.Popen, out: Path) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.partial-*"))
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"the export ended (exit {process.returncode}) before writing:\n{process.stderr.read()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("no partial directory appeared")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_cleans_up_like_ctrl_c(signum, tmp_path, tiny_checkpoint):
    out = tmp_path / "e"
    process = _start(out, tiny_checkpoint)
    _wait_for_partial(process, out)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, f"exit {process.returncode}:\n{stderr}"
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "interrupted", stderr
    assert not out.exists()
    nothing_left(tmp_path)


def test_a_killed_export_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    """SIGKILL cannot be caught: the export's janitor process removes the partial directory and the lock."""
    from export import api

    out = tmp_path / "e"
    process = _start(out, tiny_checkpoint)
    _wait_for_partial(process, out)
    process.kill()
    process.communicate(timeout=60)
    assert not out.exists()
    nothing_left_soon(tmp_path)
    # The next run: the real lock, checks and rename; the graphs are not the point (and take seconds).
    monkeypatch.setattr(api, "_write", lambda directory, *args: (directory / "manifest.json").write_text(
        '{"format_version": 3, "next": true}'))
    assert export(out, tiny_checkpoint) == out  # no --force needed: nothing of the killed run is taken for an export
    assert (out / "manifest.json").read_text() == '{"format_version": 3, "next": true}'
    nothing_left(tmp_path)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from contract import files
from contract.errors import ExportError
out = Path(sys.argv[1])
with files.replacing(out, False, ExportError) as tmp:
    (tmp / "graph.onnx").write_bytes(b"half a graph")
    with files.atomic_file(out.parent / "e.engine", ExportError) as f:
        f.write(b"half an engine")
        print(" ".join(sorted(os.listdir(out.parent))), flush=True)
        os.kill(os.getpid(), signal.{signal})
"""


@pytest.mark.parametrize("signum", ["SIGKILL", "SIGSEGV"])
def test_a_writer_that_dies_without_unwinding_leaves_nothing(signum, tmp_path):
    """Killed, or crashed inside a native library, with a lock, a partial directory and a partial file: the
    janitor removes all three."""
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER.replace("{signal}", signum), str(tmp_path / "e")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -getattr(signal, signum), done.stderr
    seen = done.stdout.split()
    assert ".e.lock" in seen and any(n.startswith(".e.partial-") for n in seen) and any(
        n.startswith(".e.engine.partial-") for n in seen), seen
    nothing_left_soon(tmp_path)
    assert sorted(os.listdir(tmp_path)) == []


def test_two_exports_to_one_out_never_both_win(tmp_path, tiny_checkpoint):
    """Started together: one takes --out's lock, the other is refused at once with one line; the winner (then
    stopped with SIGTERM, which the test above covers) held the lock all along."""
    out = tmp_path / "e"
    processes = [_start(out, tiny_checkpoint) for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    loser = next((p for p in processes if p.poll() is not None), None)
    winner = next(p for p in processes if p is not loser)
    if loser is None:
        for p in processes:
            p.kill()
        pytest.fail("neither export was refused")
    stdout, stderr = loser.communicate()
    still_running = winner.poll() is None
    winner.send_signal(signal.SIGTERM)
    _, winner_stderr = winner.communicate(timeout=120)
    assert still_running, "the winner ended before the loser was refused"
    line = assert_refused(subprocess.CompletedProcess(loser.args, loser.returncode, stdout, stderr), repr(str(out)))
    assert "another prunevlm process is writing" in line, line
    # Soon, not at once: SIGTERM once met a crash inside onnx's native code (exit -11), after which the
    # janitor, not the winner, cleaned up; the winner's exit is in the message.
    nothing_left_soon(tmp_path, f"(the winner exited {winner.returncode}: {winner_stderr[-500:]!r})")


def test_a_held_lock_refuses_a_second_writer(tmp_path):
    with files.replacing(tmp_path / "e", False, ExportError):
        with pytest.raises(ExportError) as raised:
            with files.replacing(tmp_path / "e", False, ExportError):
                pass
    assert_one_line(raised, "another prunevlm process is writing")
    nothing_left(tmp_path)


def test_a_swap_cut_in_half_is_undone(tmp_path):
    """Killed between the two renames of --force: the old export is `.e.old-*` and `e` is missing. The next
    writer puts it back before looking, so without --force it is refused, not silently lost."""
    fake_export(tmp_path / ".e.old-12345-abcd0123")
    (tmp_path / ".e.partial-12345-abcd0123").mkdir()
    with pytest.raises(ExportError) as raised:
        with files.replacing(tmp_path / "e", False, ExportError):
            pass
    assert_one_line(raised, "already exists")
    assert files.is_export(tmp_path / "e")
    nothing_left(tmp_path)


def test_ignored_sighup_stays_ignored():
    """Under nohup SIGHUP is ignored: a writer must not turn it into an interrupt; handlers come back after."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with files.signals_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not term
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, previous)


# ---------------------------------------------------------------- engines build and calibration


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_export(KEEP), tmp_path / "export"))


def _build(export_dir: Path, **options):
    from engines import build

    return build.build(BuildOptions(export_dir, **options), log=lambda text: None)


@pytest.mark.parametrize("case", ["engines is a file", "foreign engine", "engines is a link", "cache is a directory"])
def test_engine_build_replaces_only_its_own_files(case, export_copy, tmp_path):
    engines = export_copy / "engines"
    options = {}
    if case == "engines is a file":
        engines.write_text("the user's file")
        named = "regular file"
    elif case == "foreign engine":
        engines.mkdir()
        (engines / "vision.engine").write_bytes(b"someone else's engine")
        named = "did not build it"
    elif case == "engines is a link":
        (tmp_path / "elsewhere").mkdir()
        engines.symlink_to(tmp_path / "elsewhere")
        named = "symbolic link"
    else:
        (tmp_path / "cache").mkdir()
        options["timing_cache"] = tmp_path / "cache"
        named = "--timing-cache"
    before = _state(tmp_path)
    with pytest.raises(BuildError) as raised:
        _build(export_copy, **options)
    assert_one_line(raised, named)
    assert _state(tmp_path) == before


def test_engine_build_removes_what_a_killed_build_left(export_copy, monkeypatch):
    from engines import build

    (export_copy / "engines").mkdir()
    leftover = export_copy / "engines" / ".vision.engine.partial-12345-abcd0123"
    leftover.write_bytes(b"half an engine")
    monkeypatch.setattr(build, "_build", lambda options, manifest, log: [])  # no TensorRT here
    assert _build(export_copy) == []
    assert not leftover.exists() and not (export_copy / ".engines.lock").exists()


def test_engine_metadata_is_written_before_its_engine(export_copy, monkeypatch):
    """Cut between the two renames, an engine never lacks its metadata (it would then be foreign forever)."""
    from engines import build

    real_replace = os.replace

    def cut(source, target):
        if str(target).endswith(".engine"):
            raise OSError(errno.EIO, "cut (simulated)")
        real_replace(source, target)

    (export_copy / "engines").mkdir()
    monkeypatch.setattr(files.os, "replace", cut)
    meta = dict(graph="vision", onnx={}, tensorrt="10.3.0", gpu_name="Orin", compute_capability="8.7", options={},
                precision={}, profiles=[])
    with pytest.raises(OSError):
        build._install(export_copy, "vision", b"engine bytes", meta)
    names = sorted(p.name for p in (export_copy / "engines").iterdir())
    assert names == ["vision.engine.json"], names


def test_calibration_replaces_only_files_it_listed(export_copy, tmp_path):
    from calibration import api

    (tmp_path / "photos").mkdir()
    foreign = export_copy / "vision.int8.onnx"
    foreign.write_bytes(b"the user's own quantized graph")
    before = _state(export_copy)
    options = CalibrationOptions(export_copy, "int8", images=tmp_path / "photos", graphs=("vision",),
                                 evaluate=False, method="max")
    with pytest.raises(CalibrationError) as raised:
        api.run(options, api.Log(stream=io.StringIO()))
    assert_one_line(raised, repr(str(foreign)), "prunevlm did not write it")
    assert _state(export_copy) == before
    nothing_left(export_copy)


class _SignalsInFinalizer:
    """Sends SIGTERM to this process from `__del__`: the handler's exception is raised inside the finalizer,
    where Python prints it and carries on (seen in CI: a regex object collected while the export ran)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception itself
def test_a_signal_a_finalizer_swallowed_still_stops_the_commit(tmp_path):
    out = tmp_path / "e"
    with pytest.raises(files.Terminated):
        with files.replacing(out, False, ExportError) as tmp:
            (tmp / "graph.onnx").write_bytes(b"x")
            _SignalsInFinalizer()  # collected at once: the exception vanishes, the signal is remembered
    assert not out.exists()
    assert leftovers(tmp_path) == [], f"left behind: {leftovers(tmp_path)}"
