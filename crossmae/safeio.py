"""The one place the suite opens files in the folders it owns: run, suite and cache folders.

Those folders may live on a shared cluster file system where a careless or hostile neighbour can
plant symlinks, FIFOs or malformed JSON. Every write and every read-back of the suite's own files
goes through this module (docs/CONTRACTS.md "What the suite trusts on disk and what it refuses"):

* **writes** (:func:`open_in_dir`, :func:`atomic_write`, :func:`real_dir`): a file is created /
  appended / locked relative to a descriptor of its folder, opened with ``O_NOFOLLOW`` (plus
  ``O_EXCL`` where it is created), so a planted symlink is never followed; the folder itself must be
  a real directory, not a symlink. Anything else ends with one line naming the path.
* **reads** (:func:`read_regular`): a result / state file is read only when it is a regular file
  (``lstat`` first, then ``open(O_NOFOLLOW | O_NONBLOCK)`` and an ``fstat`` check, so a FIFO or a
  device is never waited on), and, when a root folder is given, when its resolved path lies under it.
* **the suite's JSON files** (:func:`load_json`): one reader with a schema per file kind
  (:data:`SCHEMAS`: ``metrics``, ``task``, ``task_state``, ``run``, ``pin``, ``lock``) that refuses
  what is not the expected shape: nesting deeper than :data:`MAX_JSON_DEPTH`, a list where an
  object is expected, a string where a number is.

Every refusal is a :class:`UnsafeFileError` (a :class:`~crossmae.utils.UserError`): commands print
it as the one-line error (exit 2), scanners (leaderboard, ``slurm.status``) warn and skip.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

from .utils import UserError

#: Largest JSON file of the suite read back (bytes); anything bigger is not one of ours.
MAX_JSON_BYTES = 64 << 20
#: Deepest nesting of a suite JSON file (objects / lists); real files nest < 10 levels.
MAX_JSON_DEPTH = 64
_CHUNK = 1 << 20


class UnsafeFileError(UserError):
    """A file or folder the suite refuses to follow, read or trust (one line naming it)."""


def _why(exc: OSError) -> str:
    return {errno.ELOOP: "is a symlink (or a symlink loop); refused",
            errno.ENAMETOOLONG: "name too long",
            errno.EISDIR: "is a folder",
            errno.ENOTDIR: "lies under something that is not a folder",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on device",
            errno.ENXIO: "is not a regular file (no reader on a FIFO/socket?)"}.get(
        exc.errno, exc.strerror or type(exc).__name__)


def oserror_line(path: str | os.PathLike, exc: OSError, doing: str = "") -> UnsafeFileError:
    """The one-line error for an ``OSError`` on ``path`` (``doing``: e.g. ``"cannot write"``)."""
    return UnsafeFileError(f"{path}: {doing + ': ' if doing else ''}{_why(exc)}")


# --------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------
def real_dir(path: str | os.PathLike, what: str = "folder", create: bool = False) -> Path:
    """Check that ``path`` is a real directory (``lstat``: not a symlink, not a file), creating it
    (and its parents) first when ``create``. Returns the path.

    Raises:
        UnsafeFileError: a symlink (a loop included), a file, a name too long, a permission error.
    """
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        st = os.lstat(path)
    except FileExistsError:  # mkdir over a dangling symlink / a file
        st = os.lstat(path)
    except OSError as exc:
        raise oserror_line(path, exc, f"{what} cannot be used") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(f"{path}: {what} is a symlink; refused (give the real folder)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFileError(f"{path}: {what} is not a folder")
    return path


def _dir_fd(folder: Path) -> int:
    """A descriptor of ``folder`` opened without following a final symlink."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(folder):
            raise UnsafeFileError(f"{folder}: folder is a symlink; refused (give the real folder)") from None
        raise oserror_line(folder, exc, "folder cannot be used") from None


