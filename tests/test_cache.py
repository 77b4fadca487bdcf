"""The on-disk memory of kernel choices: keys, atomic concurrent writes, switches, pinning."""
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attnfuse.tune import cache

CACHE_PY = Path(cache.__file__)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own cache dir and no process-wide state from earlier tests."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(d))
    for var in ("ATTNFUSE_DISABLE_CACHE", "ATTNFUSE_PIN"):
        monkeypatch.delenv(var, raising=False)
    cache.unpin()
    monkeypatch.setattr(cache, "_stores", {})
    monkeypatch.setattr(cache, "_env_pin_applied", None)
    yield d
    cache.unpin()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logged():
    """The cache logger's warnings (caplog is off under ``-p no:logging``)."""
    h = _Records()
    logger = logging.getLogger(cache.__name__)
    logger.addHandler(h)
    yield h.records
    logger.removeHandler(h)


def _doc(path):
    doc = json.loads(Path(path).read_text())
    assert doc["format"] == 1
    return doc


def test_cache_dir_resolution(monkeypatch, tmp_path):
    assert cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("ATTNFUSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "attnfuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "attnfuse"


def test_roundtrip_key_order_and_fresh_instance(_isolated):
    s = cache.store("sel")
    assert not _isolated.exists()  # created lazily, on the first write
    assert s.get({"a": 1}) is None
    s.put({"b": 2, "a": [1, 2], "dtype": torch.float16}, {"kernel": "flash", "block": [64, 32]})
    got = s.get({"dtype": torch.float16, "a": [1, 2], "b": 2})  # same key, another order
    assert got == {"kernel": "flash", "block": [64, 32]}
    got["kernel"] = "mutated"  # a returned value is a copy
    assert s.get({"a": [1, 2], "b": 2, "dtype": torch.float16})["kernel"] == "flash"
    assert s.get({"a": [1, 2], "b": 3, "dtype": torch.float16}) is None
    fresh = cache.Store("sel")  # what a new process would see
    assert fresh.get({"b": 2, "a": [1, 2], "dtype": torch.float16}) == {"kernel": "flash", "block": [64, 32]}
    assert len(fresh) == 1
    (entry,) = _doc(_isolated / "sel.json")["entries"].values()
    assert entry["key"] == {"a": [1, 2], "b": 2, "dtype": "torch.float16"}
    assert entry["value"]["kernel"] == "flash" and "written" in entry
    assert cache.store("sel") is s and cache.store("other") is not s
    with pytest.raises(ValueError):
        cache.Store("../escape")


def test_refresh_when_another_instance_writes(_isolated):
    a, b = cache.Store("ns"), cache.Store("ns")
    a.put({"k": 1}, {"v": 1})
    assert b.get({"k": 1}) == {"v": 1}
    assert a.get({"k": 2}) is None  # a has now cached the file's state
    b.put({"k": 2}, {"v": 2})
    b.put({"k": 1}, {"v": 10})  # overwrite an entry a already knows
    assert a.get({"k": 2}) == {"v": 2}
    assert a.get({"k": 1}) == {"v": 10}
    assert len(a) == 2


def test_threads_write_concurrently(_isolated):
    stores = [cache.Store("threads") for _ in range(2)]  # two instances: file lock and thread locks
    errors = []

    def worker(t):
        try:
            for i in range(25):
                stores[t % 2].put({"t": t, "i": i}, {"v": t * 100 + i})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    entries = _doc(_isolated / "threads.json")["entries"]
    assert len(entries) == 200
    fresh = cache.Store("threads")
    assert all(fresh.get({"i": i, "t": t}) == {"v": t * 100 + i} for t in range(8) for i in range(25))


def test_processes_write_concurrently(_isolated):
    # Load cache.py by path: the children skip importing torch and attnfuse (fast start).
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(CACHE_PY)!r})\n"
        "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
        "s = c.Store('procs')\n"
        "for i in range(15): s.put({'p': int(sys.argv[1]), 'i': i}, {'v': i})\n"
    )
    env = {**os.environ, "ATTNFUSE_CACHE_DIR": str(_isolated)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p)], env=env) for p in range(2)]
    s = cache.Store("procs")
    for i in range(15):  # this process writes at the same time
        s.put({"p": 9, "i": i}, {"v": i})
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    entries = _doc(_isolated / "procs.json")["entries"]
    assert len(entries) == 45
    assert all(s.get({"p": p, "i": i}) == {"v": i} for p in (0, 1, 9) for i in range(15))


