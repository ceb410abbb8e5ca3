"""Metrics on real MNIST images and on hand-built cases whose answer is known."""
import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from harness.config import DataConfig, EvalConfig
from harness.science.data import Split, heldout_set, train_subset
from harness.science.metrics import (SSIMStats, compute_score, diversity, is_collapsed, nearest_ssim,
                             nearest_ssim_bruteforce, paired_ssim, reference_points)


@pytest.fixture(scope="module")
def mnist():
    train, _ = train_subset(DataConfig(train_size=500))
    return train, heldout_set(DataConfig(), 30)


def test_ssim_of_an_image_with_itself_is_one(mnist):
    train, _ = mnist
    assert torch.allclose(paired_ssim(train.images[:50], train.images[:50]), torch.ones(50), atol=1e-5)


def test_ssim_agrees_with_torchmetrics_on_valid_window_positions(mnist):
    train, held = mnist
    a, b = train.images[:40], held.images[:40]
    _, full = structural_similarity_index_measure(a, b, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                  data_range=2.0, reduction="none", return_full_image=True)
    torchmetrics_valid = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert torch.allclose(paired_ssim(a, b), torchmetrics_valid, atol=1e-5)


def test_prefilter_finds_the_brute_force_maximum(mnist):
    train, held = mnist
    means = torch.stack([train.of_class(k).mean(0) for k in range(10)])
    queries = Split(torch.cat([held.images, means]), torch.cat([held.labels, torch.arange(10)]))
    fast, index = nearest_ssim(queries, train, topk=15)
    exact = nearest_ssim_bruteforce(queries, train)
    assert torch.allclose(fast, exact, atol=1e-5)
    # the returned index is a same-class training image achieving that SSIM
    assert (train.labels[index] == queries.labels).all()
    assert torch.allclose(paired_ssim(queries.images, train.images[index]), fast, atol=1e-5)


def test_exhaustive_search_matches_brute_force_on_blank_images(mnist):
    train, _ = mnist
    blank = Split(-torch.ones(10, 1, 28, 28), torch.arange(10))
    assert torch.allclose(nearest_ssim(blank, train, topk=None)[0], nearest_ssim_bruteforce(blank, train), atol=1e-5)


def test_cached_statistics_ssim_equals_the_library(mnist):
    # nearest_ssim filters each image once (SSIMStats) and each pair once: same numbers as
    # pytorch_msssim's five filters per pair
    train, held = mnist
    n = min(len(train), len(held))
    i = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fast = SSIMStats(held.images).pairs(i, SSIMStats(train.images), i.flip(0))
    assert torch.allclose(fast, paired_ssim(held.images[i], train.images[i.flip(0)]), atol=1e-5)


def test_prefilter_on_unstructured_noise_is_close_not_exact(mnist):
    # Noise has no structure for the correlation prefilter to match: the nearest image by SSIM
    # can sit outside the top-k candidates, but only by a hair (measured: < 0.01 at k = 15).
    train, _ = mnist
    gen = torch.Generator().manual_seed(0)
    noise = Split(torch.rand(20, 1, 28, 28, generator=gen) * 2 - 1, torch.arange(20) % 10)
    fast, _ = nearest_ssim(noise, train, topk=15)
    exact = nearest_ssim_bruteforce(noise, train)
    assert (fast <= exact + 1e-6).all() and (exact - fast).max() < 0.02


def test_diversity_of_identical_images_is_zero_and_of_noise_near_one():
    same = torch.zeros(20, 1, 28, 28).uniform_(-1, 1)[:1].repeat(20, 1, 1, 1)
    labels = torch.arange(20) % 10
    assert diversity(same, labels, 50) == pytest.approx(0, abs=1e-5)
    assert diversity(torch.rand(20, 1, 28, 28) * 2 - 1, labels, 50) > 0.9


def test_collapsed_batch_is_flagged_and_scores_zero():
    cfg = EvalConfig()
    assert is_collapsed(diversity_value=0.02, unique_nn_frac=0.5, ref_heldout_diversity=0.8, cfg=cfg)
    assert is_collapsed(diversity_value=0.6, unique_nn_frac=0.05, ref_heldout_diversity=0.8, cfg=cfg)
    assert not is_collapsed(diversity_value=0.6, unique_nn_frac=0.5, ref_heldout_diversity=0.8, cfg=cfg)
    assert compute_score(0.9, 0.5, 0.02, 0.8, collapsed=True) == 0


def test_score_formula_and_its_guards():
    assert compute_score(0.9, 0.5, 0.4, 0.8, collapsed=False) == pytest.approx(0.9 * 0.5 * 0.5)
    assert compute_score(0.9, 0.5, 1.6, 0.8, collapsed=False) == pytest.approx(0.45)  # capped at 1
    assert compute_score(float("nan"), 0.5, 0.4, 0.8, collapsed=False) == 0
    assert compute_score(0.9, -0.1, 0.4, 0.8, collapsed=False) == 0
    assert math.isfinite(compute_score(0.9, float("inf"), 0.4, 0.8, collapsed=False))


def test_reference_points_order_real_over_mean_over_blank(mnist):
    train, held = mnist
    refs = reference_points(train, held, EvalConfig(reference_per_class=20))
    assert refs["ref_heldout_ssim"] > refs["ref_classmean_ssim"] > refs["ref_blank_ssim"] > 0.1
    assert 0.5 < refs["ref_heldout_diversity"] < 1
