"""The two ways of inverting a frozen classifier, behind one small interface the trial drives.

- `generator`: the study's method, a conditioned generator G(z, c) trained against the classifier;
- `direct`: a bank of free candidate images with fixed labels, optimised directly (Haim et al.'s
  reconstruction when the loss is `kkt` + `pixel`; DeepInversion's when it is `ce` + `bn` + `tv`).

An inverter builds itself from the trial config, draws the step's `GeneratedBatch` (the classifier
forward included, under the loss terms' captures), builds its optimiser over its own parameters and
the loss terms' (the KKT multipliers), hands out the candidates the `kkt` term sums over, and gives
the fixed images and labels that the metrics score. Its `state_dict` is its part of a checkpoint.
"""
from __future__ import annotations

import contextlib
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import ConfigError, TrialConfig
from harness.science.data import NUM_CLASSES
from harness.science.generator import Generator, sample_conditioning
from harness.science.losses import GeneratedBatch


def jitter(x: torch.Tensor, pixels: int, rng: torch.Generator) -> torch.Tensor:
    """Roll the whole batch by a random offset of up to ±pixels in each direction (DeepInversion)."""
    if not pixels:
        return x
    dx, dy = (torch.randint(-pixels, pixels + 1, (2,), generator=rng)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def classify(classifier: nn.Module, terms: nn.ModuleDict, x: torch.Tensor, channels_last: bool = False):
    """The classifier's (logits, features) on x, with every loss term's capture active (x in
    channels_last memory format if asked: the same values, faster convolutions on some devices)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with contextlib.ExitStack() as stack:
        for term in terms.values():
            stack.enter_context(term.capture())
        return classifier(x)


class Inverter(nn.Module):
    """Interface: `batch`, `make_optimizer`, `kkt_bank`, `kkt_images`, `eval_images`."""

    kkt_layers_default = 0

    def __init__(self, cfg: TrialConfig, device: torch.device, origin: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.device = cfg, device
        # where the classifier's input space is centred (its input mean), else the zero image
        origin = torch.zeros(1, 1, 28, 28) if origin is None else origin.detach().cpu().reshape(1, 1, 28, 28)
        self.register_buffer("origin", origin, persistent=False)

    def batch(self, classifier: nn.Module, terms: nn.ModuleDict, rng: torch.Generator) -> GeneratedBatch:
        raise NotImplementedError

    def make_optimizer(self, term_params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def kkt_bank(self, seed: int) -> tuple[torch.Tensor, bool]:
        """(labels of the M candidates the kkt term sums over, whether each step takes all of them)."""
        raise NotImplementedError

    def kkt_images(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class GeneratorInverter(Inverter):
    """Trains G(z, c): each step a batch of soft/hot conditioned samples. Two fixed image sets: the
    bank G(bank_z) of M codes (dropout off; what the kkt term acts on) and the evaluation sample of
    fresh latents (`eval.per_class` per class); `eval.generator_images` says which one is scored."""

    kkt_layers_default = 2

    def __init__(self, cfg: TrialConfig, device: torch.device, origin: torch.Tensor | None = None):
        super().__init__(cfg, device, origin)
        self.generator = Generator(cfg.generator, origin=self.origin)
        self.step_fn = torch.compile(self.generator) if cfg.train.compile else self.generator
        eval_rng = torch.Generator().manual_seed(cfg.eval.latent_seed)
        self.register_buffer("eval_labels", torch.arange(NUM_CLASSES).repeat_interleave(cfg.eval.per_class),
                             persistent=False)
        self.register_buffer("eval_z", torch.randn(len(self.eval_labels), cfg.generator.latent_dim,
                                                   generator=eval_rng), persistent=False)
        # the bank of fixed codes (drawn from the trial seed: not part of the state, rebuilt from the config)
        m = self.bank_size(cfg)
        gen = torch.Generator().manual_seed(cfg.seed + 7919)
        self.register_buffer("bank_z", torch.randn(m, self.latent_dim, generator=gen), persistent=False)
        self.register_buffer("bank_labels", torch.arange(m) % NUM_CLASSES, persistent=False)
        codes = cfg.generator.code_params
        self.code_z = nn.Parameter(self.bank_z.clone()) if codes == "learned_z" else None
        self.code_map = nn.Parameter(torch.zeros(m, self.generator.map_channels, NUM_CLASSES, NUM_CLASSES)) \
            if codes == "embedding" else None

    @staticmethod
    def bank_size(cfg: TrialConfig) -> int:
        """M = kkt_codes_per_class_per_100 x classes x N/100 codes, at least kkt_min_codes (rounded up
        to whole classes)."""
        loss = cfg.loss
        per_class = max(round(loss.kkt_codes_per_class_per_100 * cfg.data.train_size / 100),
                        -(-loss.kkt_min_codes // NUM_CLASSES))
        return per_class * NUM_CLASSES

    @property
    def latent_dim(self) -> int:
        return self.generator.latent_dim

    def code_parameters(self) -> list[nn.Parameter]:
        """The per-code free parameters of `generator.code_params` (none by default)."""
        return [p for p in (self.code_z, self.code_map) if p is not None]

    def batch(self, classifier, terms, rng):
        g, b = self.cfg.generator, self.cfg.generator_batch
        labels = torch.arange(b) % NUM_CLASSES
        labels = labels[torch.randperm(b, generator=rng)]
        c = sample_conditioning(labels, g.soft_fraction, g.soft_temperature, rng).to(self.device)
        z = torch.randn(b, g.latent_dim, generator=rng).to(self.device)
        x, pre = self.step_fn(z, c, return_pre_tanh=True)
        logits, feats = classify(classifier, terms, jitter(x, self.cfg.train.jitter, rng), self.cfg.train.channels_last)
        return GeneratedBatch(x, pre, c, labels.to(self.device), logits, feats, z)

    def make_optimizer(self, term_params):
        """Adam over the generator (and its per-code parameters) and the loss terms' parameters (the
        KKT multipliers), those in a group of their own at train.lambda_lr when it is given."""
        t = self.cfg.train
        params = [*self.generator.parameters(), *self.code_parameters()]
        if t.lambda_lr is None or not term_params:
            return torch.optim.Adam([*params, *term_params], lr=t.lr, betas=(t.beta1, 0.999))
        return torch.optim.Adam([{"params": params}, {"params": list(term_params), "lr": t.lambda_lr}],
                                lr=t.lr, betas=(t.beta1, 0.999))

    def kkt_bank(self, seed):
        """The bank's labels (code i has label i mod classes); `loss.kkt_estimator` says how many a step."""
        return self.bank_labels.cpu().clone(), False

    def kkt_images(self, idx):
        """The codes' images with dropout off and BatchNorm in eval mode: each code is one fixed
        candidate, as the KKT condition needs (gradients still flow into the generator and the
        per-code parameters)."""
        idx = idx.to(self.bank_z.device)
        labels = idx % NUM_CLASSES
        z = self.code_z[idx] if self.code_z is not None else self.bank_z[idx]
        extra = {"code_map": self.code_map[idx]} if self.code_map is not None else {}
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(z, F.one_hot(labels, NUM_CLASSES).float().to(self.device), **extra)
        finally:
            self.generator.train(was_training)

    def _scored(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.generator.rescale == "range":
            images = stretch_to_range(images, self.origin)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def bank_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """G(bank_z) for every code, in code order (as `kkt_images`), rescaled as generator.rescale says."""
        idx = torch.arange(len(self.bank_z), device=self.bank_z.device)
        images = torch.cat([self.kkt_images(idx[i:i + 500]) for i in range(0, len(idx), 500)])
        return self._scored(images).cpu(), self.bank_labels.cpu().clone()

    @torch.no_grad()
    def eval_images(self):
        """The scored set: `bank_images` with eval.generator_images: bank, else `sample_images`."""
        if self.cfg.eval.generator_images == "bank":
            return self.bank_images()
        return self.sample_images()

    @torch.no_grad()
    def sample_images(self):
        """Hot conditioning, per_class images per class, BatchNorm in eval mode, dropout masks
        (if eval.sample_dropout) from the fixed evaluation seed."""
        was_training = self.generator.training
        self.generator.eval()
        if self.cfg.eval.sample_dropout:
            for m in self.generator.modules():
                if isinstance(m, nn.Dropout2d):
                    m.train()
        c = F.one_hot(self.eval_labels, NUM_CLASSES).float()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.eval.latent_seed)
            images = torch.cat([self.generator(self.eval_z[i:i + 500], c[i:i + 500])
                                for i in range(0, len(c), 500)])
        self.generator.train(was_training)
        return self._scored(images).cpu(), self.eval_labels.cpu().clone()

    def distill(self, targets: torch.Tensor, idx: torch.Tensor, steps: int, threshold: float,
                check_every: int = 25) -> dict[str, float]:
        """Fit G(bank_z)[idx] to `targets` by MSE (a fresh Adam at train.lr over the generator and the
        per-code parameters) for at most `steps` steps, stopping once every target is matched at SSIM
        >= threshold (checked every `check_every` steps). Returns the steps taken and the fraction
        matched at the end (each code's image as it is scored: rescaled and clamped)."""
        from harness.science.metrics import paired_ssim

        t = self.cfg.train
        opt = torch.optim.Adam([*self.generator.parameters(), *self.code_parameters()], lr=t.lr,
                               betas=(t.beta1, 0.999))
        targets = targets.to(self.bank_z.device, torch.float32)
        done, matched = 0, 0.0
        while done < steps:
            x = self.kkt_images(idx)
            loss = F.mse_loss(x.float(), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done % check_every == 0 or done == steps:
                with torch.no_grad():
                    ssim = paired_ssim(self._scored(self.kkt_images(idx).float()).cpu(), targets.cpu())
                matched = (ssim >= threshold).float().mean().item()
                if matched == 1.0:
                    break
        return {"distill_steps_done": float(done), "distill_matched_after": matched}

    def codes_for(self, labels: torch.Tensor) -> torch.Tensor:
        """A bank code for each label: target j gets the next unused code of its class (code i has
        label i mod classes), in order."""
        labels = labels.cpu().long()
        idx = torch.empty(len(labels), dtype=torch.long)
        for k in range(NUM_CLASSES):
            mine = (labels == k).nonzero().squeeze(1)
            codes = (self.bank_labels.cpu() == k).nonzero().squeeze(1)
            if len(mine) > len(codes):
                raise ConfigError(f"generator.distill_from: {len(mine)} targets of class {k} but the bank has "
                                  f"{len(codes)} codes of it; raise loss.kkt_codes_per_class_per_100 or use fewer targets")
            idx[mine] = codes[:len(mine)]
        return idx


class DirectInverter(Inverter):
    """A bank of `candidates_per_class` x classes free images with fixed labels, all optimised at
    every step (the losses and `kkt` see the whole bank: exact sums, no minibatches). The bank
    starts as Gaussian noise of std `init_scale` around `origin` (the classifier's input mean when
    it centres its input, so candidates start near the origin of the network's own input space)."""

    def __init__(self, cfg: TrialConfig, device: torch.device, origin: torch.Tensor | None = None):
        super().__init__(cfg, device, origin)
        d = cfg.direct
        per_class = d.candidates_per_class or max(1, 2 * cfg.data.train_size // NUM_CLASSES)
        gen = torch.Generator().manual_seed(cfg.seed + 104729)
        self.register_buffer("labels", torch.arange(NUM_CLASSES).repeat_interleave(per_class))
        self.images = nn.Parameter(self.origin + torch.randn(len(self.labels), 1, 28, 28, generator=gen) * d.init_scale)

    def batch(self, classifier, terms, rng):
        x = self.images
        logits, feats = classify(classifier, terms, jitter(x, self.cfg.train.jitter, rng), self.cfg.train.channels_last)
        c = F.one_hot(self.labels, NUM_CLASSES).float()
        return GeneratedBatch(x, x, c, self.labels, logits, feats, None)

    def make_optimizer(self, term_params):
        d = self.cfg.direct
        groups = [{"params": [self.images], "lr": d.lr}]
        if term_params:
            groups.append({"params": list(term_params), "lr": d.lambda_lr or d.lr})
        if d.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=d.lr, momentum=0.9)
        return torch.optim.Adam(groups, lr=d.lr)

    def kkt_bank(self, seed):
        return self.labels.cpu(), True

    def kkt_images(self, idx):
        return self.images[idx.to(self.images.device)]

    @torch.no_grad()
    def eval_images(self):
        x = self.images.detach()
        if self.cfg.direct.rescale == "minmax":
            flat = x.flatten(1)
            low, high = flat.min(1).values, flat.max(1).values
            x = (x - low[:, None, None, None]) / (high - low).clamp_min(1e-8)[:, None, None, None] * 2 - 1
        elif self.cfg.direct.rescale == "range":
            x = stretch_to_range(x, self.origin)
        return x.clamp(-1, 1).cpu(), self.labels.cpu().clone()


def stretch_factor(x: torch.Tensor, origin: torch.Tensor, significant: float = 0.2, no_room: float = 0.1,
                   outliers: float = 0.1) -> torch.Tensor:
    """Per image, the s > 0 by which `stretch_to_range` multiplies the deviation d = x − origin: the
    largest stretch that keeps origin + s·d in [-1, 1] on the image's significant pixels, where
    - a pixel whose origin lies within `no_room` of the bound its deviation points at is left out:
      it has little room to move (MNIST's mean image of n = 100 sits within 0.1 of −1 on 438 of its
      784 pixels, a third of them exactly at −1, where one small noisy deviation would otherwise give
      s ≈ 0 and turn the candidate into the mean image); it is clamped instead;
    - of the pixels left, the significant ones have |d| at least `significant` x the largest |d|
      among them (the others, left from the initial noise, would otherwise fix s);
    - the `outliers` fraction of the significant pixels with the smallest allowed stretch is let
      through to be clamped, so that a few noisy pixels cannot fix s.
    On the real MNIST n = 100 mean with candidates 0.3·(t − mean) + N(0, 0.05²), this leaves every
    candidate above SSIM 0.5 of its image (no_room 0.02 and outliers 0.02 left 20 of 100 below 0.3).
    An image with no such pixel keeps s = 1."""
    d = x - origin
    room = torch.where(d > 0, 1 - origin, -1 - origin).expand_as(d).flatten(1)  # to the bound d points at
    d = d.flatten(1)
    movable = (room.abs() >= no_room) & (d != 0) & torch.isfinite(d)
    largest = d.abs().where(movable, torch.zeros_like(d)).amax(1, keepdim=True).clamp_min(1e-12)
    keep = movable & (d.abs() >= significant * largest)
    ratio = torch.where(keep, room / d.where(d != 0, torch.ones_like(d)), torch.inf).clamp(min=0)
    count = keep.sum(1)
    k = (outliers * count).floor().long().clamp(max=(count - 1).clamp(min=0))
    s = ratio.sort(1).values.gather(1, k[:, None]).squeeze(1)
    return torch.where(count > 0, s, torch.ones_like(s)).nan_to_num(1.0, posinf=1.0)


def stretch_to_range(x: torch.Tensor, origin: torch.Tensor, **options) -> torch.Tensor:
    """Each image's deviation from `origin` stretched by `stretch_factor` (options pass through).
    For a candidate that is an exact multiple c·(t − origin) of an image t with pixels at ±1 this
    gives t back: s = 1/c."""
    return origin + stretch_factor(x, origin, **options)[:, None, None, None] * (x - origin)


def load_targets(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images n x 1 x 28 x 28 clamped to [-1, 1], labels) from a .pt file holding `images` and
    `labels`: a run's samples.pt, or a direct run's inverter.pt (its raw candidates)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(f"generator.distill_from: cannot read {path}: {err}") from err
    if not isinstance(data, dict) or "images" not in data or "labels" not in data:
        raise ConfigError(f"generator.distill_from: {path} holds no `images` and `labels` (give a samples.pt, "
                          "or a direct run's inverter.pt)")
    images = data["images"].detach().float().reshape(-1, 1, 28, 28).clamp(-1, 1)
    labels = data["labels"].detach().long().reshape(-1)
    if len(images) != len(labels):
        raise ConfigError(f"generator.distill_from: {path} has {len(images)} images but {len(labels)} labels")
    return images, labels


INVERTERS: dict[str, type[Inverter]] = {"generator": GeneratorInverter, "direct": DirectInverter}


def build_inverter(cfg: TrialConfig, device: torch.device, origin: torch.Tensor | None = None) -> Inverter:
    """`origin`: where the classifier's input space is centred (its `input_mean`), or None."""
    return INVERTERS[cfg.inverter](cfg, device, origin).to(device)
