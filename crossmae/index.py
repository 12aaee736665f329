"""Dataset indexes: built once per split, cached on disk, memory-mapped by every process that reads them.

Every task's dataset (pretraining and classification ImageFolder, iNat 2019, Places365, COCO,
ADE20K) keeps its list of samples here as a few flat NumPy arrays (paths as one UTF-8 blob plus
int64 offsets, labels as an integer array, COCO polygons as one float64 coordinate array plus offset
arrays), never as millions of Python objects. A DataLoader worker reading item ``i`` slices those
arrays: no Python object of the index has its reference count touched, so copy-on-write copies no
page of it (pytorch/pytorch#13246; detectron2 ``data/common.py`` serialises its dataset dicts for
the same reason).

Cache (one file per split)
--------------------------
Folder ``$CROSSMAE_INDEX_CACHE``, else ``~/.cache/crossmae/index``; never inside the dataset folder
(refused with a one-line error). The file name is the SHA-256 of (kind, dataset folder, loader
parameters, :data:`INDEX_VERSION`); the file records what it was built from:

- list / json / category files: absolute path, size, ``mtime_ns`` and SHA-256;
- folders that were listed (ImageFolder split and class folders): path and ``mtime_ns`` (adding,
  removing or renaming an entry changes its folder's mtime).

A warm start re-``stat``s those sources (no file is hashed, no image is touched) and maps the file.
A changed source, a truncated or foreign file, or another :data:`INDEX_VERSION` rebuilds it, with
one log line saying why. The build (including the image existence check of list-file datasets) runs
in one process at a time per cache folder: the others wait on ``fcntl.flock`` of a lock file next to
it, for at most ``$CROSSMAE_INDEX_LOCK_TIMEOUT`` seconds (default 3600), then fail with one line.
Writes are atomic (:func:`crossmae.safeio.atomic_write`: temporary file, ``fsync``, ``rename``).

Cache files are untrusted input: opened with ``O_NOFOLLOW`` (no symlink), regular files only, inside
the cache folder; magic, version, key, every array's dtype / shape / extent, and per-kind invariants
(offsets non-decreasing and within their blob, labels within the class count) are checked before use.

Fingerprint: SHA-256 over the index version, kind, parameters, the sources' SHA-256 and the index
arrays themselves — the same data gives the same fingerprint on every machine. It is recorded in
``metrics.json`` (``data_index``) and in ``run.json``; resuming a run whose data split's fingerprint
changed is refused (``crossmae.runs.RunDir``).

File layout: ``MAGIC`` (16 bytes), header length (8 bytes little-endian), the JSON header, zero
padding to :data:`ALIGN`, then each array's raw bytes at the offset the header gives (aligned).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import safeio
from .utils import UserError, sha256_file

#: Bump when the content or layout of any index changes: every cache file is rebuilt.
INDEX_VERSION = 1
CACHE_ENV = "CROSSMAE_INDEX_CACHE"
LOCK_TIMEOUT_ENV = "CROSSMAE_INDEX_LOCK_TIMEOUT"
MAGIC = b"CROSSMAE-INDEX\x00\x01"
ALIGN = 64
_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "float32", "float64"}
_MAX_HEADER = 64 << 20

log = logging.getLogger("crossmae.index")

# fingerprints of the indexes loaded by this process: source -> fingerprint, in load order
_LOADED: list[tuple[str, str]] = []


def _say(msg: str) -> None:
    """One log line (also on stderr when logging is not configured)."""
    if log.hasHandlers():
        log.warning(msg)
    else:
        import sys
        print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The index cache folder: ``$CROSSMAE_INDEX_CACHE`` or ``~/.cache/crossmae/index`` (absolute)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "crossmae" / "index"


def index_mark() -> int:
    """A position in this process's list of loaded indexes (see :func:`loaded_since`)."""
    return len(_LOADED)


def loaded_since(mark: int = 0) -> dict[str, str]:
    """``{source path: fingerprint}`` of the indexes this process loaded since ``mark``."""
    return {src: fp for src, fp in _LOADED[mark:]}


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
def file_source(path: str | os.PathLike) -> dict:
    """The record of a list / json file an index is built from: path, size, mtime_ns (stat'ed now;
    the SHA-256 is added when the index is written)."""
    p = Path(path).absolute()
    st = os.stat(p)
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dir_source(path: str | os.PathLike) -> dict:
    """The record of a folder whose listing an index holds: path and mtime_ns."""
    p = Path(path).absolute()
    return {"path": str(p), "dir": True, "mtime_ns": os.stat(p).st_mtime_ns}


