"""Reconstruction metrics (method.md section 5) and the scheduler `score`.

SSIM is pytorch_msssim's (Gaussian window 11, σ 1.5, data range 2 for pixels in [-1, 1]); the
Fréchet distance is FID's formula on the evaluator's penultimate-layer features of the generated
and the training images (torchmetrics' FID with that feature extractor gives the same number).
Nearest-neighbour SSIM against many images is prefiltered: for each query, exact SSIM is
computed only on the `topk` candidates of its class by normalised cross-correlation (structure)
by L2 distance (luminance) and by L2 over the image centre, each one matrix product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from pytorch_msssim import ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d

from harness.config import EvalConfig
from harness.science.data import NUM_CLASSES, Split
from harness.records.metric_names import METRIC_NAMES, REFERENCE_NAMES

DATA_RANGE = 2.0  # pixels live in [-1, 1]
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
_CENTRE = (SSIM_WINDOW - 1) // 2  # border that no valid window is centred in


def paired_ssim(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """SSIM of a[i] with b[i] for every i (both n x 1 x 28 x 28), pytorch_msssim's separable
    implementation: the mean over valid window positions (the central 18 x 18 of a 28 x 28
    image), as in Wang et al.'s reference code and scikit-image. (torchmetrics averages over a
    reflect-padded full-size map instead, which counts the empty borders of MNIST-like images
    several times and lifts an all-black image from 0.25 to 0.57 nn-SSIM; cropped to the valid
    positions it agrees with this to 1e-6, see tests.)"""
    if len(a) == 0:
        return a.new_zeros(0)
    return torch.cat([ssim(a[i:i + chunk], b[i:i + chunk], data_range=DATA_RANGE, size_average=False,
                           win_size=SSIM_WINDOW, win_sigma=SSIM_SIGMA)
                      for i in range(0, len(a), chunk)])


def _candidates(queries: torch.Tensor, refs: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (n_q x <= 3k) into refs: the top-k by normalised cross-correlation (structure), by
    L2 distance (luminance) and by L2 distance over the central region that SSIM's valid
    windows weight most (for near-empty queries, where correlation is undefined)."""
    k = min(topk, len(refs))

    def by_l2(q, r):
        return (2 * q @ r.T - r.pow(2).sum(1)[None, :]).topk(k, dim=1).indices  # -||q-r||^2 + const

    q, r = queries.flatten(1), refs.flatten(1)
    qc = nn.functional.normalize(q - q.mean(1, keepdim=True), dim=1)
    rc = nn.functional.normalize(r - r.mean(1, keepdim=True), dim=1)
    centre = slice(_CENTRE, -_CENTRE)
    return torch.cat([(qc @ rc.T).topk(k, dim=1).indices, by_l2(q, r),
                      by_l2(queries[..., centre, centre].flatten(1), refs[..., centre, centre].flatten(1))], 1)


def _band(g: torch.Tensor, size: int) -> torch.Tensor:
    """(size - len(g) + 1) x size matrix whose product with a signal is its valid convolution with g."""
    out = torch.zeros(size - len(g) + 1, size, dtype=g.dtype, device=g.device)
    for r in range(len(out)):
        out[r, r:r + len(g)] = g
    return out


