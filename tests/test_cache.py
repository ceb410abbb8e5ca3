import pytest
import torch

from harness.cache import CacheEntry


def test_miss_then_hit_builds_once(tmp_path):
    calls = []
    entry = CacheEntry(tmp_path, "classifier", {"a": 1})

    def build():
        calls.append(1)
        return {"w": torch.ones(3)}

    first, hit1 = entry.get_or_build(build)
    second, hit2 = CacheEntry(tmp_path, "classifier", {"a": 1}).get_or_build(build)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first["w"], second["w"])
    assert not list(tmp_path.glob("*.tmp")), "no temp files left behind"


def test_different_spec_is_a_different_entry(tmp_path):
    a = CacheEntry(tmp_path, "classifier", {"pool": "avg"})
    b = CacheEntry(tmp_path, "classifier", {"pool": "max"})
    assert a.key != b.key and a.path != b.path


def test_corrupted_file_is_rejected_and_rebuilt(tmp_path):
    entry = CacheEntry(tmp_path, "classifier", {"a": 1})
    entry.save({"w": torch.ones(3)})
    entry.path.write_bytes(entry.path.read_bytes()[:100])  # truncated write
    assert entry.load() is None
    payload, hit = entry.get_or_build(lambda: {"w": torch.zeros(3)})
    assert not hit and torch.equal(payload["w"], torch.zeros(3))
    assert torch.equal(entry.load()["w"], torch.zeros(3))


def test_file_under_the_wrong_key_is_rejected(tmp_path):
    entry = CacheEntry(tmp_path, "classifier", {"a": 1})
    other = CacheEntry(tmp_path, "classifier", {"a": 2})
    other.save({"w": torch.ones(3)})
    entry.path.write_bytes(other.path.read_bytes())  # a file copied under another key's name
    assert entry.load() is None


def test_pickled_code_is_refused(tmp_path):
    entry = CacheEntry(tmp_path, "classifier", {"a": 1})

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"key": entry.key, "payload": Evil()}, entry.path)
    assert entry.load() is None  # weights_only=True will not unpickle arbitrary objects


def _race(root: str, marker: int, ready: str, go: str, use_lock: bool, results) -> None:
    """One of two processes that build the same entry at the same moment."""
    import time
    from pathlib import Path

    entry = CacheEntry(Path(root), "classifier", {"race": 1})
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)

    def build():
        time.sleep(1.0)  # both processes are building now
        return {"who": torch.tensor([marker])}

    payload, hit = entry.get_or_build(build, use_lock=use_lock)
    results.put((marker, int(payload["who"]), hit))


@pytest.mark.parametrize("use_lock", [False, True])
def test_two_processes_building_one_entry_publish_one_valid_file(tmp_path, use_lock):
    """Without a working lock (NFS) both build; the first to publish wins and both use its
    payload. With the lock, the second waits and loads: one build."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    root = tmp_path / "cache"
    root.mkdir()
    go = tmp_path / "go"
    procs = [ctx.Process(target=_race, args=(str(root), k, str(tmp_path / f"ready{k}"), str(go), use_lock, results))
             for k in (1, 2)]
    for p in procs:
        p.start()
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in (1, 2)):
        assert time.time() < deadline, "the builders did not start"
        time.sleep(0.05)
    go.touch()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = {who for _, who, _ in got}
    assert len(winners) == 1, got  # both processes use the same payload
    files = sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
    assert len(files) == 1 and files[0].startswith("classifier-"), files  # one file, no temp files left
    assert int(CacheEntry(root, "classifier", {"race": 1}).load()["who"]) == winners.pop()
    if use_lock:
        assert sorted(hit for _, _, hit in got) == [False, True]  # one build, one load
