"""What a trial process imports itself, checked against the libraries it no longer needs at
start-up: the MNIST files read directly (torchvision's reader), the Fréchet distance (torchmetrics'
FID), the image grid (torchvision's make_grid). Each known answer is the library's own output on
the same input, or a value worked out by hand."""
import gzip
import math
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from harness.config import ConfigError, DataConfig
from harness.science.data import load_split, read_idx
from harness.science.metrics import FeatureMoments, frechet_distance
from harness.science.plots import tile
from tests.conftest import REPO


def test_a_trial_process_imports_neither_torchvision_nor_torchmetrics():
    code = ("import harness.trial, harness.science.plots, harness.sweep.tune; import sys; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'torchmetrics'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


@pytest.mark.parametrize("dataset,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
@pytest.mark.parametrize("train", [True, False])
def test_the_split_read_directly_equals_torchvisions(dataset, folder, train):
    import torchvision.datasets

    from harness.science.data import _RAW_CACHE, _raw_files, data_root

    cfg = DataConfig(dataset=dataset)
    assert _raw_files(data_root(cfg) / folder / "raw", train) is not None  # read directly, not downloaded
    _RAW_CACHE.clear()
    images, labels = load_split(cfg, train)
    ds = getattr(torchvision.datasets, folder)(str(data_root(cfg)), train=train, download=False)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images, ds.data) and torch.equal(labels, ds.targets)
    assert images.shape == ((60000 if train else 10000), 28, 28)


def test_gzipped_files_read_the_same_and_a_truncated_file_is_refused_in_one_line(tmp_path, monkeypatch):
    from harness.science.data import data_root
    raw = data_root(DataConfig()) / "MNIST" / "raw"
    gz = tmp_path / "gz" / "MNIST" / "raw"
    gz.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with open(raw / name, "rb") as src, gzip.open(gz / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert torch.equal(read_idx(gz / "t10k-labels-idx1-ubyte.gz"), read_idx(raw / "t10k-labels-idx1-ubyte"))
    images, labels = load_split(DataConfig(root=str(tmp_path / "gz")), train=False)
    assert torch.equal(images, read_idx(raw / "t10k-images-idx3-ubyte")) and len(labels) == 10000
    cut = tmp_path / "cut" / "MNIST" / "raw"
    cut.mkdir(parents=True)
    (cut / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:5000])
    shutil.copy(raw / "t10k-labels-idx1-ubyte", cut)
    with pytest.raises(ConfigError) as err:
        load_split(DataConfig(root=str(tmp_path / "cut")), train=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.root:") and "4984 bytes of data" in message
    # an archive cut short (an interrupted download) goes back to torchvision's own MNIST, whose network
    # fetch is replaced here both ways: unreachable (offline, as CI) its error reaches the user as one
    # line; reachable, the fetched files (the real ones, copied) give the real split
    import torchvision.datasets.mnist as tv_mnist

    for case in ("offline", "online"):
        short = tmp_path / case / "MNIST" / "raw"
        short.mkdir(parents=True)
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (short / f"{name}.gz").write_bytes((gz / f"{name}.gz").read_bytes()[:300])
        fetched = []

        def fetch(url, download_root, filename=None, md5=None, **_):
            fetched.append(filename)
            if case == "offline":
                raise URLError("Name or service not known")
            shutil.copy(raw / filename.removesuffix(".gz"), Path(download_root) / filename.removesuffix(".gz"))

        monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fetch)
        if case == "offline":
            with pytest.raises(ConfigError) as err:
                load_split(DataConfig(root=str(tmp_path / case)), train=False)
            message = str(err.value)
            assert "\n" not in message and message.startswith("data.root: cannot load mnist from")
            assert "HARNESS_DATA_ROOT" in message and "Name or service not known" in message
        else:
            images, labels = load_split(DataConfig(root=str(tmp_path / case)), train=False)
            assert torch.equal(images, read_idx(raw / "t10k-images-idx3-ubyte"))
            assert torch.equal(labels, read_idx(raw / "t10k-labels-idx1-ubyte").long())
        assert fetched and fetched[0].endswith(".gz")  # torchvision was asked for the files


def test_frechet_distance_of_known_gaussians():
    # real: the 4 points ±e1, ±e2 (mean 0, sample covariance I·2/3); generated: the same scaled by 2
    # and moved by (3, 0) (mean (3, 0), covariance I·8/3). Distance: 9 + (4/3 + 16/3) - 2·2·(4/3) = 31/3
    square = torch.tensor([[-1.0, 0], [1, 0], [0, -1], [0, 1]])
    real, fake = FeatureMoments(2), FeatureMoments(2)
    real.update(square[:2])
    real.update(square[2:])  # accumulated in two batches
    fake.update(2 * square + torch.tensor([3.0, 0]))
    mean, cov = real.mean_cov()
    assert torch.allclose(mean, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(cov, torch.eye(2, dtype=torch.float64) * 2 / 3)
    assert frechet_distance(*real.mean_cov(), *fake.mean_cov()) == pytest.approx(31 / 3, rel=1e-12)
    assert frechet_distance(*real.mean_cov(), *real.mean_cov()) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError):
        FeatureMoments(2).mean_cov()


def test_frechet_distance_equals_torchmetrics_fid_on_the_same_features():
    from torch import nn
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(nn.Module):  # the images' pixels are their own features
        num_features = 16

        def forward(self, x):
            return x.flatten(1)

    g = torch.Generator().manual_seed(0)
    real_x = torch.randn(300, 1, 4, 4, generator=g)
    fake_x = torch.randn(120, 1, 4, 4, generator=g) * 0.7 + 0.3
    fid = FrechetInceptionDistance(feature=Features(), normalize=True)
    fid.update(real_x, real=True)
    fid.update(fake_x, real=False)
    real, fake = FeatureMoments(16), FeatureMoments(16)
    real.update(real_x.flatten(1))
    fake.update(fake_x.flatten(1))
    assert frechet_distance(*real.mean_cov(), *fake.mean_cov()) == pytest.approx(fid.compute().item(), rel=1e-6)


@pytest.mark.parametrize("n,nrow", [(20, 10), (7, 3), (2, 5)])  # (make_grid returns a lone image unframed)
def test_tile_equals_torchvisions_make_grid(n, nrow):
    from torchvision.utils import make_grid

    images = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    assert torch.equal(tile(images, nrow, padding=2, pad_value=0.5),
                       make_grid(images, nrow=nrow, padding=2, pad_value=0.5))


def test_fd_eval_of_an_evaluation_equals_torchmetrics_fid_with_the_evaluators_features():
    from torch import nn
    from torchmetrics.image.fid import FrechetInceptionDistance

    from harness.config import EvalConfig
    from harness.science.data import heldout_set, train_subset
    from harness.science.metrics import Evaluator

    class Judge(nn.Module):  # (logits, features) as the harness's evaluators return them
        num_features = 12

        def __init__(self):
            super().__init__()
            self.features, self.head = nn.Linear(784, 12), nn.Linear(12, 10)

        def forward(self, x):
            f = torch.tanh(self.features(x.flatten(1)))
            return self.head(f), f

    class Features(nn.Module):
        def __init__(self, judge):
            super().__init__()
            self.judge, self.num_features = judge, judge.num_features

        def forward(self, x):
            return self.judge(x)[1]

    torch.manual_seed(0)
    judge = Judge().eval().requires_grad_(False)
    train, _ = train_subset(DataConfig(train_size=200))
    held = heldout_set(DataConfig(), 20)
    ev = Evaluator(EvalConfig(topk=3, diversity_pairs=10), train, held, judge, judge, {"ref_heldout_diversity": 0.8})
    images = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(30) % 10
    fid = FrechetInceptionDistance(feature=Features(judge), normalize=True, reset_real_features=False)
    fid.update(train.images, real=True)
    fid.update(images, real=False)
    assert ev(images, labels).metrics["fd_eval"] == pytest.approx(fid.compute().item(), rel=1e-5)
    assert math.isnan(ev(images[:1], labels[:1]).metrics["fd_eval"])  # one image has no covariance


def test_reconstruction_canvas_places_each_image_above_its_candidate_in_score_order(tmp_path):
    from harness.science.plots import reconstruction_canvas, save_reconstructions

    # training side: 3 images of constant value v (in [-1, 1]), each "matched" by a candidate of
    # value -v, best SSIM 0.2, 0.9, nan: shown in the order 0.9, 0.2, nan (a nan score last).
    # held-out side: 2 images of value -1 and 0 with candidates 1 and -0.5, best SSIM 0.1, 0.3.
    values = torch.tensor([-0.5, 0.5, 1.0])
    images = values.view(3, 1, 1, 1).expand(3, 1, 28, 28)
    best = torch.tensor([0.2, 0.9, float("nan")])
    held = torch.tensor([-1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 28, 28)
    held_match = torch.tensor([1.0, -0.5]).view(2, 1, 1, 1).expand(2, 1, 28, 28)
    held_best = torch.tensor([0.1, 0.3])
    canvas, scores, centres = reconstruction_canvas([(images, best, -images), (held, held_best, held_match)], count=4)
    assert canvas.shape == (2 * (9 + 60) + 2, 4 * 30 + 2)
    shown = [(11, [(0.75, 0.25), (0.25, 0.75), (1.0, 0.0)]),  # (top row, [(image, candidate) in [0, 1]])
             (80, [(0.5, 0.25), (0.0, 1.0)])]
    for y0, cells in shown:
        for j, (image, candidate) in enumerate(cells):
            x0 = 2 + 30 * j
            assert torch.all(canvas[y0:y0 + 28, x0:x0 + 28] == image), (y0, j)
            assert torch.all(canvas[y0 + 30:y0 + 58, x0:x0 + 28] == candidate), (y0, j)
            assert canvas[y0 - 1, x0 - 1] == 0.5 and canvas[y0 + 58, x0 + 28] == 0.5  # the frame
    assert [s[:2] for s in scores] == [(16, 9.5), (46, 9.5), (76, 9.5), (16, 78.5), (46, 78.5)]
    assert [s[2] for s in scores] == [pytest.approx(v, nan_ok=True) for v in (0.9, 0.2, float("nan"), 0.3, 0.1)]
    assert torch.all(canvas[9:70, 92:122] == 1)  # no 4th training image: its slot is white, without a frame
    assert centres == [25.0, 55.0, 94.0, 124.0]
    with pytest.raises(ValueError, match="one size"):
        reconstruction_canvas([(images, best, -images), (held[:, :, :20], held_best, held_match[:, :, :20])])
    save_reconstructions(images, best, -images, held, held_best, held_match, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