def test_disable(monkeypatch, _isolated):
    cache.store("ns").put({"k": 1}, {"v": 1})
    monkeypatch.setenv("ATTNFUSE_DISABLE_CACHE", "1")
    assert cache.disabled()
    s = cache.Store("ns")
    assert s.get({"k": 1}) is None  # no stale disk value
    s.put({"k": 2}, {"v": 2})
    assert s.get({"k": 2}) is None and len(s) == 0
    assert list(_doc(_isolated / "ns.json")["entries"].values())[0]["key"] == {"k": 1}
    assert len(_doc(_isolated / "ns.json")["entries"]) == 1
    cache.store("other").put({"k": 1}, {"v": 1})
    assert not (_isolated / "other.json").exists()
    monkeypatch.setenv("ATTNFUSE_DISABLE_CACHE", "0")
    assert not cache.disabled() and s.get({"k": 1}) == {"v": 1}


def test_clear_removes_only_attnfuse_files(_isolated):
    assert cache.clear() == 0  # no directory yet
    s = cache.store("a")
    s.put({"k": 1}, {"v": 1})
    cache.store("b").put({"k": 1}, {"v": 1})
    (_isolated / "notes.txt").write_text("mine")
    (_isolated / "package.json").write_text('{"name": "not attnfuse"}')
    (_isolated / "sub").mkdir()
    removed = cache.clear()
    assert removed == 4  # a.json, a.json.lock, b.json, b.json.lock
    assert sorted(p.name for p in _isolated.iterdir()) == ["notes.txt", "package.json", "sub"]
    assert s.get({"k": 1}) is None and cache.store("a").get({"k": 1}) is None


def test_corrupt_file_warns_and_is_rewritable(_isolated, logged):
    _isolated.mkdir()
    (_isolated / "ns.json").write_text("{ this is not json")
    s = cache.Store("ns")
    assert s.get({"k": 1}) is None
    assert len(s) == 0
    assert any("unreadable" in r.getMessage() for r in logged)
    s.put({"k": 1}, {"v": 1})
    assert len(_doc(_isolated / "ns.json")["entries"]) == 1
    assert cache.Store("ns").get({"k": 1}) == {"v": 1}
    (_isolated / "ns.json").write_text('{"format": 99, "entries": {}}')  # wrong format: also empty
    assert cache.Store("ns").get({"k": 1}) is None


def _check_memory_only(s, logged):
    s.put({"k": 1}, {"v": 1})
    s.put({"k": 2}, {"v": 2})
    assert s.get({"k": 1}) == {"v": 1} and s.get({"k": 2}) == {"v": 2} and len(s) == 2
    warnings = [r for r in logged if "cannot write" in r.getMessage()]
    assert len(warnings) == 1  # warned once


def test_unwritable_directory(_isolated, logged):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    _isolated.mkdir()
    _isolated.chmod(0o500)
    try:
        _check_memory_only(cache.Store("ns"), logged)
        assert list(_isolated.iterdir()) == []
    finally:
        _isolated.chmod(0o700)


