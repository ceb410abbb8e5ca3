"""Image grids: generated samples (a row per class) and samples beside their nearest training
image. Written with matplotlib's Agg backend; no display needed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from harness.science.data import NUM_CLASSES  # noqa: E402


def tile(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.5) -> torch.Tensor:
    """N x C x H x W images as one 3 x H' x W' picture, `nrow` to a row, `padding` pixels of
    `pad_value` around and between them (single-channel images repeated to RGB)."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * cell_h + padding:(r + 1) * cell_h, k * cell_w + padding:(k + 1) * cell_w] = images[i]
    return grid


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def class_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first `per_class` images of each class, class by class (a grid row per class)."""
    picks = []
    for k in range(NUM_CLASSES):
        idx = (labels == k).nonzero().squeeze(1)[:per_class]
        chosen = images[idx]
        if len(chosen) < per_class:  # pad a short class with blank (-1) tiles
            chosen = torch.cat([chosen, -torch.ones(per_class - len(chosen), *images.shape[1:])])
        picks.append(chosen)
    return torch.cat(picks)


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, per_class: int = 10,
              class_names=None, title: str | None = None) -> None:
    grid = tile(_to_unit(class_rows(images, labels, per_class)), nrow=per_class, padding=2, pad_value=0.5)
    fig, ax = plt.subplots(figsize=(per_class * 0.6 + 1.2, NUM_CLASSES * 0.6 + 0.4), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([2 + 30 * k + 14 for k in range(NUM_CLASSES)])
    ax.set_yticklabels(class_names or [str(k) for k in range(NUM_CLASSES)], fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_nearest_pairs(images: torch.Tensor, labels: torch.Tensor, nearest_index: torch.Tensor,
                       nearest_ssim: torch.Tensor, train_images: torch.Tensor, path: str | Path,
                       per_class: int = 4, class_names=None, title: str | None = None) -> None:
    """Per class, `per_class` generated images (the best-matching ones) each followed by the
    nearest training image that nn-SSIM found for it: the evidence of reconstruction."""
    tiles, captions = [], []
    for k in range(NUM_CLASSES):
        idx = (labels == k).nonzero().squeeze(1)
        order = idx[nearest_ssim[idx].nan_to_num(-1).argsort(descending=True)][:per_class]
        for i in order.tolist():
            tiles += [images[i], train_images[nearest_index[i]] if nearest_index[i] >= 0 else -torch.ones_like(images[i])]
            captions.append(f"{nearest_ssim[i]:.2f}")
        for _ in range(per_class - len(order)):
            tiles += [-torch.ones_like(images[0])] * 2
            captions.append("")
    grid = tile(_to_unit(torch.stack(tiles)), nrow=2 * per_class, padding=2, pad_value=0.5)
    fig, ax = plt.subplots(figsize=(2 * per_class * 0.6 + 1.2, NUM_CLASSES * 0.6 + 0.6), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([2 + 30 * (2 * j) + 28 for j in range(per_class)])
    ax.set_xticklabels(["generated | nearest train"] * per_class, fontsize=5)
    ax.set_yticks([2 + 30 * k + 14 for k in range(NUM_CLASSES)])
    ax.set_yticklabels(class_names or [str(k) for k in range(NUM_CLASSES)], fontsize=7)
    ax.set_title(title or "generated (left) vs nearest training image (right), best-matching per class",
                 fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reconstruction_canvas(sides, count: int = 10, pad: int = 2, label: int = 9):
    """The picture of `save_reconstructions`: for each side (images N x 1 x H x W, best SSIM per image,
    the candidate that reached it), its `count` images of highest best SSIM in a row, each above its
    candidate, on a white canvas (values in [0, 1]) with `label` pixels above each image row for its
    score; a grey line frames every drawn image (so that an empty slot and an all-white image differ).
    Returns the canvas, the scores as (x, y, value) in canvas pixels, and each row's centre."""
    shapes = {tuple(t.shape[1:]) for images, _, match in sides for t in (images, match)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[0] != 1:
        raise ValueError(f"reconstruction_canvas: every side's images and candidates must be N x 1 x H x W of "
                         f"one size; got {sorted(shapes)}")
    _, h, w = next(iter(shapes))
    band_h = label + 2 * (h + pad)
    canvas = torch.ones(len(sides) * band_h + pad, count * (w + pad) + pad)
    scores, centres = [], []
    for b, (images, best, match) in enumerate(sides):
        y0 = b * band_h + label + pad
        centres += [y0 + h / 2, y0 + h + pad + h / 2]
        for j, i in enumerate(best.nan_to_num(-1).argsort(descending=True)[:count].tolist()):
            x0 = j * (w + pad) + pad
            for y, picture in ((y0, images[i]), (y0 + h + pad, match[i])):
                canvas[y - 1:y + h + 1, x0 - 1:x0 + w + 1] = 0.5
                canvas[y:y + h, x0:x0 + w] = _to_unit(picture)[0]
            scores.append((x0 + w / 2, y0 - 1.5, float(best[i])))
    return canvas, scores, centres


def save_reconstructions(train_images: torch.Tensor, train_best: torch.Tensor, train_match: torch.Tensor,
                         heldout_images: torch.Tensor, heldout_best: torch.Tensor, heldout_match: torch.Tensor,
                         path: str | Path, count: int = 10, threshold: float = 0.4) -> None:
    """Per-image leakage as a picture: the `count` training images with the highest best SSIM, each
    above the candidate that reached it, and the same for the equally sized held-out side. A leak
    shows as training pairs that match where the held-out pairs do not. One picture on one axes (a
    grid of 40 axes took most of a trial's output time)."""
    canvas, scores, centres = reconstruction_canvas(
        [(train_images, train_best, train_match), (heldout_images, heldout_best, heldout_match)], count)
    fig, ax = plt.subplots(figsize=(count * 0.75 + 0.6, 4 * 0.8 + 0.9), dpi=100)
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for x, y, score in scores:
        ax.text(x, y, f"{score:.2f}", ha="center", va="bottom", fontsize=6, color="C2" if score >= threshold else "C7")
    ax.set_xticks([])
    ax.set_yticks(centres)
    ax.set_yticklabels(["training\nimage", "best\ncandidate", "held-out\nimage", "best\ncandidate"], fontsize=6)
    ax.tick_params(length=0)
    fig.suptitle(f"best SSIM of any candidate per image (green: >= {threshold}); "
                 "top: training images, bottom: as many held-out images", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
