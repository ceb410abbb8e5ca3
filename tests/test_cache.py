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


# --- the cache key follows the code that fills the entry (issue 27, item 4) ---

def _edited(monkeypatch, module: str, old: str, new: str) -> None:
    """Make the classifier module's fingerprints see `module`'s text with `old` replaced by `new`."""
    from harness.science import classifiers
    text = classifiers.SOURCES[module]
    assert text.count(old) == 1, f"{old!r} is not (once) in {module}: update this test"
    monkeypatch.setitem(classifiers.SOURCES, module, text.replace(old, new))


def _keys(*overrides: list[str]) -> list[str]:
    from harness.cache import content_key
    from harness.config import build_config
    from harness.science.classifiers import classifier_spec
    return [content_key(classifier_spec(build_config(None, o))) for o in overrides]


ADAM, GD = [], ["classifier.optimizer=gd"]


def test_changing_the_training_code_changes_the_classifier_key(monkeypatch):
    before = _keys(ADAM, GD)
    # the change that once went unnoticed: fit_gd's update (fused or not)
    _edited(monkeypatch, "harness.science.classifiers", "weight_decay=weight_decay, fused=fused)",
            "weight_decay=weight_decay, fused=False)")
    after_fit_gd = _keys(ADAM, GD)
    assert after_fit_gd[0] != before[0] and after_fit_gd[1] != before[1]
    # a model's layers, and the subset it is trained on
    _edited(monkeypatch, "harness.science.classifiers", "nn.Linear(dim, out, bias=bias)", "nn.Linear(dim, out, bias=False)")
    after_mlp = _keys(ADAM)
    _edited(monkeypatch, "harness.science.data", "gen = torch.Generator().manual_seed(cfg.subset_seed)\n",
            "gen = torch.Generator().manual_seed(cfg.subset_seed + 7)\n")
    after_subset = _keys(ADAM)
    assert len({before[0], after_fit_gd[0], after_mlp[0], after_subset[0]}) == 4
    # how the dataset's files are read (a change there changes every image the classifier sees)
    _edited(monkeypatch, "harness.science.data", "def read_idx(path: Path) -> torch.Tensor:",
            "def read_idx(path: Path, skip: int = 1) -> torch.Tensor:")
    assert _keys(ADAM)[0] != after_subset[0]


def test_the_kkt_code_counts_only_where_pretraining_measures_stationarity(monkeypatch):
    before = _keys(ADAM, GD)
    _edited(monkeypatch, "harness.science.kkt", "best = min(best, r.item())", "best = min(best, 2 * r.item())")
    after = _keys(ADAM, GD)
    assert after[0] == before[0]  # adam: no stationarity stored with the classifier
    assert after[1] != before[1]  # gd: kkt_residual_train / _heldout are part of the entry


def test_the_evaluator_key_changes_with_its_training_code(monkeypatch):
    from harness.cache import content_key
    from harness.config import build_config
    from harness.science.classifiers import evaluator_spec
    before = content_key(evaluator_spec(build_config()))
    _edited(monkeypatch, "harness.science.classifiers", "nn.Dropout(0.3), nn.Linear(64 * 7 * 7",
            "nn.Dropout(0.5), nn.Linear(64 * 7 * 7")
    assert content_key(evaluator_spec(build_config())) != before


def test_the_code_fingerprint_ignores_docstrings_comments_layout_and_position():
    from harness.cache import code_fingerprint
    code = ('"""module"""\nimport torch\n\n\ndef fit(x, lr):\n    """Doc."""\n    # a comment\n'
            '    return x - lr * (x)\n\n\nTABLE = {"a": lambda c: fit(c, 1)}\n')
    names = {"m": ("fit", "TABLE")}
    reworded = ('"""another module docstring"""\nimport os\nimport torch\n\n# moved down, re-documented\n\n\n'
                'TABLE = {\n    "a": lambda c: fit(c, 1),  # why\n}\n\n\n'
                'def fit(x,\n        lr):\n    """Another docstring, other lines."""\n    return x - lr * x\n')
    changed = code.replace("x - lr * (x)", "x + lr * (x)")
    base = code_fingerprint(names, {"m": code})
    assert code_fingerprint(names, {"m": reworded}) == base
    assert code_fingerprint(names, {"m": changed}) != base
    assert code_fingerprint(names, {"m": code.replace('fit(c, 1)', 'fit(c, 2)')}) != base  # an assignment counts
    with pytest.raises(KeyError, match="renamed"):
        code_fingerprint({"m": ("fit_gd",)}, {"m": code})