def test_uncreatable_directory(monkeypatch, tmp_path, logged):
    """A cache dir below a regular file cannot be created, even by root."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    _check_memory_only(cache.store("ns"), logged)


def test_export_pin_roundtrip(tmp_path, _isolated):
    cache.store("sel").put({"shape": [1, 8, 128, 64]}, {"kernel": "flash"})
    cache.store("sel").put({"shape": [1, 8, 256, 64]}, {"kernel": "math"})
    cache.store("tile").put({"n": 128}, {"block": 64})
    (_isolated / "package.json").write_text('{"name": "not attnfuse"}')  # not a namespace
    pin_file = tmp_path / "pins" / "choices.json"
    assert cache.export(pin_file) == 3
    assert set(_doc(pin_file)["pinned"]) == {"sel", "tile"}
    assert cache.export(tmp_path / "only.json", namespaces=["tile"]) == 1
    cache.clear()
    assert not cache.pinned()
    assert cache.pinned_value("sel", {"shape": [1, 8, 128, 64]}) is None
    cache.pin(pin_file)
    assert cache.pinned()
    assert cache.pinned_value("sel", {"shape": [1, 8, 128, 64]}) == {"kernel": "flash"}
    assert cache.pinned_value("sel", {"shape": [1, 8, 256, 64]}) == {"kernel": "math"}
    assert cache.pinned_value("tile", {"n": 128}) == {"block": 64}
    assert cache.pinned_value("tile", {"n": 256}) is None
    assert cache.pinned_value("nope", {"n": 128}) is None
    cache.unpin()
    assert not cache.pinned() and cache.pinned_value("tile", {"n": 128}) is None


def test_pin_bad_files(tmp_path):
    with pytest.raises(ValueError, match="cannot pin"):
        cache.pin(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="cannot pin"):
        cache.pin(tmp_path / "bad.json")
    (tmp_path / "entries.json").write_text('{"format": 1, "entries": {}}')  # a cache file, not a pin file
    with pytest.raises(ValueError, match="export"):
        cache.pin(tmp_path / "entries.json")
    assert not cache.pinned()


def test_pin_from_env(monkeypatch, tmp_path):
    cache.store("sel").put({"s": 1}, {"kernel": "flash"})
    cache.export(tmp_path / "pin.json")
    monkeypatch.setenv("ATTNFUSE_PIN", str(tmp_path / "pin.json"))
    assert cache.pinned_value("sel", {"s": 1}) == {"kernel": "flash"}
    assert cache.pinned()
    cache.unpin()  # an explicit unpin wins over the same env value
    assert not cache.pinned()
    monkeypatch.setenv("ATTNFUSE_PIN", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError):
        cache.pinned()


def test_bucket():
    assert [cache.bucket(n) for n in (1, 2, 3, 4, 5, 127, 128, 129, 4097)] == [1, 2, 4, 4, 8, 128, 128, 256, 8192]
    for bad in (0, -3):
        with pytest.raises(ValueError):
            cache.bucket(bad)


def test_environment_cpu():
    import attnfuse

    env = cache.environment(torch.device("cpu"))
    assert env["attnfuse"] == attnfuse.__version__ and env["torch"] == torch.__version__
    assert env["triton"]  # a version, or "none"
    assert env["device"] == "cpu" and env["cpus"] == str(os.cpu_count())
    assert "machine" in env and "processor" in env
    env["torch"] = "mutated"
    assert cache.environment("cpu")["torch"] == torch.__version__  # memo is not shared


def test_environment_cuda_mocked(monkeypatch):
    monkeypatch.setattr(cache, "_env_memo", {})
    props = SimpleNamespace(name="NVIDIA H100", multi_processor_count=132, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    env = cache.environment(torch.device("cuda:0"))
    assert env["name"] == "NVIDIA H100" and env["sm_count"] == "132" and env["capability"] == "9.0"
    assert env["cuda"] == str(torch.version.cuda) and env["device"] == "cuda"


def test_source_hash(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    h = cache.source_hash(a, b)
    assert len(h) == 16 and int(h, 16) >= 0
    assert cache.source_hash(str(b), a) == h
    assert cache.source_hash(a) != h
    assert cache.source_hash(cache) == cache.source_hash(CACHE_PY)


def test_tuning_lock():
    k1, k2 = ("sel", (1, 8, 128, 64)), ("sel", (1, 8, 256, 64))
    assert cache.tuning_lock(k1) is cache.tuning_lock(("sel", (1, 8, 128, 64)))
    assert cache.tuning_lock(k1) is not cache.tuning_lock(k2)
    tuned = []

    def first_call():
        with cache.tuning_lock(("once", 1)):
            if not tuned:
                time.sleep(0.01)
                tuned.append(1)

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert tuned == [1]
