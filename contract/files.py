"""Writing outputs that replace things on disk: nothing half-written is ever visible, nothing that prunevlm
did not write is ever replaced, and two writers of the same output never both win. No torch: the exporter,
the engine builder and the calibrator all write through here.

    PARENT/.NAME.lock                      flock held from the checks until after the rename; removed after
    PARENT/.NAME.partial-<pid>-<hex>       what is being written (a directory, or a file for `atomic_file`)
    PARENT/.NAME.old-<pid>-<hex>           the export being replaced, between the two renames of `replacing`
    PARENT/NAME                            the finished output

Every `.NAME.partial-*` and `.NAME.old-*` exists only while its writer holds `.NAME.lock`, so whoever holds
the lock knows that those it finds were left by a killed process (SIGKILL, power loss): it removes them
(an `.old-*` whose NAME is missing is renamed back, undoing a swap cut in half). The pid in the name says
who left it, for a person reading `ls -a`; the lock, not the pid, is the proof (pids are reused).

SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) while an output is being written, so the same
cleanup as for Ctrl-C runs; a signal that was ignored (`nohup`) stays ignored.

A writer that dies without unwinding (SIGKILL, the OOM killer, a crash inside a native library) cannot clean up
itself: its janitor does. The first lock a process takes starts one small process (`_janitor_main`, no torch)
that it tells, over a pipe, which locks and temporary files it holds; when the pipe closes (the writer is
gone, however it ended) the janitor takes each lock it still held, if nobody else has, and removes what was left
(`clear_stale`), and removes its temporary files. A janitor that was killed too leaves the cleanup to the next
writer, as above.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from contract.errors import UserError
from contract.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
SIGNALS = (signal.SIGTERM, signal.SIGHUP)

Error = Callable[[str], UserError]  # the caller's error type: ExportError, BuildError, CalibrationError


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output was being written; unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def quoted(path: Path | str) -> str:
    """A path for a one-line message: repr() escapes newlines and other control characters."""
    return repr(str(path))


# The signal that arrived under `signals_raise`, if any. Its handler raises, but Python ignores an exception
# raised inside a finalizer (a `__del__` the signal happened to interrupt, e.g. during garbage collection in a
# library): `check_terminated` raises it again before anything is committed.
_terminated: list[int] = []


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise `Terminated` (once: a second one during cleanup is dropped).
    Only the main thread can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _terminated.clear()

    def handler(signum, frame):
        if not _terminated:
            _terminated.append(signum)
            raise Terminated(signum)

    previous = {}
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)
        _terminated.clear()


def check_terminated() -> None:
    """Raise `Terminated` if a signal arrived under `signals_raise` whose exception was swallowed (above)."""
    if _terminated:
        raise Terminated(_terminated[0])


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait (and arrive after) while a swap of renames runs."""
    held = {signal.SIGINT, *SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def is_export(path: Path) -> bool:
    """A prunevlm export directory: a real directory (not a link) whose manifest.json is a regular file that
    parses as a JSON object with a `format_version` (any version: older exports are still ours)."""
    manifest = Path(path) / MANIFEST_FILE
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        info = os.lstat(manifest)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
            return False  # a FIFO or device named manifest.json is never opened
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "format_version" in data


def _kind(mode: int) -> str:
    for test, name in [(stat.S_ISREG, "regular file"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")]:
        if test(mode):
            return name
    return "special file"


def require_directory(path: Path, what: str, error: Error) -> None:
    """`path` is a real directory (not a link, not a file under which nothing can be written)."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise error(f"{what} {quoted(path)} cannot be used ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{what} {quoted(path)} is a symbolic link; prunevlm writes only into real directories")
    if not stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {quoted(path)} is a {_kind(info.st_mode)}, not a directory")


def require_replaceable_file(path: Path, what: str, error: Error) -> None:
    """`path` is missing or a regular file (not a link, directory or device) that a rename may replace."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"{what} {quoted(path)} cannot be used ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{what} {quoted(path)} is a symbolic link; prunevlm replaces only files it wrote")
    if not stat.S_ISREG(info.st_mode):
        kind = "directory" if stat.S_ISDIR(info.st_mode) else _kind(info.st_mode)
        raise error(f"{what} {quoted(path)} is a {kind}; prunevlm replaces only files it wrote")


def _stale_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(partial|old)-\d+-[0-9a-f]+")


def clear_stale(parent: Path, name: str) -> list[str]:
    """Remove what a killed writer of `parent/name` left; call only while holding its lock. An `.old-*` is
    renamed back when `name` is missing (the swap was cut in half). Returns the names it handled."""
    pattern = _stale_pattern(name)
    handled = []
    with os.scandir(parent) as entries:
        found = sorted(e.name for e in entries if pattern.fullmatch(e.name))
    for entry in found:
        path = parent / entry
        with contextlib.suppress(OSError):  # what cannot be removed stays, and is never taken for an output
            if ".old-" in entry and is_export(path) and not os.path.lexists(parent / name):
                os.rename(path, parent / name)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            handled.append(entry)
    return handled


def _temporary_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def locked(parent: Path, name: str, label: str, error: Error) -> Iterator[None]:
    """Hold the lock of `parent/name` (`parent/.NAME.lock`) or refuse: another process is writing it (`label`
    says what, with its path: "--out '/x/e'"). Stale leftovers of killed writers are removed once it is
    held. The lock file is removed before it is released; a process that locked the removed file notices
    (another inode) and takes the new one."""
    path = parent / f".{name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            why = "is not writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "cannot hold a lock file"
            raise error(f"cannot write {label}: {quoted(parent)} {why} ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise error(f"{quoted(path)} is not a lock file prunevlm made; move it away")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                break
        except BlockingIOError:
            os.close(fd)
            raise error(f"another prunevlm process is writing {label}; wait for it to finish") from None
        except FileNotFoundError:
            pass  # its holder removed it as we locked it: take the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        clear_stale(parent, name)
        with _janitor.watching("lock", path):
            yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _release_abandoned(path: Path) -> None:
    """Take the lock file `path` if nobody holds it, remove what its dead holder left, and the lock file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # removed: its holder finished, or another writer cleaned up
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.lstat(path).st_ino and stat.S_ISREG(os.fstat(fd).st_mode):
            clear_stale(path.parent, path.name[1:-len(".lock")])
            path.unlink()
    except OSError:
        pass  # held by another writer (who cleans up itself), or already gone
    finally:
        os.close(fd)


class _Janitor:
    """This process's janitor (see the module doc): started with the first lock, told what is held."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._pipe = None
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def watching(self, kind: str, path: Path) -> Iterator[None]:
        """While the block runs, the janitor cleans `path` if this process dies: a "lock" file (taken and
        cleared as above) or a "file" this process alone writes (removed)."""
        self._send("+", kind, path)
        try:
            yield
        finally:
            self._send("-", kind, path)

    def _send(self, op: str, kind: str, path: Path) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: one janitor per process
                self._start()
            if self._pipe is None:
                return
            try:  # one unbuffered write of a short line: whole or not at all
                self._pipe.write(json.dumps([op, kind, os.path.abspath(path)]).encode() + b"\n")
            except OSError:  # the janitor was killed: the next writer cleans up instead
                self._pipe = None

    def _start(self) -> None:
        self._pid, self._pipe = os.getpid(), None
        if not sys.executable:  # an embedded interpreter: no janitor, the next writer cleans up
            return
        root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {root!r}); from contract.files import _janitor_main; _janitor_main()"
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code], bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)  # Ctrl-C in the terminal does not reach it
        except OSError:
            return  # no janitor: cleanup after a kill is left to the next writer
        self._pipe = self._process.stdin


_janitor = _Janitor()


def _janitor_main() -> None:
    """The janitor process: read what its writer holds until the pipe closes, then clean what is still held."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # outlive the writer long enough to clean
        signal.signal(signum, signal.SIG_IGN)
    held: dict[tuple[str, str], int] = {}
    for line in sys.stdin.buffer:
        try:
            op, kind, path = json.loads(line)
        except ValueError:
            continue
        held[kind, path] = held.get((kind, path), 0) + (1 if op == "+" else -1)
    left = [key for key, count in held.items() if count > 0]
    for kind, path in sorted(left, key=lambda key: key[0] == "lock"):  # files first, then the locks
        if kind == "file":
            with contextlib.suppress(OSError):
                os.unlink(path)
        else:
            _release_abandoned(Path(path))


def _disk_error(exc: BaseException, target: str, error: Error) -> UserError | None:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return error(f"the disk is full while writing {target} ({exc.strerror}); nothing was written")
    return None


@contextlib.contextmanager
def partial_dir(parent: Path, name: str, label: str, error: Error) -> Iterator[Path]:
    """A new `.NAME.partial-*` directory in `parent`, removed on any failure (a full disk becomes `error`)."""
    tmp = parent / _temporary_name(name, "partial")
    try:
        os.mkdir(tmp)  # mode 0o777 less the umask: an ordinary directory once renamed into place
    except OSError as exc:
        raise _disk_error(exc, label, error) or error(
            f"cannot write {label} in {quoted(parent)} ({exc.strerror})") from None
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_error(exc, label, error)
        if full is not None:
            raise full from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # renamed away on success; a leftover only after a failed rename


def _make_parents(parent: Path, what: str, out: Path, error: Error) -> list[Path]:
    """Create the missing directories above `out`; returns them (to be removed if the write fails)."""
    missing = []
    ancestor = parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"{what} {quoted(out)} is under {quoted(ancestor)}, which is not a directory")
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except OSError as exc:
            _remove_empty(created)
            raise error(f"cannot create {quoted(directory)} for {what} {quoted(out)} ({exc.strerror})") from None
        created.append(directory)
    return created


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _existing(out: Path, force: bool, what: str, error: Error) -> str | None:
    """What `out` holds now: None (nothing), "empty" (an empty directory) or "export"; anything else, and
    either of the two without `force`, is refused."""
    try:
        info = os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):  # under a file: _make_parents says so
        return None
    except OSError as exc:
        raise error(f"{what} {quoted(out)} cannot be used ({exc.strerror})") from None
    ours = "--force replaces only a prunevlm export directory (one with a manifest.json), so nothing was touched"
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{what} {quoted(out)} is a symbolic link; {ours}: remove the link or choose another {what}")
    if not stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {quoted(out)} exists and is a {_kind(info.st_mode)}, not an export directory; {ours}")
    if is_export(out):
        kind = "export"
    else:
        try:
            with os.scandir(out) as entries:
                kind = "empty" if next(entries, None) is None else None
        except OSError:
            kind = None
        if kind is None:
            raise error(f"{what} {quoted(out)} exists and is not a prunevlm export; {ours}: choose another {what}")
    if not force:
        raise error(f"{what} {quoted(out)} already exists; pass --force to replace it")
    if kind == "export" and not os.access(out, os.W_OK):
        raise error(f"{what} {quoted(out)} is read-only; prunevlm cannot replace it")
    return kind


def _swap(tmp: Path, out: Path, kind: str | None) -> None:
    """Rename `tmp` to `out`: an empty directory is removed first (rmdir fails if it got files meanwhile), an
    export moved to `.NAME.old-*` and deleted after; if the second rename fails the export is put back."""
    if kind == "empty":
        os.rmdir(out)
    if kind != "export":
        os.rename(tmp, out)
        return
    old = out.parent / _temporary_name(out.name, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replacing(out: Path, force: bool, error: Error, what: str = "--out") -> Iterator[Path]:
    """Write a directory that replaces `out`: yields an empty `.NAME.partial-*` directory beside it, renamed
    to `out` when the block ends without an exception, removed when it raises (or on SIGTERM / SIGHUP).

    Refused with one line, before the block runs: a path that names no directory of its own (`.`, `..`,
    `/`), one under a regular file, a symbolic link, anything that is not a directory, a non-empty directory
    that is not a prunevlm export (even with `force`), an export or an empty directory without `force`, and
    an output another process is writing. Parent directories it created are removed on failure."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise error(f"{what} {quoted(out)} does not name a directory of its own; give a path such as exports/NAME")
    _existing(out, force, what, error)  # refused before anything is created (no lock file beside /dev/null)
    created = _make_parents(out.parent, what, out, error)
    label = f"{what} {quoted(out)}"
    try:
        with signals_raise(), locked(out.parent, out.name, label, error):
            kind = _existing(out, force, what, error)  # again: the first look was not under the lock
            with partial_dir(out.parent, out.name, label, error) as tmp:
                yield tmp
                check_terminated()
                try:
                    with _signals_blocked():
                        _swap(tmp, out, kind)
                except OSError as exc:
                    raise error(f"cannot move the new {what} {quoted(out)} into place ({exc.strerror}); "
                                "nothing was replaced") from None
    except BaseException:
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, error: Error, what: str = "output") -> Iterator[BinaryIO]:
    """A file object on `.NAME.partial-*` beside `path`, flushed, synced and renamed over `path` when the
    block ends; removed on any failure. The caller checks (`require_replaceable_file`) and locks beforehand."""
    tmp = path.parent / _temporary_name(path.name, "partial")
    with _janitor.watching("file", tmp):  # registered before it exists: a kill at any point leaves nothing
        yield from _write_atomically(tmp, path, error, f"{what} {quoted(path)}")


def _write_atomically(tmp: Path, path: Path, error: Error, target: str) -> Iterator[BinaryIO]:
    try:
        f = open(tmp, "xb")
    except OSError as exc:
        raise _disk_error(exc, target, error) or error(f"cannot write {target} ({exc.strerror})") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_terminated()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = _disk_error(exc, target, error)
        if full is not None:
            raise full from None
        raise
