"""The on-disk memory of kernel choices: one small JSON file per namespace.

Location: ``$ATTNFUSE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/attnfuse``, else
``~/.cache/attnfuse``; the directory is created on the first write.

Format: ``<dir>/<namespace>.json`` = ``{"format": 1, "entries": {digest: {"key": {...},
"value": {...}, "written": iso-time}}}``. The key is all a choice depends on (shape buckets,
dtype, :func:`environment`, :func:`source_hash`); ``digest`` is the sha256 of its canonical
JSON (sorted keys), so key order never matters.

Atomicity: a write takes ``<file>.lock`` (a cross-process file lock) plus a per-store thread
lock, re-reads the file, merges its entry and ``os.replace``-s a temp file in the same
directory, so concurrent processes and threads never lose entries or see a half-written file.
A corrupt file is warned about and treated as empty; an unwritable directory is warned about
once and the store keeps working in memory.

Switches: ``ATTNFUSE_DISABLE_CACHE=1`` makes every lookup miss and writes nothing.
``ATTNFUSE_PIN=<file>`` (or :func:`pin`) loads a file made by :func:`export` as a fixed table
of choices for reproducible runs; :func:`clear` deletes the cache files.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import threading
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Hashable, Iterable, Mapping, Optional, Tuple, Union

import filelock

log = logging.getLogger(__name__)
FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # namespaces become file names
_global = threading.Lock()  # guards every process-wide table below
_stores: Dict[Tuple[str, str], "Store"] = {}
_env_memo: Dict[Tuple[str, Optional[int]], Dict[str, str]] = {}
_hash_memo: Dict[Tuple[str, ...], str] = {}
_tuning_locks: Dict[Hashable, threading.Lock] = {}
_pinned: Optional[Dict[str, Dict[str, Dict[str, Any]]]] = None
_env_pin_applied: Optional[str] = None  # the ATTNFUSE_PIN value already loaded (or unpinned)


def cache_dir() -> Path:
    """Where cache files live (read from the environment on every call, so tests can move it)."""
    if os.environ.get("ATTNFUSE_CACHE_DIR"):
        return Path(os.environ["ATTNFUSE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attnfuse"


def disabled() -> bool:
    """ATTNFUSE_DISABLE_CACHE=1: every lookup misses and nothing is written."""
    return os.environ.get("ATTNFUSE_DISABLE_CACHE", "").strip().lower() in ("1", "true", "yes", "on")


def environment(device: Any) -> Dict[str, str]:
    """What a stored choice depends on besides the shape: versions and the device's identity."""
    import torch  # lazy: this module must stay importable without torch

    dev = torch.device(device)
    index = torch.cuda.current_device() if dev.type == "cuda" and dev.index is None else dev.index
    memo_key = (dev.type, index)
    if memo_key in _env_memo:  # a racing first call computes the same dict twice: harmless
        return dict(_env_memo[memo_key])
    from attnfuse import __version__ as ours  # lazy: attnfuse/__init__ may import us

    try:
        import triton

        triton_version = str(triton.__version__)
    except Exception:  # absent or broken triton: choices made without it are still valid
        triton_version = "none"
    env = {"attnfuse": str(ours), "torch": str(torch.__version__), "triton": triton_version,
           "device": dev.type}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(index)
        env.update(name=str(props.name), sm_count=str(props.multi_processor_count),
                   capability=f"{props.major}.{props.minor}",
                   cuda=str(torch.version.cuda))
    elif dev.type == "cpu":
        env.update(machine=platform.machine(), processor=platform.processor(),
                   cpus=str(os.cpu_count()))
    _env_memo[memo_key] = env
    return dict(env)


def source_hash(*modules_or_paths: Union[ModuleType, str, os.PathLike]) -> str:
    """sha256 (16 hex chars) of the given modules' source files, memoized for the process."""
    paths = []
    for m in modules_or_paths:
        path = getattr(m, "__file__", None) if isinstance(m, ModuleType) else m
        if path is None:
            raise ValueError(f"module {m!r} has no source file")
        paths.append(str(Path(path).resolve()))
    memo_key = tuple(sorted(paths))  # argument order must not change the hash
    if memo_key not in _hash_memo:
        h = hashlib.sha256()
        for p in memo_key:
            h.update(Path(p).name.encode() + b"\0" + Path(p).read_bytes() + b"\0")
        _hash_memo[memo_key] = h.hexdigest()[:16]
    return _hash_memo[memo_key]


def bucket(n: int) -> int:
    """Smallest power of two >= n: nearby shapes share one stored choice."""
    if n < 1:
        raise ValueError(f"bucket() needs n >= 1, got {n}")
    return 1 << (int(n) - 1).bit_length()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _load_entries(path: Path) -> Dict[str, Dict[str, Any]]:
    """Entries of one cache file; ValueError/OSError when it is not a valid cache file."""
    doc = json.loads(path.read_text())
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("entries"), dict)):
        raise ValueError("not an attnfuse cache file (format 1)")
    return {d: e for d, e in doc["entries"].items()
            if isinstance(e, dict) and isinstance(e.get("value"), dict)}  # drop mangled entries