def _source_changed(src: dict) -> str | None:
    try:
        st = os.stat(src["path"])
    except OSError:
        return f"{src['path']} is gone"
    if src.get("dir"):
        if not stat.S_ISDIR(st.st_mode) or st.st_mtime_ns != src["mtime_ns"]:
            return f"folder {src['path']} changed"
    elif st.st_size != src["size"] or st.st_mtime_ns != src["mtime_ns"]:
        return f"{src['path']} changed"
    return None


# --------------------------------------------------------------------------------------------------
# string tables
# --------------------------------------------------------------------------------------------------
def pack_strings(strings: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 blob (uint8 (B,)) and offsets (int64 (N+1,)) of ``strings``; string i is
    ``blob[off[i]:off[i+1]]``."""
    enc = [s.encode("utf-8", "surrogateescape") for s in strings]
    off = np.zeros(len(enc) + 1, dtype=np.int64)
    if enc:
        np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)), out=off[1:])
    blob = np.frombuffer(b"".join(enc), dtype=np.uint8) if enc else np.zeros(0, np.uint8)
    return blob, off


class StringTable(Sequence):
    """Read-only sequence of strings over a UTF-8 blob and int64 offsets (:func:`pack_strings`),
    with an optional common ``prefix`` added to every item."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, prefix: str = ""):
        self.blob, self.off, self.prefix = blob, offsets, prefix
        self._source: tuple | None = None

    @classmethod
    def of(cls, index: "Index", blob: str, offsets: str, prefix: str = "") -> "StringTable":
        """The table of arrays ``blob`` / ``offsets`` of ``index``; pickles as a reference to the
        index (its cache file), never as the arrays."""
        t = cls(index[blob], index[offsets], prefix)
        t._source = (index, blob, offsets)
        return t

    def __getstate__(self):
        if self._source is None:
            return self.__dict__
        return {"_source": self._source, "prefix": self.prefix}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._source is not None:
            index, blob, offsets = self._source
            self.blob, self.off = index[blob], index[offsets]

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        a, b = int(self.off[i]), int(self.off[i + 1])
        return self.prefix + self.blob[a:b].tobytes().decode("utf-8", "surrogateescape")


def check_offsets(name: str, off: np.ndarray, end: int) -> None:
    """Offsets must start at 0, never decrease and end at ``end``; raises ValueError otherwise."""
    if off.ndim != 1 or len(off) < 1 or int(off[0]) != 0 or int(off[-1]) != end or \
            (len(off) > 1 and bool((np.diff(off) < 0).any())):
        raise ValueError(f"array {name!r}: bad offsets")


# --------------------------------------------------------------------------------------------------
# the cache file
# --------------------------------------------------------------------------------------------------
class Index:
    """A loaded index: ``arrays`` (name → read-only ndarray over the memory-mapped file), ``meta``
    (small JSON: class names, path prefixes, ...), ``fingerprint`` (64 hex), ``source`` (what it
    indexes, for messages), ``path`` (the cache file).

    Pickling (DataLoader workers started with ``spawn``) carries the path only: the unpickled copy
    maps the same file again and checks its fingerprint."""

    def __init__(self, path: Path, header: dict, mm: mmap.mmap | None, arrays: dict[str, np.ndarray]):
        self.path, self.header, self._mm, self.arrays = path, header, mm, arrays
        self.meta = header["meta"]
        self.fingerprint = header["fingerprint"]
        self.source = header["source"]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __getstate__(self):
        return {"path": str(self.path), "fingerprint": self.fingerprint, "key": self.header["key"]}

    def __setstate__(self, state):
        idx = _open_cache(Path(state["path"]), state["key"])
        if idx.fingerprint != state["fingerprint"]:
            raise UserError(f"{state['path']}: index cache file changed while the run was reading it")
        self.__dict__.update(idx.__dict__)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _fingerprint(header: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: header[k] for k in ("version", "kind", "params")}, sort_keys=True).encode())
    for s in header["sources"]:
        h.update((s.get("sha256") or s["path"]).encode() if not s.get("dir") else b"dir")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    h.update(json.dumps(header["meta"], sort_keys=True).encode())
    return h.hexdigest()