class SSIMStats:
    """The per-image parts of SSIM, computed once per image: μ = G∗x and G∗x² over the valid
    window positions. Then a pair (x, y) costs one filter of x·y and elementwise arithmetic
    instead of five filters. The filter is pytorch_msssim's separable Gaussian written as two
    matrix products with a banded matrix (Gᵥ x Gₕᵀ), bit-identical to its convolutions on CPU and
    an order of magnitude faster on one-channel 28 x 28 images; the formula is
    `pytorch_msssim.ssim`'s (equal to it to 1e-6, see tests)."""

    def __init__(self, images: torch.Tensor):
        self.images = images.float().flatten(0, 1)  # n x H x W
        g = _fspecial_gauss_1d(SSIM_WINDOW, SSIM_SIGMA).flatten().to(self.images)
        h, w = self.images.shape[-2:]
        self.band_h, self.band_w = _band(g, h), _band(g, w)
        self.mu = self.filter(self.images)
        self.sq = self.filter(self.images * self.images)

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        return self.band_h @ x @ self.band_w.T

    def pairs(self, i: torch.Tensor, other: "SSIMStats", j: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """SSIM of self.images[i[n]] with other.images[j[n]] for every n."""
        c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
        out = []
        for s in range(0, len(i), chunk):
            a, b = i[s:s + chunk], j[s:s + chunk]
            mu1, mu2 = self.mu[a], other.mu[b]
            mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
            s12 = self.filter(self.images[a] * other.images[b]) - mu12
            cs = (2 * s12 + c2) / (self.sq[a] - mu1_sq + other.sq[b] - mu2_sq + c2)
            out.append((((2 * mu12 + c1) / (mu1_sq + mu2_sq + c1)) * cs).flatten(1).mean(1))
        return torch.cat(out) if out else self.images.new_zeros(0)


@torch.no_grad()
def nearest_ssim(queries: Split, refs: Split, topk: int | None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the highest SSIM against refs of the same class and the index (into refs)
    of that image; `topk=None` compares with every same-class ref (exact). Queries of a class
    with no refs get SSIM nan and index -1. A candidate found by more than one prefilter is
    scored once; ties go to the lowest ref index. Computed on `device`, returned on the CPU."""
    best = torch.full((len(queries),), float("nan"), device=device)
    index = torch.full((len(queries),), -1, dtype=torch.long, device=device)
    q_img, r_img = queries.images.float().to(device), refs.images.float().to(device)
    q_lab, r_lab = queries.labels.to(device), refs.labels.to(device)
    q_stats, r_stats = SSIMStats(q_img), SSIMStats(r_img)
    for k in range(NUM_CLASSES):
        q_idx, r_idx = (q_lab == k).nonzero().squeeze(1), (r_lab == k).nonzero().squeeze(1)
        n_q, n_r = len(q_idx), len(r_idx)
        if n_q == 0 or n_r == 0:
            continue
        if topk is None:
            cand = torch.arange(n_r, device=device).expand(n_q, -1)
        else:
            cand = _candidates(q_img[q_idx], r_img[r_idx], topk)  # n_q x c, local ref indices
        key = torch.unique(torch.arange(n_q, device=device)[:, None] * n_r + cand)  # distinct pairs, sorted
        qi, ri = key // n_r, key % n_r
        scores = q_stats.pairs(q_idx[qi], r_stats, r_idx[ri])
        top = torch.full((n_q,), float("-inf"), device=device).scatter_reduce(0, qi, scores, "amax")
        hit = scores == top[qi]
        first = torch.full((n_q,), n_r, device=device).scatter_reduce(0, qi[hit], ri[hit], "amin")
        best[q_idx] = top
        index[q_idx] = r_idx[first]
    return best.cpu(), index.cpu()


@torch.no_grad()
def nearest_ssim_bruteforce(queries: Split, refs: Split) -> torch.Tensor:
    """Exact best same-class SSIM by comparing every pair (slow; for tests and benchmarks)."""
    best = torch.full((len(queries),), float("nan"))
    for i in range(len(queries)):
        same = refs.images[refs.labels == queries.labels[i]]
        if len(same):
            best[i] = paired_ssim(queries.images[i:i + 1].expand(len(same), -1, -1, -1), same).max()
    return best


@torch.no_grad()
def diversity(images: torch.Tensor, labels: torch.Tensor, pairs_per_class: int, seed: int = 0) -> float:
    """Mean (1 − SSIM) over pairs of distinct images of the same class (sampled, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    images, labels = images.float().cpu(), labels.cpu()
    for k in range(NUM_CLASSES):
        idx = (labels == k).nonzero().squeeze(1)
        n = len(idx)
        if n < 2:
            continue
        all_pairs = n * (n - 1) // 2
        if all_pairs <= pairs_per_class:
            i, j = torch.triu_indices(n, n, offset=1)
        else:
            i = torch.randint(n, (pairs_per_class,), generator=gen)
            j = (i + torch.randint(1, n, (pairs_per_class,), generator=gen)) % n  # j != i
        first.append(idx[i])
        second.append(idx[j])
    if not first:
        return 0.0
    first, second = torch.cat(first), torch.cat(second)
    return (1 - paired_ssim(images[first], images[second])).mean().item()


def compute_score(evaluator_acc: float, ssim_nn_train_mean: float, diversity_value: float,
                  ref_heldout_diversity: float, collapsed: bool) -> float:
    """evaluator_acc · ssim_nn_train_mean · min(1, diversity / ref_heldout_diversity); 0 when
    collapsed or not finite, never negative."""
    if collapsed or ref_heldout_diversity <= 0:
        return 0.0
    value = evaluator_acc * ssim_nn_train_mean * min(1.0, diversity_value / ref_heldout_diversity)
    return float(value) if math.isfinite(value) and value > 0 else 0.0


def is_collapsed(diversity_value: float, unique_nn_frac: float, ref_heldout_diversity: float,
                 cfg: EvalConfig) -> bool:
    return bool(diversity_value < cfg.collapse_diversity_frac * ref_heldout_diversity
                or unique_nn_frac < cfg.collapse_unique_frac)


@torch.no_grad()
def reference_points(train: Split, heldout: Split, cfg: EvalConfig) -> dict[str, float]:
    """nn-SSIM vs the training subset of real held-out images, of each class's mean image and of
    an all-black image, and the diversity of real held-out images (the yardsticks of a run)."""
    per_class = min(cfg.reference_per_class, min(int((heldout.labels == k).sum()) for k in range(NUM_CLASSES)))
    pick = torch.cat([(heldout.labels == k).nonzero().squeeze(1)[:per_class] for k in range(NUM_CLASSES)])
    real = Split(heldout.images[pick], heldout.labels[pick])
    classes = torch.arange(NUM_CLASSES)
    means = Split(torch.stack([train.of_class(k).mean(0) for k in range(NUM_CLASSES)]), classes)
    blank = Split(torch.full((NUM_CLASSES, 1, 28, 28), -1.0), classes)
    return {
        "ref_heldout_ssim": nearest_ssim(real, train, cfg.topk)[0].mean().item(),
        # one image per class: compare exhaustively (a flat image defeats the correlation prefilter)
        "ref_classmean_ssim": nearest_ssim(means, train, None)[0].mean().item(),
        "ref_blank_ssim": nearest_ssim(blank, train, None)[0].mean().item(),
        "ref_heldout_diversity": diversity(real.images, real.labels, cfg.diversity_pairs),
    }


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½), the trace of the square root
    as the sum of the square roots of the eigenvalues of sigma1 sigma2 (FID's formula)."""
    a = (mu1 - mu2).square().sum()
    b = sigma1.trace() + sigma2.trace()
    c = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return (a + b - 2 * c).item()


class FeatureMoments:
    """Running sums of features (float64) from which their mean and sample covariance follow."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        features = features.double().reshape(len(features), -1)
        self.total += features.sum(0)
        self.outer += features.T @ features
        self.count += len(features)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise ValueError("the Fréchet distance needs at least 2 images on each side")
        mean = self.total / self.count
        return mean, (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)


def top_fraction_mean(values: torch.Tensor, fraction: float = 0.1) -> float:
    """Mean of the best `fraction` of the values (at least one): where recovered images show."""
    values = values[~values.isnan()]
    if not len(values):
        return float("nan")
    k = max(1, math.ceil(fraction * len(values)))
    return values.sort(descending=True).values[:k].mean().item()


@dataclass
class Evaluation:
    metrics: dict[str, float]
    nearest_train_index: torch.Tensor  # per generated image, index into the training subset
    nearest_train_ssim: torch.Tensor
    per_train_best_ssim: torch.Tensor  # per training image, best SSIM of any generated image, sorted
    # per image of the two equally sized, class-balanced sides (training / held-out): the best SSIM
    # of any generated image and that image's index (the evidence in reconstructions.png)
    train_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (side index, best, which)
    heldout_side: tuple[torch.Tensor, torch.Tensor] | None = None  # (best, which)
    # the images and labels scored: what a run's outputs show beside these metrics
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class Evaluator:
    """Scores generated images against a trial's training subset, held-out set and evaluator.
    Everything that does not depend on the generated images is prepared once.

    Per-image leakage compares two sides of equal size and class balance: the training subset and
    as many held-out images per class. Where the held-out pool has fewer images of a class than
    the subset (MNIST's held-out half has about 450 of its rarest class), both sides are capped
    alike: the training side is then the first `cap` training images of each class."""

    def __init__(self, cfg: EvalConfig, train: Split, heldout: Split, classifier: nn.Module,
                 evaluator: nn.Module, references: dict[str, float]):
        self.cfg, self.train, self.references = cfg, train.to("cpu"), references
        n_per_class = len(train) // NUM_CLASSES
        available = min(int((heldout.labels == k).sum()) for k in range(NUM_CLASSES))
        self.side_per_class = min(n_per_class, available)
        self.heldout = heldout.to("cpu").head_per_class(self.side_per_class)
        self.train_side_index = torch.cat([(self.train.labels == k).nonzero().squeeze(1)[:self.side_per_class]
                                           for k in range(NUM_CLASSES)]).sort().values
        self.capped = self.side_per_class < n_per_class
        self.classifier, self.evaluator = classifier, evaluator
        self.device = next(evaluator.parameters()).device
        # the training images' feature moments, once: the real side of fd_eval
        real = FeatureMoments(evaluator.num_features, self.device)
        with torch.no_grad():
            for i in range(0, len(train), 1000):
                real.update(evaluator(train.images[i:i + 1000].to(self.device))[1])
        self.real_moments = real.mean_cov()

    @torch.no_grad()
    def sample_metrics(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The class-level measures of a generator's fresh-latent sample, when another image set (its
        bank) is scored: `diversity`, `evaluator_acc` and `target_acc` of these images, as
        sample_diversity, sample_evaluator_acc, sample_target_acc."""
        on_device = images.detach().float().to(self.device)
        labels = labels.cpu()
        return {"sample_diversity": diversity(images, labels, self.cfg.diversity_pairs),
                "sample_evaluator_acc": (self.evaluator(on_device)[0].argmax(1).cpu() == labels).float().mean().item(),
                "sample_target_acc": (self.classifier(on_device)[0].argmax(1).cpu() == labels).float().mean().item()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
        cfg, refs, dev = self.cfg, self.references, self.device
        gen = Split(images.detach().float().cpu(), labels.cpu())
        nn_train, nn_index = nearest_ssim(gen, self.train, cfg.topk, dev)
        nn_test, _ = nearest_ssim(gen, self.heldout, cfg.topk, dev)
        train_side = Split(self.train.images[self.train_side_index], self.train.labels[self.train_side_index])
        nn_train_side = nearest_ssim(gen, train_side, cfg.topk, dev)[0] if self.capped else nn_train
        per_train, per_train_which = nearest_ssim(self.train, gen, cfg.topk, dev)
        per_held, per_held_which = nearest_ssim(self.heldout, gen, cfg.topk, dev)
        per_train_side = per_train[self.train_side_index]
        on_device = images.to(dev)
        target_pred = self.classifier(on_device)[0].argmax(1).cpu()
        eval_logits, eval_features = self.evaluator(on_device)
        eval_pred = eval_logits.argmax(1).cpu()
        div = diversity(gen.images, gen.labels, cfg.diversity_pairs)
        unique = len(torch.unique(nn_index[nn_index >= 0])) / max(len(gen), 1)
        fake = FeatureMoments(self.evaluator.num_features, dev)
        fake.update(eval_features)
        fd = frechet_distance(*self.real_moments, *fake.mean_cov()) if fake.count > 1 else float("nan")
        collapsed = is_collapsed(div, unique, refs["ref_heldout_diversity"], cfg)
        bar = cfg.recon_threshold
        m = {
            "ssim_nn_train_mean": nn_train.nanmean().item(),
            "ssim_nn_train_median": nn_train.nanmedian().item(),
            "recon_rate": (nn_train >= bar).float().mean().item(),
            "ssim_nn_train_side_mean": nn_train_side.nanmean().item(),
            "ssim_nn_test_mean": nn_test.nanmean().item(),
            "memorization_gap": nn_train_side.nanmean().item() - nn_test.nanmean().item(),
            "train_coverage": (per_train_side >= bar).float().mean().item(),
            "heldout_coverage": (per_held >= bar).float().mean().item(),
            "train_top10": top_fraction_mean(per_train_side),
            "heldout_top10": top_fraction_mean(per_held),
            "target_acc": (target_pred == gen.labels).float().mean().item(),
            "evaluator_acc": (eval_pred == gen.labels).float().mean().item(),
            "diversity": div,
            "unique_nn_frac": unique,
            "collapsed": float(collapsed),
            "fd_eval": fd if math.isfinite(fd) else float("nan"),
        }
        strict = cfg.strict_threshold  # where a disjoint classifier's best candidates stop
        m["train_coverage_strict"] = (per_train_side >= strict).float().mean().item()
        m["heldout_coverage_strict"] = (per_held >= strict).float().mean().item()
        m["coverage_gap_strict"] = m["train_coverage_strict"] - m["heldout_coverage_strict"]
        m["coverage_gap"] = m["train_coverage"] - m["heldout_coverage"]
        m["top10_gap"] = m["train_top10"] - m["heldout_top10"]
        m["score"] = compute_score(m["evaluator_acc"], m["ssim_nn_train_mean"], div,
                                   refs["ref_heldout_diversity"], collapsed)
        m.update(refs)
        return Evaluation({name: m[name] for name in (*METRIC_NAMES, *REFERENCE_NAMES) if name in m},
                          nn_index, nn_train, per_train.sort(descending=True).values,
                          (self.train_side_index, per_train_side, per_train_which[self.train_side_index]),
                          (per_held, per_held_which), gen.images, gen.labels)
