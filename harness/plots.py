"""Image grids: generated samples (a row per class) and samples beside their nearest training
image. Written with matplotlib's Agg backend; no display needed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from harness.data import NUM_CLASSES  # noqa: E402


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


def save_reconstructions(train_images: torch.Tensor, train_best: torch.Tensor, train_match: torch.Tensor,
                         heldout_images: torch.Tensor, heldout_best: torch.Tensor, heldout_match: torch.Tensor,
                         path: str | Path, count: int = 10, threshold: float = 0.4) -> None:
    """Per-image leakage as a picture: the `count` training images with the highest best SSIM, each
    above the candidate that reached it, and the same for the equally sized held-out side. A leak
    shows as training pairs that match where the held-out pairs do not."""
    fig, axes = plt.subplots(4, count, figsize=(count * 0.75 + 0.6, 4 * 0.8 + 0.9), dpi=100, squeeze=False)
    for row, (title, images, best, match) in enumerate((("training", train_images, train_best, train_match),
                                                        ("held-out", heldout_images, heldout_best, heldout_match))):
        order = best.nan_to_num(-1).argsort(descending=True)[:count].tolist()
        for j in range(count):
            top, bottom = axes[2 * row, j], axes[2 * row + 1, j]
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
            if j >= len(order):
                continue
            i = order[j]
            top.imshow(_to_unit(images[i])[0].numpy(), cmap="gray", vmin=0, vmax=1)
            bottom.imshow(_to_unit(match[i])[0].numpy(), cmap="gray", vmin=0, vmax=1)
            colour = "C2" if best[i] >= threshold else "C7"
            top.set_title(f"{best[i]:.2f}", fontsize=6, color=colour, pad=1)
        axes[2 * row, 0].set_ylabel(f"{title}\nimage", fontsize=6)
        axes[2 * row + 1, 0].set_ylabel("best\ncandidate", fontsize=6)
    fig.suptitle(f"best SSIM of any candidate per image (green: >= {threshold}); "
                 "top: training images, bottom: as many held-out images", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
