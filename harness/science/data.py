"""Datasets as tensors in [-1, 1] on the trial's device, with seeded class-balanced subsets.

Splits of one dataset (all fixed by seeds, so every trial of a study sees the same images):
- train subset: N images of the official training split, N/K per class (`subset_seed`);
- held-out pool: the first half of a fixed permutation of the official test split, used for
  nearest-test SSIM and the reference points;
- evaluator pool: the other half of the test split, on which the independent evaluator is
  trained, so it is disjoint from every training subset and from the held-out images.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import CENTRING_PER_CLASS, ConfigError, DataConfig

NUM_CLASSES = 10
_TEST_SPLIT_SEED = 20241021  # fixes the held-out / evaluator halves of the test split


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # torchvision's class name, and its folder under the data root
    class_names: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("MNIST", tuple(str(d) for d in range(10))),
    "fashionmnist": DatasetSpec("FashionMNIST", (
        "T-shirt", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Boot")),
}


def data_root(cfg: DataConfig) -> Path:
    root = cfg.root or os.environ.get("HARNESS_DATA_ROOT") or Path.home() / ".cache" / "inversion-harness" / "data"
    return Path(root).expanduser()


_RAW_CACHE: dict[tuple[str, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def read_idx(path: Path) -> torch.Tensor:
    """One IDX file of unsigned bytes (the MNIST format: a big-endian header of magic 0x0000080D,
    D the number of dimensions, then D sizes), as a uint8 tensor of that shape; `.gz` read as is."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 3:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    body = data[4 + 4 * dims:]
    if len(body) != torch.Size(shape).numel():
        raise ValueError(f"{path}: {len(body)} bytes of data where its header says {shape}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


def _raw_files(raw: Path, train: bool) -> tuple[Path, Path] | None:
    """The split's image and label files in torchvision's `<Name>/raw` folder, plain or gzipped."""
    prefix = "train" if train else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [raw / f"{prefix}-{kind}{ext}" for ext in ("", ".gz")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def load_split(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole official split as (uint8 images N x 28 x 28, int64 labels), read once per process.
    The files are read directly from torchvision's layout (`<root>/MNIST/raw/...`); torchvision
    (imported only then: it costs a trial process seconds of start-up) downloads them when absent."""
    root = data_root(cfg)
    key = (cfg.dataset, str(root), train)
    if key not in _RAW_CACHE:
        spec = DATASETS[cfg.dataset]
        try:
            files = _raw_files(root / spec.folder / "raw", train)
            if files is not None:
                try:
                    images, labels = read_idx(files[0]), read_idx(files[1])
                    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
                        raise ValueError(f"{files[0].name} ({list(images.shape)}) and {files[1].name} "
                                         f"({list(labels.shape)}) are not one split's images and labels")
                except (OSError, EOFError, ValueError):
                    if not any(f.suffix == ".gz" for f in files):
                        raise
                    files = None  # an archive cut short by an interrupted download: torchvision fetches it again
            if files is None:
                import torchvision.datasets

                ds = getattr(torchvision.datasets, spec.folder)(str(root), train=train, download=True)
                images, labels = ds.data.clone(), ds.targets.clone()
        except Exception as exc:  # no internet and no files, or unreadable files: say where we looked
            why = " ".join(str(exc).split())  # torchvision's download errors span lines
            raise ConfigError(f"data.root: cannot load {cfg.dataset} from {root} ({why}); point "
                              "--set data.root=DIR or HARNESS_DATA_ROOT at a folder holding "
                              f"{spec.folder}/raw") from None
        _RAW_CACHE[key] = (images, labels.long())
    return _RAW_CACHE[key]


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float N x 1 x 28 x 28 in [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0).unsqueeze(1)


def balanced_indices(labels: torch.Tensor, per_class: int, generator: torch.Generator,
                     pool: torch.Tensor | None = None) -> torch.Tensor:
    """`per_class` random indices of each class (restricted to `pool` if given), sorted."""
    pool = torch.arange(len(labels)) if pool is None else pool
    chosen = []
    for k in range(NUM_CLASSES):
        members = pool[labels[pool] == k]
        if len(members) < per_class:
            raise ConfigError(f"data.train_size: class {k} has only {len(members)} images, fewer "
                              f"than the {per_class} per class asked; lower data.train_size")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


@dataclass
class Split:
    images: torch.Tensor  # N x 1 x 28 x 28, [-1, 1]
    labels: torch.Tensor  # N, int64

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def of_class(self, k: int) -> torch.Tensor:
        return self.images[self.labels == k]

    def __len__(self) -> int:
        return len(self.labels)

    def head_per_class(self, per_class: int) -> "Split":
        """The first `per_class` images of each class (a class-balanced subset, order kept)."""
        keep = torch.cat([(self.labels == k).nonzero().squeeze(1)[:per_class] for k in range(NUM_CLASSES)])
        keep = keep.sort().values
        return Split(self.images[keep], self.labels[keep])


def train_subset(cfg: DataConfig) -> tuple[Split, torch.Tensor]:
    """The class-balanced training subset and its indices into the official training split."""
    images, labels = load_split(cfg, train=True)
    if cfg.train_size == len(labels):
        idx = torch.arange(len(labels))
    else:
        gen = torch.Generator().manual_seed(cfg.subset_seed)
        idx = balanced_indices(labels, cfg.train_size // NUM_CLASSES, gen)
    return Split(to_unit_range(images[idx]), labels[idx]), idx


def classifier_training_set(cfg: DataConfig) -> Split:
    """The images the classifier is trained on: the training subset itself, or (classifier_subset:
    disjoint, the negative control) an equally sized class-balanced subset of the rest of the
    training split, so that no image the metrics call 'training' was seen by the classifier."""
    if cfg.classifier_subset == "same":
        return train_subset(cfg)[0]
    images, labels = load_split(cfg, train=True)
    _, used = train_subset(cfg)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[used] = False
    gen = torch.Generator().manual_seed(cfg.subset_seed + 1)
    idx = balanced_indices(labels, cfg.train_size // NUM_CLASSES, gen, rest.nonzero().squeeze(1))
    return Split(to_unit_range(images[idx]), labels[idx])




def centring_set(cfg: DataConfig, per_class: int = CENTRING_PER_CLASS) -> Split:
    """A class-balanced set of training-split images that neither the training subset nor the
    negative control's disjoint subset holds: where `classifier.center_mean: disjoint` takes the
    centring mean from, so that the mean the candidates start at carries no training image."""
    images, labels = load_split(cfg, train=True)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[train_subset(cfg)[1]] = False
    gen = torch.Generator().manual_seed(cfg.subset_seed + 1)
    rest[balanced_indices(labels, cfg.train_size // NUM_CLASSES, gen, rest.nonzero().squeeze(1))] = False
    idx = balanced_indices(labels, per_class, torch.Generator().manual_seed(cfg.subset_seed + 2),
                           rest.nonzero().squeeze(1))
    return Split(to_unit_range(images[idx]), labels[idx])


def _test_halves(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = load_split(cfg, train=False)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
    half = len(labels) // 2
    return perm[:half], perm[half:]


def heldout_set(cfg: DataConfig, per_class: int) -> Split:
    """Held-out real images, `per_class` per class where the held-out pool has that many."""
    images, labels = load_split(cfg, train=False)
    pool, _ = _test_halves(cfg)
    available = min(int((labels[pool] == k).sum()) for k in range(NUM_CLASSES))
    idx = balanced_indices(labels, min(per_class, available), torch.Generator().manual_seed(0), pool)
    return Split(to_unit_range(images[idx]), labels[idx])


def evaluator_set(cfg: DataConfig) -> Split:
    """The half of the test split the independent evaluator trains on."""
    images, labels = load_split(cfg, train=False)
    _, pool = _test_halves(cfg)
    pool = pool.sort().values
    return Split(to_unit_range(images[pool]), labels[pool])


def full_test_set(cfg: DataConfig) -> Split:
    images, labels = load_split(cfg, train=False)
    return Split(to_unit_range(images), labels)
