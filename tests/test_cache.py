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