def _write_cache(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    table, pos = {}, 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"index array {name}: dtype {a.dtype} not allowed")
        table[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": pos, "nbytes": a.nbytes}
        pos = _align(pos + a.nbytes)
    header = dict(header, arrays=table, data_size=pos)
    hb = json.dumps(header, sort_keys=True).encode()
    start = _align(len(MAGIC) + 8 + len(hb))
    header_blob = MAGIC + struct.pack("<Q", len(hb)) + hb

    def write(f) -> None:
        f.write(header_blob + b"\0" * (start - len(header_blob)))
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            f.seek(start + table[name]["offset"])
            f.write(a.reshape(-1).view(np.uint8))
        f.truncate(start + pos)

    # a stale cache entry that is a symlink, a FIFO or another non-regular file (never a folder) is
    # replaced, never written through (a link goes, its target stays); the temporary file is the one
    # of every atomic write (crossmae.safeio: an unguessable name created O_EXCL | O_NOFOLLOW in the
    # folder, fsync, rename)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        path.unlink()
    safeio.atomic_write(path, write, binary=True)


class _Stale(Exception):
    """The cache file cannot be used (the message says why); it is rebuilt."""


def _open_cache(path: Path, key: str) -> Index:
    """Map and check a cache file. Raises :class:`_Stale` (missing, foreign, truncated, another
    version, a symlink or not a regular file)."""
    try:
        # O_NONBLOCK: a FIFO planted at the cache name must not block the open (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _Stale("") from None
    except OSError as exc:
        raise _Stale(f"cannot open it ({exc.strerror}; a symlink is never followed)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Stale("not a regular file")
        head = os.pread(fd, len(MAGIC) + 8, 0)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
            raise _Stale("not an index cache file (bad magic)")
        (hlen,) = struct.unpack("<Q", head[len(MAGIC):])
        if hlen > min(_MAX_HEADER, st.st_size):
            raise _Stale("truncated or corrupt header")
        raw = os.pread(fd, hlen, len(MAGIC) + 8)
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            raise _Stale("truncated or corrupt header") from None
        if not isinstance(header, dict) or header.get("version") != INDEX_VERSION:
            raise _Stale(f"index version {header.get('version') if isinstance(header, dict) else '?'}, "
                         f"this code writes {INDEX_VERSION}")
        if header.get("key") != key:
            raise _Stale("a foreign file (built for another dataset or parameters)")
        for k, t in (("meta", dict), ("sources", list), ("arrays", dict), ("fingerprint", str), ("source", str),
                     ("data_size", int)):
            if not isinstance(header.get(k), t):
                raise _Stale(f"header field {k!r} missing")
        start = _align(len(MAGIC) + 8 + hlen)
        if st.st_size != start + header["data_size"]:
            raise _Stale(f"truncated or padded (size {st.st_size}, expected {start + header['data_size']})")
        for src in header["sources"]:
            if not isinstance(src, dict) or not isinstance(src.get("path"), str):
                raise _Stale("bad source record")
            why = _source_changed(src)
            if why:
                raise _Stale(why)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
    finally:
        os.close(fd)
    arrays = {}
    try:
        for name, spec in header["arrays"].items():
            dt = spec.get("dtype")
            if dt not in _DTYPES:
                raise _Stale(f"array {name!r}: dtype {dt!r} not allowed")
            shape = tuple(int(x) for x in spec["shape"])
            if any(x < 0 for x in shape):
                raise _Stale(f"array {name!r}: bad shape")
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count * np.dtype(dt).itemsize
            off = int(spec["offset"])
            if nbytes != spec.get("nbytes") or off < 0 or off % ALIGN or off + nbytes > header["data_size"]:
                raise _Stale(f"array {name!r}: extent outside the file")
            arrays[name] = np.frombuffer(mm, dtype=dt, count=count, offset=start + off).reshape(shape) \
                if count else np.zeros(shape, dtype=dt)
    except (KeyError, TypeError, ValueError) as exc:
        raise _Stale(f"bad array table ({exc})") from None
    return Index(path, header, mm, arrays)


def _key(kind: str, root: Path, params: dict) -> str:
    text = json.dumps({"version": INDEX_VERSION, "kind": kind, "root": str(root), "params": params},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _check_location(folder: Path, root: Path) -> None:
    f = os.path.realpath(folder)
    for r in (root, os.environ.get("CROSSMAE_DATA_ROOT")):
        if not r:
            continue
        r = os.path.realpath(r)
        if f == r or f.startswith(r.rstrip("/") + "/"):
            raise UserError(f"{folder}: index cache folder is inside the data folder {r} (data is read-only "
                            f"input); set {CACHE_ENV} to another folder")


def _lock(folder: Path, name: str, what: str):
    """Take an exclusive ``flock`` on ``folder/name``, waiting at most the lock timeout.
    Returns the fd. Raises UserError on timeout."""
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, "3600"))
    path = folder / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise UserError(f"{path}: cannot open the index lock file ({exc.strerror}); set {CACHE_ENV} to a "
                        f"writable folder") from None
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise UserError(f"{path}: waited {timeout:g} s for another process to finish the index of {what}; "
                                f"if none is running, remove the lock file (or raise {LOCK_TIMEOUT_ENV})") from None
            if not said:
                _say(f"index: waiting for another process to finish the index of {what}")
                said = True
            time.sleep(0.05)


Builder = Callable[[], tuple[dict[str, np.ndarray], dict, list[dict]]]


def _in_child(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child process and re-raise its exception here (pickled; a traceback
    text when it cannot be pickled). The millions of temporary Python objects of a build (a parsed
    json, path strings) then never fragment this process's heap: it only maps the written file."""
    import pickle
    import traceback
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: never returns
        os.close(r)
        status = 0
        try:
            try:
                fn()
                msg = pickle.dumps(None)
            except BaseException as exc:  # noqa: BLE001  (sent to the parent)
                try:   # input errors as they are; a bug with the child's traceback
                    if not isinstance(exc, (UserError, OSError)):
                        raise TypeError
                    msg = pickle.dumps(exc)
                    pickle.loads(msg)
                except Exception:  # noqa: BLE001
                    msg = pickle.dumps(RuntimeError("index build failed in the child process:\n"
                                                    + "".join(traceback.format_exception(exc))))
            view = memoryview(msg)
            while view:
                view = view[os.write(w, view):]
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            b = f.read(1 << 16)
            if not b:
                break
            chunks.append(b)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError(f"index build process {pid} died (wait status {status})")
    exc = pickle.loads(b"".join(chunks))
    if exc is not None:
        raise exc


def load_or_build(kind: str, root: str | os.PathLike, source: str | os.PathLike, params: dict, build: Builder,
                  validate: Callable[[Index], None] | None = None) -> Index:
    """The index of one dataset split, from the cache when it is current, else built (once per cache
    folder at a time) and written there.

    Args:
        kind: index kind (``"imagefolder"``, ``"places365"``, ...), part of the cache key.
        root: the dataset folder (the cache must not be inside it).
        source: the file or folder the split is read from (named in messages and in ``data_index``).
        params: loader parameters that change the index (JSON-able), part of the key.
        build: ``() -> (arrays, meta, sources)``: the arrays (name → ndarray of an allowed dtype), a
            small JSON-able ``meta`` dict and the source records (:func:`file_source` taken BEFORE
            reading a file, :func:`dir_source` before listing a folder). Raises UserError on bad input.
        validate: per-kind invariant check of a loaded index; raises ValueError when broken.

    Returns:
        the :class:`Index` (arrays memory-mapped read-only).

    Raises:
        UserError: from ``build``; the cache folder is inside ``root`` or cannot be created; the lock
            wait timed out.
    """
    root = Path(root).absolute()
    folder = cache_dir()
    _check_location(folder, root)
    key = _key(kind, root, params)
    path = folder / f"{kind}-{key}.idx"
    what = str(source)

    def attempt() -> tuple[Index | None, str]:
        try:
            idx = _open_cache(path, key)
            if validate is not None:
                try:
                    validate(idx)
                except (ValueError, KeyError, IndexError) as exc:
                    raise _Stale(f"inconsistent content ({exc})") from None
            return idx, ""
        except _Stale as exc:
            return None, str(exc)

    idx, why = attempt()
    if idx is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{folder}: cannot create the index cache folder ({exc.strerror}); set {CACHE_ENV}") from None
        safeio.real_dir(folder, "index cache folder")   # a symlink or a file: refused before any build
        fd = _lock(folder, f"{kind}-{key}.lock", what)
        try:
            idx, why2 = attempt()          # another process may have built it while we waited
            if idx is None:
                why = why2 or why
                _say(f"index: building the index of {what}" + (f" (cache {path.name}: {why})" if why else "")
                     + f" in {folder}")
                def build_and_write():
                    t0 = time.perf_counter()
                    arrays, meta, sources = build()
                    for s in sources:
                        if not s.get("dir"):
                            s["sha256"] = sha256_file(s["path"])
                    header = {"version": INDEX_VERSION, "kind": kind, "key": key, "params": params, "source": what,
                              "root": str(root), "meta": meta, "sources": sources,
                              "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_s": 0.0}
                    header["fingerprint"] = _fingerprint(header, arrays)
                    header["build_s"] = round(time.perf_counter() - t0, 3)
                    try:
                        _write_cache(path, header, arrays)
                    except OSError as exc:
                        raise UserError(f"{path}: cannot write the index cache ({exc.strerror or exc}); "
                                        f"free space or set {CACHE_ENV}") from None

                _in_child(build_and_write)
                idx, why3 = attempt()
                if idx is None:
                    raise UserError(f"{path}: the index just written cannot be read back ({why3})")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    _LOADED.append((what, idx.fingerprint))
    return idx


# --------------------------------------------------------------------------------------------------
# (path, label) samples
# --------------------------------------------------------------------------------------------------
def pack_paths(prefix: str, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pack full path strings as tails after ``prefix`` when every path starts with it (the usual
    case), else whole. Returns ``(blob, offsets, tails)``; item i is ``(prefix if tails else '') +
    string i``."""
    tails = bool(prefix) and all(p.startswith(prefix) for p in paths)
    n = len(prefix) if tails else 0
    blob, off = pack_strings(p[n:] for p in paths) if n else pack_strings(paths)
    return blob, off, tails


class PathLabels(Sequence):
    """The ``samples`` of a classification split as a read-only sequence of ``(path str, label int)``
    over an :class:`Index` holding ``path_blob`` (uint8), ``path_off`` (int64 (N+1,)) and ``labels``
    (int32 (N,)); ``meta["tails"]`` says the strings are tails after ``prefix``. ``sel`` (int64 (M,))
    selects and orders a subset (slices and ``subset`` give views, nothing is copied per item).

    Reading an item touches only the mapped arrays: no per-item Python object exists until it is read.
    """

    def __init__(self, index: Index, prefix: str, sel: np.ndarray | None = None):
        self.index = index
        self.prefix = prefix if index.meta.get("tails") else ""
        self.paths = StringTable.of(index, "path_blob", "path_off", self.prefix)
        self.sel = sel

    @property
    def labels(self) -> np.ndarray:
        """int32 (len,) labels in sample order (a view, or a gathered copy when a subset is selected)."""
        lab = self.index["labels"]
        return lab if self.sel is None else lab[self.sel]

    def __len__(self) -> int:
        return len(self.paths) if self.sel is None else len(self.sel)

    def __getitem__(self, i):
        if isinstance(i, slice):
            base = np.arange(len(self.paths), dtype=np.int64) if self.sel is None else self.sel
            return PathLabels(self.index, self.prefix, np.ascontiguousarray(base[i]))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        j = i if self.sel is None else int(self.sel[i])
        return self.paths[j], int(self.index["labels"][j])

    def select(self, indices: Sequence[int]) -> "PathLabels":
        """A view of the samples at ``indices`` (positions in this sequence), in that order."""
        base = np.arange(len(self.paths), dtype=np.int64) if self.sel is None else self.sel
        return PathLabels(self.index, self.prefix, np.ascontiguousarray(base[np.asarray(indices, dtype=np.int64)]))


def validate_path_labels(idx: Index) -> None:
    """Invariants of a (path, label) index: offsets within the blob, labels within the classes."""
    check_offsets("path_off", idx["path_off"], len(idx["path_blob"]))
    lab = idx["labels"]
    if lab.shape != (len(idx["path_off"]) - 1,):
        raise ValueError("labels and paths differ in length")
    k = int(idx.meta.get("num_classes", 0))
    if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= k):
        raise ValueError(f"labels outside 0..{k - 1}")


def path_label_arrays(prefix: str, samples: Sequence[tuple[str, int]], meta: dict) -> tuple[dict, dict]:
    """Arrays + meta of a (path, label) index from build-time samples."""
    blob, off, tails = pack_paths(prefix, [p for p, _ in samples])
    labels = np.fromiter((y for _, y in samples), dtype=np.int32, count=len(samples))
    return {"path_blob": blob, "path_off": off, "labels": labels}, dict(meta, tails=tails)


# --------------------------------------------------------------------------------------------------
# ImageFolder (both flavours)
# --------------------------------------------------------------------------------------------------
def _suffix(name: str) -> str:
    """``pathlib.PurePath.suffix`` of a file name."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _walk(top: str, extensions: tuple[str, ...]):
    """``(folder, file names)`` of ``os.walk(top, followlinks=True)`` (top-down, unreadable folders
    skipped), without one ``stat`` per image: an entry whose type the folder listing gives (regular
    file, folder) is classified from it, as ``os.walk`` does; a symlink whose name ends with an image
    extension is taken as an image (``os.walk`` would ``stat`` it to learn whether it links to a
    folder); other symlinks are ``stat``-ed. Differs from ``os.walk`` only for a symlink to a folder
    named like an image."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        files, dirs = [], []
        with it:
            for e in it:
                try:
                    if e.is_symlink() and e.name.lower().endswith(extensions):
                        is_dir = False
                    else:
                        is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                (dirs if is_dir else files).append(e.name)
        yield d, files
        stack.extend(os.path.join(d, x) for x in reversed(dirs))


def imagefolder_index(d: str | os.PathLike, classes: Sequence[str] | None, extensions: tuple[str, ...],
                      recursive: bool, errors: Callable[[str, str], Exception]) -> tuple[Index, list[str]]:
    """The index of an ImageFolder split ``d`` (``<d>/<class>/<image>``) and its class list.

    Two flavours, each reproducing its original order exactly:

    - ``recursive=True``: torchvision ``DatasetFolder`` (``find_classes`` + ``make_dataset``): classes
      = sorted sub-folder names, files of each class from ``sorted(os.walk(class_dir, followlinks=True))``
      then sorted names, kept when ``path.lower()`` ends with one of ``extensions``; paths are
      ``os.path.join(d, class, ..., name)``. The walk is :func:`_walk` (no ``stat`` per image).
    - ``recursive=False``: ``transfer.classification.data.load_imagefolder``: sorted class folders
      (``classes`` = the train split's, when given), sorted entries whose ``PurePath.suffix.lower()``
      is in ``extensions``; paths ``str(Path(d) / class / name)``.

    Args:
        errors: ``(kind, detail) -> exception`` for ``"no_classes"``, ``"unknown_class"`` (detail:
            the class folder), ``"empty_class"`` (detail: class folder, or the sorted class names for
            the recursive flavour).

    Returns:
        (index with ``path_blob``/``path_off``/``labels``, class names).
    """
    given = str(d)
    d = Path(d)
    top = os.path.join(os.path.expanduser(given), "") if recursive else str(d) + "/"

    def build():
        sources = [dir_source(d)]
        found = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if not found:
            raise errors("no_classes", str(d))
        cls = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(cls)}
        samples: list[tuple[str, int]] = []
        if recursive:
            empty = []
            for c in sorted(index):
                target = os.path.join(os.path.expanduser(given), c)
                if not os.path.isdir(target):
                    continue
                n0 = len(samples)
                for walk_root, fnames in sorted(_walk(target, extensions)):
                    sources.append(dir_source(walk_root))
                    for f in sorted(fnames):
                        path = os.path.join(walk_root, f)
                        if path.lower().endswith(extensions):
                            samples.append((path, index[c]))
                if len(samples) == n0:
                    empty.append(c)
            if empty:
                raise errors("empty_class", ", ".join(sorted(empty)))
        else:
            for c in found:
                if c not in index:
                    raise errors("unknown_class", str(d / c))
                sources.append(dir_source(d / c))
                names = sorted(e.name for e in os.scandir(d / c) if _suffix(e.name).lower() in extensions)
                if not names:
                    raise errors("empty_class", str(d / c))
                pre = top + c + "/"
                samples += [(pre + f, index[c]) for f in names]
        arrays, meta = path_label_arrays(top, samples, {"classes": cls, "num_classes": len(cls)})
        return arrays, meta, sources

    params = {"given": given, "classes": list(classes) if classes is not None else None,
              "extensions": list(extensions), "recursive": recursive}
    idx = load_or_build("imagefolder", d, d, params, build, validate_path_labels)
    return idx, list(idx.meta["classes"])
