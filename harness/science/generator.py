"""Conditioned generator G(z, c) with dual conditioning (method.md section 3).

z (latent_dim) and an embedding of c (embed_dim) form a (latent+embed) x 1 x 1 tensor;
transposed convs grow it to a K x K map (K = classes); the K x K class-indicator matrix (label's
row and column set to 1) is concatenated as one extra channel; more transposed convs with heavy
Dropout2d grow it to 28 x 28; Tanh output (or `output: scaled_tanh`, origin + s·tanh about the
classifier's input mean). Every layer's width scales with `channels`. A bank code may add its own
learnable map to the 10 x 10 class map (`code_map`, see `generator.code_params`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import GeneratorConfig
from harness.science.data import NUM_CLASSES


def indicator_matrix(labels: torch.Tensor, k: int = NUM_CLASSES) -> torch.Tensor:
    """B x 1 x K x K: ones on the label's row and column, zeros elsewhere."""
    onehot = F.one_hot(labels, k).float()
    rows = onehot[:, :, None].expand(-1, k, k)
    cols = onehot[:, None, :].expand(-1, k, k)
    return torch.maximum(rows, cols).unsqueeze(1)


def sample_conditioning(labels: torch.Tensor, soft_fraction: float, temperature: float,
                        generator: torch.Generator | None = None, k: int = NUM_CLASSES) -> torch.Tensor:
    """Conditioning vectors for `labels`: a `soft_fraction` share are softmax(v / T) of a random
    v whose largest entry is moved to the label (so argmax c = label), the rest one-hot."""
    device = labels.device
    c = F.one_hot(labels, k).float()
    soft = torch.rand(len(labels), generator=generator).to(device) < soft_fraction
    if soft.any():
        v = torch.randn(int(soft.sum()), k, generator=generator).to(device)
        lab = labels[soft]
        top = v.argmax(1)
        rows = torch.arange(len(lab), device=device)
        v_top, v_lab = v[rows, top].clone(), v[rows, lab].clone()
        v[rows, top], v[rows, lab] = v_lab, v_top
        c[soft] = torch.softmax(v / temperature, dim=1)
    return c


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, num_classes: int = NUM_CLASSES, origin: torch.Tensor | None = None):
        super().__init__()
        ch, k = cfg.channels, num_classes
        assert k == 10, "the upsampling path is laid out for a 10 x 10 indicator map"
        self.latent_dim = cfg.latent_dim
        self.map_channels = ch  # channels of the 10 x 10 class map (what a code's `code_map` adds to)
        self.output, self.output_scale = cfg.output, cfg.output_scale
        # scaled_tanh's centre: the classifier's input mean, else the zero image (not part of the state)
        origin = torch.zeros(1, 1, 28, 28) if origin is None else origin.detach().float().cpu().reshape(1, 1, 28, 28)
        self.register_buffer("origin", origin, persistent=False)
        self.embed = nn.Linear(num_classes, cfg.embed_dim)
        # 1 -> 5 -> 10 (= K)
        self.to_class_map = nn.Sequential(
            nn.ConvTranspose2d(cfg.latent_dim + cfg.embed_dim, ch * 2, 5, 1, 0, bias=False),
            nn.BatchNorm2d(ch * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ch * 2, ch, 4, 2, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True))
        # (+1 indicator channel) 10 -> 14 -> 28
        self.to_image = nn.Sequential(
            nn.ConvTranspose2d(ch + 1, ch // 2, 5, 1, 0, bias=False), nn.BatchNorm2d(ch // 2),
            nn.Dropout2d(cfg.dropout), nn.ReLU(True),
            nn.ConvTranspose2d(ch // 2, ch // 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 4),
            nn.Dropout2d(cfg.dropout), nn.ReLU(True),
            nn.Conv2d(ch // 4, 1, 3, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, z: torch.Tensor, c: torch.Tensor, return_pre_tanh: bool = False,
                code_map: torch.Tensor | None = None):
        """Images for latents z and conditioning c; `code_map` (B x channels x 10 x 10) is added to the
        class map. With `return_pre_tanh`, also what the pixel term bounds: the pre-Tanh output, or for
        scaled_tanh the image itself (its range is the image's, not Tanh's)."""
        labels = c.argmax(1)
        h = torch.cat([z, self.embed(c)], 1)[:, :, None, None]
        h = self.to_class_map(h)
        if code_map is not None:
            h = h + code_map.to(h.dtype)
        h = torch.cat([h, indicator_matrix(labels, c.shape[1]).to(h.dtype)], 1)
        pre = self.to_image(h)
        if self.output == "scaled_tanh":
            x = self.origin.to(pre.dtype) + self.output_scale * torch.tanh(pre)
            pre = x
        else:
            x = torch.tanh(pre)
        return (x, pre) if return_pre_tanh else x