def _read(path: Path) -> Dict[str, Dict[str, Any]]:
    """Entries of a cache file; a missing one is empty, a corrupt one is warned about and empty."""
    try:
        return _load_entries(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("attnfuse cache %s is unreadable (%s); treating it as empty", path, e)
        return {}


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Temp file in the same directory + os.replace: readers see the old or the new file, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


class Store:
    """One namespace of remembered choices, backed by ``<dir>/<namespace>.json``."""

    def __init__(self, namespace: str, directory: Optional[Path] = None) -> None:
        if not _NAME.match(namespace):
            raise ValueError(f"bad cache namespace {namespace!r}: use letters, digits, '_', '.', '-'")
        self.namespace = namespace
        self.directory = Path(directory) if directory is not None else cache_dir()
        self.path = self.directory / f"{namespace}.json"
        self._lock = threading.Lock()
        self._forget()

    def _forget(self) -> None:
        self._disk: Dict[str, Dict[str, Any]] = {}
        self._stamp: Optional[Tuple[int, ...]] = None
        self._pending: Dict[str, Dict[str, Any]] = {}  # entries we could not write to disk
        self._warned_write = False

    def _refresh(self) -> None:
        """Re-read the file only when it changed (a new inode, mtime or size)."""
        try:
            st = os.stat(self.path)
            stamp: Optional[Tuple[int, ...]] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp, self._disk = stamp, _read(self.path) if stamp is not None else {}

    def get(self, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        if disabled():
            return None
        digest = _digest(key)
        with self._lock:
            self._refresh()
            entry = self._pending.get(digest) or self._disk.get(digest)
            return copy.deepcopy(entry["value"]) if entry else None

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> None:
        if disabled():
            return
        entry = {"key": json.loads(_canonical(key)), "value": json.loads(_canonical(value)),
                 "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with self._lock:
            self._pending[_digest(key)] = entry
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with filelock.FileLock(str(self.path) + ".lock", timeout=60):
                    entries = {**_read(self.path), **self._pending}  # merge other writers' entries
                    _write_json(self.path, {"format": FORMAT, "entries": entries})
                    st = os.stat(self.path)
                self._disk, self._stamp = entries, (st.st_ino, st.st_mtime_ns, st.st_size)
                self._pending = {}
            except OSError as e:  # unwritable dir, lock timeout, full disk: keep it in memory
                if not self._warned_write:
                    self._warned_write = True
                    log.warning("attnfuse cannot write its cache %s (%s); keeping choices in memory",
                                self.path, e)

    def entries(self) -> Dict[str, Dict[str, Any]]:
        if disabled():
            return {}
        with self._lock:
            self._refresh()
            return copy.deepcopy({**self._disk, **self._pending})

    def __len__(self) -> int:
        return len(self.entries())


def store(namespace: str) -> Store:
    """The process-wide store of ``namespace`` in the current cache_dir()."""
    key = (namespace, str(cache_dir()))
    with _global:
        if key not in _stores:
            _stores[key] = Store(namespace, Path(key[1]))
        return _stores[key]


def _ours(path: Path) -> bool:
    """A cache file we wrote: valid format, or (corrupt but) next to the lock we take for it."""
    try:
        _load_entries(path)
        return True
    except (OSError, ValueError):
        return Path(str(path) + ".lock").exists()


def clear() -> int:
    """Delete attnfuse's cache files (``*.json`` that are ours, ``*.json.lock``); return the count."""
    directory, removed = cache_dir(), 0
    with _global:
        for s in _stores.values():
            with s._lock:
                s._forget()
        _stores.clear()
    if not directory.is_dir():
        return 0
    victims = [p for p in directory.glob("*.json") if p.is_file() and _ours(p)]
    for p in victims + [p for p in directory.glob("*.json.lock") if p.is_file()]:
        with suppress(FileNotFoundError):  # another process may have cleared it first
            p.unlink()
            removed += 1
    return removed


def export(path: Union[str, os.PathLike], namespaces: Optional[Iterable[str]] = None) -> int:
    """Write the entries of ``namespaces`` (default: every cache file) to one pin file."""
    if namespaces is None:
        namespaces = sorted(p.stem for p in cache_dir().glob("*.json") if _ours(p))
    table = {ns: {dg: {"key": e.get("key"), "value": e["value"]} for dg, e in store(ns).entries().items()}
             for ns in namespaces}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_json(target, {"format": FORMAT, "pinned": table})
    return sum(len(t) for t in table.values())


def pin(path: Union[str, os.PathLike]) -> None:
    """Use the table in ``path`` (made by :func:`export`) for every lookup of this process."""
    global _pinned
    try:
        doc = json.loads(Path(path).read_text())
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("pinned"), dict)):
            raise ValueError("not a pin file made by attnfuse.cache.export()")
        # re-digest from the key, so hand-edited keys still match
        table = {ns: {_digest(e["key"]) if "key" in e else dg: e for dg, e in entries.items()}
                 for ns, entries in doc["pinned"].items()}
        if not all(isinstance(e.get("value"), dict) for t in table.values() for e in t.values()):
            raise ValueError("an entry has no value")
    except (OSError, ValueError, TypeError, AttributeError) as e:  # unreadable, bad JSON, wrong shapes
        raise ValueError(f"cannot pin attnfuse choices from {path}: {e}") from e
    with _global:
        _pinned = table


def unpin() -> None:
    global _pinned
    with _global:
        _pinned = None


def _pin_from_env() -> None:
    """ATTNFUSE_PIN pins lazily, once per value (so unpin() sticks and a bad file keeps failing)."""
    global _env_pin_applied
    path = os.environ.get("ATTNFUSE_PIN")
    if path and path != _env_pin_applied:
        pin(path)
        _env_pin_applied = path


def pinned() -> bool:
    _pin_from_env()
    return _pinned is not None


def pinned_value(namespace: str, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    _pin_from_env()
    table = _pinned
    entry = table.get(namespace, {}).get(_digest(key)) if table is not None else None
    return copy.deepcopy(entry["value"]) if entry else None


def tuning_lock(key: Hashable) -> threading.Lock:
    """One lock per tuning key, so two threads making the first call on a shape tune it once."""
    with _global:
        return _tuning_locks.setdefault(key, threading.Lock())
