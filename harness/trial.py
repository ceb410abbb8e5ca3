"""One trial: pretrain (or reuse) the classifier, invert it (a generator or direct candidates), evaluate.

`Trial` is the whole science of the harness and knows nothing of Ray or MLflow: `harness run`
drives it in a loop, the Ray Tune trainable drives it and checkpoints `state_dict()`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import yaml

from harness.cache import CacheEntry, cache_dir
from harness.science.classifiers import pretrained_classifier, pretrained_evaluator, smoothed_relu
from harness.config import TrialConfig
from harness.science.data import NUM_CLASSES, DATASETS, heldout_set, train_subset
from harness.science.inverters import GeneratorInverter, build_inverter, load_targets
from harness.science.losses import build_loss_terms
from harness.science.metrics import Evaluation, Evaluator, reference_points

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by `fault: raise_once` (tests of retries only)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cached_reference_points(cfg: TrialConfig, train, heldout) -> dict[str, float]:
    e = cfg.eval
    spec = {"kind": "reference_points", "version": 2, "data": cfg.data.model_dump(exclude={"root"}),
            "topk": e.topk, "reference_per_class": e.reference_per_class, "diversity_pairs": e.diversity_pairs}
    entry = CacheEntry(cache_dir(cfg.cache_dir), "references", spec)
    payload, _ = entry.get_or_build(lambda: {k: float(v) for k, v in reference_points(train, heldout, e).items()})
    return payload


class Trial:
    def __init__(self, cfg: TrialConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # subnormal floats (tiny gradients of a converged reconstruction, softplus tails) make CPU
        # arithmetic up to 100x slower; flushing them to zero changes no result that matters
        torch.set_flush_denormal(True)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.device = resolve_device(cfg.device)
        start = time.perf_counter()
        self.classifier, self.classifier_info = pretrained_classifier(cfg, self.device)
        self.evaluator_model, self.evaluator_info = pretrained_evaluator(cfg, self.device)
        self.train_set, _ = train_subset(cfg.data)
        heldout = heldout_set(cfg.data, cfg.data.train_size // NUM_CLASSES)
        self.references = cached_reference_points(cfg, self.train_set, heldout)
        self.evaluator = Evaluator(cfg.eval, self.train_set, heldout, self.classifier, self.evaluator_model,
                                   self.references)
        self.setup_seconds = time.perf_counter() - start

        torch.manual_seed(cfg.seed)
        self.inverter = build_inverter(cfg, self.device, getattr(self.classifier, "input_mean", None))
        if cfg.train.channels_last:
            self.classifier.to(memory_format=torch.channels_last)
            self.inverter.to(memory_format=torch.channels_last)
        self.terms = build_loss_terms(cfg.loss, self.classifier, self.inverter, cfg.data.train_size,
                                      cfg.generator_batch, cfg.seed).to(self.device)
        self.weights = {name: getattr(cfg.loss, name) for name in self.terms}
        self.optimizer = self.inverter.make_optimizer(list(self.terms.parameters()))
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.train_seconds = 0.0  # inverter training time so far (train.max_seconds)
        self.history: list[dict] = []
        self.resumed = False
        self.last_evaluation: Evaluation | None = None
        self.evaluated_epoch = 0  # the epoch `last_evaluation` measured
        # generator.distill_from: the targets, the bank code each is distilled into, and how it went
        self.distill_targets: torch.Tensor | None = None
        self.distill_codes: torch.Tensor | None = None
        self.distill_info: dict[str, float] = {}
        if cfg.generator.distill_from and isinstance(self.inverter, GeneratorInverter):
            self.distill_targets, labels = load_targets(cfg.generator.distill_from)
            self.distill_codes = self.inverter.codes_for(labels)

    @property
    def classifier_metrics(self) -> dict[str, float]:
        """What training left the classifier at, logged beside every run (see classifiers.py)."""
        info = self.classifier_info
        keys = ("test_acc", "train_acc", "train_loss", "grad_norm", "parameters")
        out = {f"classifier_{k}": float(info[k]) for k in keys if k in info}
        out.update({k: float(info[k]) for k in ("kkt_residual_train", "kkt_residual_heldout") if k in info})
        if "parameters" in info:  # the reconstruction literature's axis: parameters per training pixel
            out["params_per_train_pixel"] = info["parameters"] / (28 * 28 * self.cfg.data.train_size)
        return out

    # -- training ---------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """One epoch of generator steps; returns the mean of each term and of the total loss."""
        if self.cfg.fault == "raise_once" and self.epoch == 2 and not self.resumed:
            raise InjectedFault("injected fault (fault: raise_once) at epoch 3")
        if self.distill_targets is not None and self.epoch == 0 and not self.distill_info:
            self.distill()
        self.inverter.train()
        sums = {name: 0.0 for name in self.terms} | {"loss": 0.0}
        steps = self.cfg.train.steps_per_epoch
        weights = self.epoch_weights()
        start = time.perf_counter()
        with smoothed_relu(self.classifier, self.cfg.train.relu_alpha):
            for _ in range(steps):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.amp):
                    batch = self.inverter.batch(self.classifier, self.terms, self.rng)
                    values = {name: term(batch).float() for name, term in self.terms.items()}
                    total = sum(weights[name] * v for name, v in values.items())
                if self.cfg.fault == "nan" and self.epoch >= 1:
                    total = total * float("nan")
                if not torch.isfinite(total):
                    sums = {k: float("nan") for k in sums}
                    break
                self.optimizer.zero_grad(set_to_none=True)
                # only what the optimiser steps: autograd then skips every gradient with respect to
                # the frozen classifier's θ copies that the kkt and grad terms build on
                total.backward(inputs=self.trainable)
                self.optimizer.step()
                for name, v in values.items():
                    sums[name] += v.item() / steps
                sums["loss"] += total.item() / steps
        self.train_seconds += time.perf_counter() - start
        self.epoch += 1
        return {f"loss_{k}" if k != "loss" else k: v for k, v in sums.items()}

    def epoch_weights(self) -> dict[str, float]:
        """The loss weights of the coming epoch: the configured ones, with the TV weight ramped up
        linearly over the first `train.tv_ramp_epochs` epochs (epoch e of R: tv · (e + 1) / R)."""
        weights = dict(self.weights)
        ramp = self.cfg.train.tv_ramp_epochs
        if ramp and "tv" in weights:
            weights["tv"] *= min(1.0, (self.epoch + 1) / ramp)
        return weights

    # -- evaluation --------------------------------------------------------------------------
    def generate_eval_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed evaluation set of the inverter (see `Inverter.eval_images`), on the CPU."""
        return self.inverter.eval_images()

    def evaluate(self) -> Evaluation:
        evaluation = self.evaluator(*self.generate_eval_images())
        evaluation.metrics.update(self.inverter_metrics(evaluation.metrics))
        self.last_evaluation = evaluation
        self.evaluated_epoch = self.epoch
        return self.last_evaluation

    def inverter_metrics(self, scored: dict[str, float]) -> dict[str, float]:
        """What an evaluation adds beside the scored images' metrics: the generator's fresh-latent
        sample (sample_*; the scored values themselves when the sample is what is scored), the kkt
        term's residual over its whole bank (kkt_residual_bank, under the classifier's smoothing as in
        training) and, after a distillation, how many of its targets the bank still matches."""
        out: dict[str, float] = {}
        if isinstance(self.inverter, GeneratorInverter):
            if self.cfg.eval.generator_images == "bank":
                out.update(self.evaluator.sample_metrics(*self.inverter.sample_images()))
            else:
                out.update(sample_diversity=scored["diversity"], sample_evaluator_acc=scored["evaluator_acc"],
                           sample_target_acc=scored["target_acc"])
        if "kkt" in self.terms:
            with smoothed_relu(self.classifier, self.cfg.train.relu_alpha):
                out["kkt_residual_bank"] = self.terms["kkt"].bank_residual()
        if self.distill_targets is not None:
            out.update(self.distill_match())
        return out

    def distill(self) -> None:
        """generator.distill_from: fit the bank codes to their targets before the first epoch."""
        start = time.perf_counter()
        info = self.inverter.distill(self.distill_targets, self.distill_codes, self.cfg.train.distill_steps,
                                     self.cfg.train.distill_ssim)
        self.distill_info = {**info, "distill_seconds": time.perf_counter() - start}

    @torch.no_grad()
    def distill_match(self) -> dict[str, float]:
        """SSIM of each distilled target's code image G(bank_z)_i, as it is scored (rescaled and
        clamped), to the target."""
        from harness.science.metrics import paired_ssim

        images = self.inverter._scored(self.inverter.kkt_images(self.distill_codes).float()).cpu()
        ssim = paired_ssim(images, self.distill_targets)
        return {"distill_matched_frac": (ssim >= self.cfg.train.distill_ssim).float().mean().item(),
                "distill_ssim_mean": ssim.mean().item(), **self.distill_info}

    def step(self, evaluate: bool = False) -> dict[str, float]:
        """Train one epoch, evaluate when due (or when `evaluate`, e.g. at an epoch whose outputs
        are written: a checkpoint's images and its metrics must be of the same epoch); the row
        that is logged and reported."""
        start = time.perf_counter()
        row: dict[str, float] = {"epoch": self.epoch + 1}
        losses = self.train_epoch()
        row.update(losses)
        row["nonfinite"] = float(not all(math.isfinite(v) for v in losses.values()))
        scheduled = (self.epoch == 1 or self.epoch % self.cfg.train.eval_every == 0
                     or self.epoch >= self.cfg.train.epochs or self.out_of_time)
        # `evaluated`: 1 on the schedule (what the collapse stopper counts), 2 for an evaluation off
        # it (a checkpoint's, or the first after a restore), 0 where the last evaluation is repeated;
        # a run evaluated straight through and one restored from a checkpoint count the same
        evaluated = 0.0
        if row["nonfinite"]:
            row.update(self.nonfinite_metrics())
        elif scheduled or evaluate or self.last_evaluation is None:
            row.update(self.evaluate().metrics)
            evaluated = 1.0 if scheduled else 2.0
        else:
            row.update(self.last_evaluation.metrics)
        row["evaluated"] = evaluated
        row["train_seconds"] = self.train_seconds
        row["epoch_seconds"] = time.perf_counter() - start
        self.history.append(row)
        return row

    def nonfinite_metrics(self) -> dict[str, float]:
        """What a run whose loss turned NaN/inf reports: score 0, never best."""
        base = dict(self.last_evaluation.metrics) if self.last_evaluation else dict(self.references)
        base.update(score=0.0, collapsed=1.0)
        return base

    @property
    def out_of_time(self) -> bool:
        limit = self.cfg.train.max_seconds
        return bool(limit) and self.train_seconds >= limit

    @property
    def done(self) -> bool:
        return (self.epoch >= self.cfg.train.epochs or self.out_of_time
                or bool(self.history and self.history[-1]["nonfinite"]))

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"inverter": self.inverter.state_dict(), "terms": self.terms.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": self.rng.get_state(),
                 "torch_rng": torch.get_rng_state(), "epoch": self.epoch, "history": self.history,
                 "train_seconds": self.train_seconds}
        if self.distill_info:
            state["distill"] = dict(self.distill_info)
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint written by `state_dict` (load it with map_location="cpu": tensors
        move to this trial's device here, RNG states stay on the CPU)."""
        self.inverter.load_state_dict(state["inverter"])
        self.terms.load_state_dict(state["terms"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.distill_info = dict(state.get("distill", {}))
        self.last_evaluation, self.evaluated_epoch = None, 0  # of the run before; the next step evaluates
        self.resumed = True

    # -- outputs -----------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        return dict(self.history[-1]) if self.history else {}

    def write_outputs(self, out_dir: str | Path) -> dict[str, Path]:
        """metrics.json, history.json, grid.png, nearest.png, reconstructions.png, samples.pt,
        per_train_best_ssim.json, inverter.pt, config.yaml."""
        from harness.science.plots import save_grid, save_nearest_pairs, save_reconstructions

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        nonfinite = bool(self.history and self.history[-1]["nonfinite"])
        if self.last_evaluation is None or (self.evaluated_epoch != self.epoch and not nonfinite):
            self.evaluate()  # never pair this epoch's images with an older evaluation's indices
        evaluation = self.last_evaluation
        # the images that evaluation scored (after a NaN loss: the last finite epoch's, not the NaN ones)
        images, labels = evaluation.images, evaluation.labels
        metrics = {**evaluation.metrics, "epoch": self.epoch, "train_seconds": self.train_seconds,
                   **self.classifier_metrics,
                   "evaluator_heldout_acc": self.evaluator_info["heldout_acc"],
                   "evaluated_epoch": self.evaluated_epoch,
                   "nonfinite": self.history[-1]["nonfinite"] if self.history else 0.0}
        paths = {name: out / name for name in ("metrics.json", "history.json", "grid.png", "nearest.png",
                                                "reconstructions.png", "samples.pt", "inverter.pt",
                                                "config.yaml", "per_train_best_ssim.json")}
        paths["metrics.json"].write_text(json.dumps(metrics, indent=2))
        paths["history.json"].write_text(json.dumps(self.history, indent=1))
        paths["per_train_best_ssim.json"].write_text(json.dumps([round(v, 5) for v in evaluation.per_train_best_ssim.tolist()]))
        names = DATASETS[self.cfg.data.dataset].class_names
        per_class = min(10, int((labels == 0).sum()))
        save_grid(images, labels, paths["grid.png"], per_class=per_class, class_names=names)
        save_nearest_pairs(images, labels, evaluation.nearest_train_index, evaluation.nearest_train_ssim,
                           self.train_set.images, paths["nearest.png"], class_names=names)
        side_index, train_best, train_which = evaluation.train_side
        held_best, held_which = evaluation.heldout_side
        save_reconstructions(self.train_set.images[side_index], train_best, images[train_which.clamp(min=0)],
                             self.evaluator.heldout.images, held_best, images[held_which.clamp(min=0)],
                             paths["reconstructions.png"], threshold=self.cfg.eval.recon_threshold)
        torch.save({"images": images, "labels": labels, "nearest_train_index": evaluation.nearest_train_index,
                    "nearest_train_ssim": evaluation.nearest_train_ssim}, paths["samples.pt"])
        torch.save(self.inverter.state_dict(), paths["inverter.pt"])
        paths["config.yaml"].write_text(yaml.safe_dump(self.cfg.model_dump(), sort_keys=False))
        return paths