# --------------------------------------------------------------------------------------------------
# writes
# --------------------------------------------------------------------------------------------------
def open_in_dir(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of ``path`` relative to a descriptor of its (real) folder with ``O_NOFOLLOW``
    added: a planted symlink at ``path`` or in place of its folder is refused, never followed.
    Non-regular files (folder, FIFO, device) are refused too (opened ``O_NONBLOCK``, then ``fstat``).

    Args:
        flags: ``os.O_*`` flags, e.g. ``O_RDWR | O_CREAT`` (lock) or ``O_WRONLY | O_APPEND | O_CREAT`` (log).

    Returns:
        the file descriptor (blocking mode restored).

    Raises:
        UnsafeFileError: one line naming ``path``.
    """
    path = Path(path)
    dfd = _dir_fd(path.parent)
    try:
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFileError(f"{path}: is a symlink; refused (the suite never follows a link it did "
                                      f"not make)") from None
            raise oserror_line(path, exc, "cannot open") from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path}: is not a regular file; refused")
    os.set_blocking(fd, True)
    return fd


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool) -> Path:
    """Write ``path`` through a temporary file created ``O_EXCL | O_NOFOLLOW`` in its real folder,
    then ``rename`` it over ``path`` (both relative to the folder's descriptor). A reader never sees
    a half-written file; a symlink or non-regular file at ``path`` is refused, not replaced.

    Raises:
        UnsafeFileError: the folder is a symlink / not a folder / not writable, ``path`` is a symlink,
            a folder or another non-regular file (one line).
    """
    path = Path(path)
    real_dir(path.parent, create=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise oserror_line(path, exc, "cannot write") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(f"{path}: is a symlink; refused (the suite never writes through a link)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path}: exists and is not a regular file; refused")
    dfd = _dir_fd(path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        name = fd = None
        for _ in range(100):
            name = f".{path.name[:200]}.{os.urandom(6).hex()}.tmp"
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o666 & ~umask, dir_fd=dfd)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise oserror_line(path, exc, "cannot write") from None
        try:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(dfd)
    return path


# --------------------------------------------------------------------------------------------------
# reads
# --------------------------------------------------------------------------------------------------
def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Refuse ``path`` when its resolved location is not under ``root`` (resolved).

    Raises:
        UnsafeFileError: one line naming the path and where it leads.
    """
    try:
        real = Path(path).resolve()
        top = Path(root).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError on Python < 3.13)
        raise UnsafeFileError(f"{path}: cannot be resolved ({exc}); refused") from None
    if real != top and top not in real.parents:
        raise UnsafeFileError(f"{path}: leads outside {root} (to {real}); refused")


def read_regular(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                 max_bytes: int | None = None, hasher: "hashlib._Hash | None" = None) -> bytes:
    """The bytes of ``path`` when it is a regular file (never a symlink, FIFO, socket or device) and,
    when ``root`` is given, lies inside ``root``.

    ``lstat`` first, then ``open(O_RDONLY | O_NOFOLLOW | O_NONBLOCK)`` and ``fstat`` on the
    descriptor (the file cannot be swapped in between); reading never blocks on a FIFO.

    Args:
        max_bytes: refuse a larger file (e.g. :data:`MAX_JSON_BYTES` for JSON).
        hasher: a ``hashlib`` object fed with the bytes as they are read (one pass: the digest is
            that of exactly the bytes returned).

    Raises:
        FileNotFoundError: the file does not exist (the caller decides whether that is an error).
        UnsafeFileError: a symlink, a non-regular file, outside ``root``, too large, unreadable.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise oserror_line(path, exc, "cannot read") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(f"{path}: is a symlink; refused (result and state files are read only as "
                              f"regular files inside their folder)")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path}: is not a regular file (FIFO, device or folder); refused")
    if root is not None:
        check_inside(path, root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise oserror_line(path, exc, "cannot read") from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise UnsafeFileError(f"{path}: is not a regular file; refused")
        if max_bytes is not None and fst.st_size > max_bytes:
            raise UnsafeFileError(f"{path}: {fst.st_size} bytes, more than the {max_bytes} a suite file may "
                                  f"have; refused")
        os.set_blocking(fd, True)
        chunks = []
        with os.fdopen(fd, "rb", closefd=False) as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                if hasher is not None:
                    hasher.update(block)
                chunks.append(block)
                if max_bytes is not None and sum(map(len, chunks)) > max_bytes:
                    raise UnsafeFileError(f"{path}: more than {max_bytes} bytes; refused")
        return b"".join(chunks)
    except OSError as exc:
        raise oserror_line(path, exc, "cannot read") from None
    finally:
        os.close(fd)


def is_regular(path: str | os.PathLike) -> bool:
    """Whether ``path`` itself (not a symlink's target) is a regular file; never raises."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_hashed(path: str | os.PathLike) -> tuple[bytes, str]:
    """``(bytes, hex sha256 of exactly those bytes)`` of a regular file, in one pass
    (:func:`read_regular`). Used for checkpoints: the sha256 that goes into a result is that of the
    bytes that were loaded."""
    h = hashlib.sha256()
    data = read_regular(path, hasher=h)
    return data, h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the suite's JSON files
# --------------------------------------------------------------------------------------------------
_NUM = (int, float)
_NONE = type(None)

#: Per file kind: ``(required keys, {key: accepted types})``. Keys not listed are free; a listed key
#: that is present must have one of its types (bool is never accepted as a number).
SCHEMAS: dict[str, tuple[tuple[str, ...], dict[str, tuple[type, ...]]]] = {
    "metrics": ((), {
        "task": (str,), "metrics": (dict,), "protocol": (str, _NONE), "seed": (int, _NONE), "epochs": (int, _NONE),
        "wall_time_s": (*_NUM, _NONE), "num_gpus": (int, _NONE), "world_size": (int, _NONE),
        "backbone": (str, _NONE), "backbone_sha256": (str, _NONE), "backbone_report": (dict, _NONE),
        "run_hash": (str, _NONE), "config_hash": (str, _NONE), "code_version": (str, _NONE), "device": (str, _NONE),
        "predictions": (str, _NONE), "config": (str, dict, _NONE), "checkpoint": (str, _NONE),
        "num_nodes": (int, _NONE), "devices_per_node": (int, _NONE), "device_type": (str, _NONE),
        "launcher": (str, _NONE), "data_index": (dict, _NONE), "compute": (dict, _NONE)}),
    "task": ((), {"spec": (dict,), "executor": (str, _NONE), "job_id": (str, _NONE), "job_folder": (str, _NONE),
                  "submitted_at": (*_NUM, _NONE), "stdout": (str, _NONE), "stderr": (str, _NONE)}),
    "task_state": ((), {"state": (str, _NONE), "attempts": (int,), "job_id": (str, _NONE), "log": (str, _NONE),
                        "host": (str, _NONE), "pid": (int, _NONE), "ppid": (int, _NONE),
                        "proc": (dict, _NONE), "error": (str, _NONE), "traceback": (str, _NONE),
                        "backbone_meta": (dict, _NONE), "started_at": (*_NUM, _NONE), "updated_at": (*_NUM, _NONE),
                        "ended_at": (*_NUM, _NONE), "cancelled_at": (*_NUM, _NONE), "requeued_at": (*_NUM, _NONE),
                        "layout": (dict, _NONE)}),
    "run": (("hash", "identity"), {"hash": (str,), "identity": (dict,), "data_index": (dict, _NONE)}),
    "pin": (("sha256", "size"), {"sha256": (str,), "size": (int,), "mtime_ns": (int, _NONE)}),
    "lock": ((), {"pid": (int,), "host": (str,), "started": (str,), "task": (str, _NONE)}),
    "object": ((), {}),  # any other suite JSON file: an object, nothing more assumed
}


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (iterative: never recurses itself)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _type_word(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", _NONE: "null"}.get(type(v), type(v).__name__)


def check_schema(data: Any, kind: str, path: str | os.PathLike) -> dict:
    """Check a parsed JSON value against :data:`SCHEMAS` ``[kind]``. Returns it (a dict).

    Raises:
        UnsafeFileError: not an object, a required key missing, a key of the wrong type (one line).
    """
    required, types = SCHEMAS[kind]
    if not isinstance(data, dict):
        raise UnsafeFileError(f"{path}: {kind} file holds {_type_word(data)}, not a JSON object; refused")
    for k in required:
        if k not in data:
            raise UnsafeFileError(f"{path}: {kind} file has no {k!r} entry; refused")
    for k, accepted in types.items():
        if k not in data:
            continue
        v = data[k]
        if isinstance(v, bool) and bool not in accepted:
            ok = False
        else:
            ok = isinstance(v, accepted)
        if not ok:
            want = " or ".join(_type_word(t()) if t is not _NONE else "null" for t in accepted)
            raise UnsafeFileError(f"{path}: {kind} file: {k!r} is {_type_word(v)} ({str(v)[:40]!r}), expected "
                                  f"{want}; refused")
    return data


def load_json(path: str | os.PathLike, kind: str, root: str | os.PathLike | None = None, *,
              missing_ok: bool = False) -> dict | None:
    """Read one of the suite's own JSON files: a regular file (:func:`read_regular`, inside ``root``
    when given), at most :data:`MAX_JSON_BYTES`, nested at most :data:`MAX_JSON_DEPTH` levels, valid
    UTF-8 JSON, and of the shape :data:`SCHEMAS` ``[kind]`` describes.

    Args:
        kind: ``"metrics"``, ``"task"``, ``"task_state"``, ``"run"``, ``"pin"`` or ``"lock"``.
        missing_ok: return None for a file that does not exist (else :class:`UnsafeFileError`).

    Raises:
        UnsafeFileError: one line naming the file and the problem.
    """
    path = Path(path)
    try:
        raw = read_regular(path, root, max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UnsafeFileError(f"{path}: no such file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeFileError(f"{path}: not UTF-8 text; refused") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise UnsafeFileError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refused") from None
    except ValueError as exc:
        first = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise UnsafeFileError(f"{path}: not valid JSON ({first})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise UnsafeFileError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refused")
    return check_schema(data, kind, path)
