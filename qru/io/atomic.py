"""The output-commit protocol every qru command writes through.

- **Files** (:func:`write_bytes`, :func:`write_text`, :func:`write_json`): a temp file beside the
  target, fsync, ``os.replace``.
- **Directories** (:func:`staged_dir`): a complete stage ``.NAME.<pid>.<random>.partial`` is built
  beside the target and committed with one rename. When the target exists it is swapped with the
  stage in one atomic ``renameat2(RENAME_EXCHANGE)`` where the filesystem supports it, otherwise it
  is renamed aside (``.NAME.<pid>.<random>.old``) first; the old one is removed only after the new
  one is in place. A reader sees the old output or the new one, never a mix.
- **Lock** (:func:`target_lock`): ``.NAME.lock`` beside the target, held with ``flock`` and holding
  the owner's pid, so a concurrent writer fails with :class:`OutputLockedError` naming the target and
  the other pid. The kernel drops the lock when its process dies.
- **Stale stages** (:func:`clean_stale`): ``.partial`` stages (and ``.old`` asides) of dead processes
  are removed at the next write to the same target (an ``.old`` whose target is missing, i.e. a
  commit killed between its two renames, is renamed back instead).

Fault injection: with ``QRU_FAULT_KILL_AT_WRITE=N`` the process SIGKILLs itself at its Nth write or
rename point (:func:`fault_point`); ``QRU_FAULT_LOG=FILE`` appends one line per point (for tests).
This module imports nothing from qru.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

FAULT_ENV = "QRU_FAULT_KILL_AT_WRITE"
FAULT_LOG_ENV = "QRU_FAULT_LOG"

_fault_count = 0
_fault_mutex = threading.Lock()


class OutputError(ValueError):
    """An output that cannot be written as asked. The message names the path."""


class OutputLockedError(OutputError):
    """Another live process is writing the same target."""


# -- fault injection ----------------------------------------------------------------------

def fault_point(label: str = "") -> None:
    """A numbered write/rename point: SIGKILL this process at the ``$QRU_FAULT_KILL_AT_WRITE``-th one."""
    global _fault_count
    kill_at, log = os.environ.get(FAULT_ENV), os.environ.get(FAULT_LOG_ENV)
    if not kill_at and not log:
        return
    with _fault_mutex:
        _fault_count += 1
        n = _fault_count
    if log:
        with open(log, "a") as f:
            f.write(f"{n} {label}\n")
    if kill_at and n == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


# -- small helpers ------------------------------------------------------------------------

def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tag() -> str:
    return f"{os.getpid()}.{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- files --------------------------------------------------------------------------------

def write_bytes(path: str | os.PathLike, data: bytes, *, fault: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temp file beside it, fsync, ``os.replace``). ``fault=False``:
    not a numbered :func:`fault_point`, for a cache whose write depends on earlier runs (so a command's
    fault points are numbered the same on every run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_tag()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(f"write {path}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", *, fault: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (``fault`` as in :func:`write_bytes`)."""
    return write_bytes(path, text.encode(encoding), fault=fault)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2, *, fault: bool = True, **kw) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically (``fault`` as in :func:`write_bytes`)."""
    return write_text(path, json.dumps(obj, indent=indent, **kw) + "\n", fault=fault)


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError):
    """The JSON value in ``path``; undecodable bytes or malformed JSON raise ``error`` naming the file."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: malformed JSON ({type(e).__name__}: {str(e)[:200]})") from None


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (never truncating it) and fsync: for logs such as ``metrics.jsonl``."""
    fault_point(f"append {path}")
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# -- the lock -----------------------------------------------------------------------------

def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


_held: dict[str, list] = {}  # lock path -> [thread id, depth, fd]
_held_mutex = threading.Lock()


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def target_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``target`` for the block; re-entrant within one thread.

    Raises :class:`OutputLockedError` (naming the target and the holder's pid) when another
    process, or another thread of this one, holds it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lp = lock_path(target)
    key = str(lp.resolve())
    me = threading.get_ident()
    with _held_mutex:
        entry = _held.get(key)
        if entry is not None and entry[0] == me:
            entry[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lp
        finally:
            with _held_mutex:
                _held[key][1] -= 1
        return
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLockedError(
                f"{target} is being written by another process (pid {_lock_owner(lp)}, lock file {lp}); "
                "wait for it to finish") from None
        try:  # the holder before us may have unlinked the file after we opened it: retry on the new one
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    with _held_mutex:
        _held[key] = [me, 1, fd]
    try:
        yield lp
    finally:
        with _held_mutex:
            _held.pop(key, None)
        try:
            lp.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


# -- stale stages ---------------------------------------------------------------------------

_ANY_STAGE = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.(partial|old|tmp)")


def _stage_re(target: Path) -> re.Pattern:
    return re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]{8}\.(partial|old|tmp)")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def stage_path(target: str | os.PathLike, kind: str = "partial") -> Path:
    """A fresh ``.NAME.<pid>.<random>.<kind>`` path beside ``target``."""
    target = Path(target)
    return target.parent / f".{target.name}.{_tag()}.{kind}"


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the ``.partial`` stages, ``.old`` asides and ``.tmp`` files of ``target`` left by dead processes; an
    ``.old`` whose target is missing (a commit killed between its renames) is renamed back. Returns
    what was removed or restored."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pat, done = _stage_re(target), []
    for p in sorted(target.parent.iterdir()):
        m = pat.fullmatch(p.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not os.path.lexists(target):
            os.rename(p, target)
        else:
            _remove(p)
        done.append(p)
    return done


def clean_stale_in(directory: str | os.PathLike) -> list[Path]:
    """Remove every stage, aside or temp file (``.NAME.<pid>.<random>.partial|old|tmp``) of a dead
    process directly inside ``directory`` (e.g. a run directory about to be resumed or committed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for p in sorted(directory.iterdir()):
        m = _ANY_STAGE.fullmatch(p.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(p)
            done.append(p)
    return done


# -- directory commit -----------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = getattr(_libc, "renameat2", None)
except OSError:  # pragma: no cover - no libc
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def commit_dir(stage: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete directory ``stage`` at ``target`` with one atomic rename (swap, or aside +
    rename when ``target`` exists); the previous ``target`` is removed only afterwards."""
    stage, target = Path(stage), Path(target)
    _fsync_tree(stage)
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError(f"{target} exists and is not a directory; refusing to replace it with one")
    if not os.path.lexists(target):
        fault_point(f"rename {stage.name} -> {target}")
        try:
            os.rename(stage, target)
            _fsync_dir(target.parent)
            return target
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
    fault_point(f"exchange {stage.name} <-> {target}")
    if _exchange(stage, target):
        old = stage
    else:
        old = stage_path(target, "old")
        os.rename(target, old)
        fault_point(f"rename {stage.name} -> {target} (old aside)")
        os.rename(stage, target)
    _fsync_dir(target.parent)
    fault_point(f"remove old {target}")
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_file(target: str | os.PathLike, *, lock: bool = True) -> Iterator[Path]:
    """Yield a stage path ``.NAME.<pid>.<random>.partial`` beside the file ``target`` for a writer
    that streams into it (too large for :func:`write_bytes`); when the block succeeds the stage is
    fsynced and renamed onto ``target`` in one step, when it fails it is removed and ``target`` is
    untouched. Holds the target's lock (unless ``lock=False``) and first removes stale stages."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target) if lock else contextlib.nullcontext():
        clean_stale(target)
        stage = stage_path(target, "partial")
        try:
            yield stage
            fd = os.open(stage, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(stage, 0o666 & ~_umask())
            fault_point(f"rename {stage.name} -> {target}")
            os.replace(stage, target)
            _fsync_dir(target.parent)
        finally:
            if os.path.lexists(stage):
                _remove(stage)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_over(target: Path, stage: Path, keep: Callable[[str], bool]) -> list[str]:
    """Put into ``stage`` the entries of the existing directory ``target`` that ``stage`` does not
    have and ``keep(name)`` accepts (hard links where possible, else copies), so that committing
    ``stage`` replaces only what the writer owns. Returns the names carried."""
    if not target.is_dir():
        return []
    carried = []
    for p in sorted(target.iterdir()):
        dst = stage / p.name
        if os.path.lexists(dst) or not keep(p.name):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), dst)
        elif p.is_dir():
            shutil.copytree(p, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(p), str(dst))
        carried.append(p.name)
    return carried


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, lock: bool = True,
               keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty stage directory beside ``target``; when the block succeeds it becomes
    ``target`` in one atomic commit (:func:`commit_dir`), when it fails it is removed and ``target``
    is untouched. Holds the target's lock (unless ``lock=False``: the caller holds it) and first
    removes stale stages of dead processes. ``keep``: entries of an existing ``target`` that the
    block did not write and ``keep(name)`` accepts are carried into the commit (:func:`carry_over`),
    e.g. the tokenizer files beside re-saved weights; without it ``target`` is replaced whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target) if lock else contextlib.nullcontext():
        clean_stale(target)
        stage = stage_path(target, "partial")
        stage.mkdir(mode=0o777)
        os.chmod(stage, 0o777 & ~_umask())
        try:
            yield stage
            if keep is not None:
                carry_over(target, stage, keep)
            commit_dir(stage, target)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
