"""One typed configuration for a trial: the single source of truth for `harness run`,
sweep files and MLflow params. YAML files hold only what differs from these defaults.

Every field carries its documentation (`harness config` prints it). Unknown keys,
wrong types and out-of-range values raise `ConfigError` with a one-line message naming the
field; the CLI turns that into exit code 2 before anything is written.
"""
from __future__ import annotations

import math
import os
import reprlib
import unicodedata
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class ClusterError(RuntimeError):
    """Ray could not be started or reached; the message says why, in one line."""


NUMBER_ERRORS = ("not_finite", "bool_not_number")  # error types whose message already quotes the value


def _leaf_types(annotation) -> set:
    """The scalar types a field takes: `list[int] | None` -> {int, NoneType}, `float | Literal["auto"]`
    -> {float, str}; a dict's values count, its keys do not; `Any` stays Any."""
    if annotation is Any:
        return {Any}
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {type(a) for a in args}
    if origin is dict:
        args = args[1:]
    return set().union(*(_leaf_types(a) for a in args)) if args else {annotation}


def _finite_or_not_a_number(item: float | str) -> bool:
    """False for inf and nan, as a float or as text a number setting would read as one ("inf", "-nan")."""
    try:
        return math.isfinite(float(item))
    except ValueError:
        return True


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_finite_numbers(cls, value, info):
        """A number setting refuses true/false (pydantic would take them as 1 and 0) and inf/nan
        (YAML .inf/.nan, or `inf` in --set), before its range check, so the message says why."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool):
                kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
                if kinds & {int, float} and not kinds & {bool, Any}:
                    example = "a number such as 1.0" if float in kinds else "a whole number such as 1"
                    raise PydanticCustomError("bool_not_number", f"{str(item).lower()} is not a number; give {example}")
            elif isinstance(item, (float, str)) and not _finite_or_not_a_number(item):
                kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
                if kinds & {int, float} and Any not in kinds:
                    raise PydanticCustomError("not_finite", f"{str(item).strip()} is not a finite number; give a "
                                              "number such as 1.0")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value, info):
        """Every number is finite, however it was converted."""
        bad = next((v for v in (value if isinstance(value, list) else [value])
                    if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            raise PydanticCustomError("not_finite", f"{bad!r} is not a finite number; give a number such as 1.0")
        return value


SEED_MAX = 2 ** 32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32)
MAX_NAME = 100  # names become folder names (Ray, MLflow, the output folder): keep them short
MAX_YAML_VALUES = 100_000  # a config or sweep file holds hundreds; more comes from alias expansion


def seed_field(default: int, description: str):
    return Field(default, ge=0, le=SEED_MAX, description=description)


def control_character(text: str) -> str | None:
    """The first control character (NUL, escape, newline, ...) in `text`, or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value) cut to about `limit` characters, without building the whole repr of a large value."""
    r = reprlib.Repr()
    r.maxlevel, r.maxtuple, r.maxlist, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = limit
    return r.repr(value)


DATASET_TRAIN_SIZES = {"mnist": 60000, "fashionmnist": 60000}
# images of the smallest class in each training split (MNIST: the 5,421 fives)
DATASET_SMALLEST_CLASS = {"mnist": 5421, "fashionmnist": 6000}
CENTRING_PER_CLASS = 100  # images per class of the disjoint centring set (classifier.center_mean: disjoint)


class DataConfig(_Section):
    dataset: Literal["mnist", "fashionmnist"] = Field(
        "mnist", description="Dataset whose classifier is inverted: mnist or fashionmnist.")
    train_size: int = Field(
        1000, ge=10, description="N: size of the class-balanced training subset the classifier "
        "is trained on (a multiple of the class count, at most the dataset's training split).")
    subset_seed: int = seed_field(0, "Seed that draws the training subset.")
    classifier_subset: Literal["same", "disjoint"] = Field(
        "same", description="Images the classifier is trained on: the training subset the metrics "
        "score against (same), or an equally sized class-balanced subset disjoint from it (disjoint: "
        "the negative control, where the scored 'training images' are images the classifier never saw).")
    root: str | None = Field(
        None, description="Data folder for torchvision (default: $HARNESS_DATA_ROOT, else "
        "~/.cache/inversion-harness/data, where torchvision downloads when online).")

    @model_validator(mode="after")
    def _size_fits(self):
        limit = DATASET_TRAIN_SIZES[self.dataset]
        if self.train_size > limit:
            raise ValueError(f"train_size: {self.train_size} is larger than the {self.dataset} "
                             f"training split ({limit}); use at most {limit}")
        if self.train_size % 10:
            raise ValueError(f"train_size: {self.train_size} is not a multiple of the 10 classes; "
                             "use a multiple of 10 so the subset is class-balanced")
        return self


class ClassifierConfig(_Section):
    arch: Literal["cnn", "mlp"] = Field("cnn", description="Classifier family: shallow cnn or mlp.")
    depth: int = Field(2, ge=1, le=4, description="CNN: conv blocks (1-4); MLP: hidden layers (unless widths is given).")
    pool: Literal["avg", "max"] = Field("avg", description="CNN pooling: avg or max.")
    width: int = Field(512, ge=8, description="MLP: width of the first hidden layer (halved per layer).")
    widths: list[int] | None = Field(None, description="MLP: the width of each hidden layer, e.g. [1000, 1000] "
                                     "(overrides depth and width).")
    channels: list[int] | None = Field(None, description="CNN: the channels of each conv block, one per block "
                                       "(default 32, 64, 128, ...; e.g. [32, 125] gives 2 blocks the parameters of "
                                       "1 block's default, for a comparison of depth at matched p/(d·n)).")
    norm: Literal["batch", "none"] = Field("batch", description="BatchNorm after each conv / hidden layer, or none.")
    bias: bool = Field(True, description="Biases in the conv and linear layers (false: a homogeneous network).")
    activation: Literal["leaky_relu", "relu"] = Field("leaky_relu", description="Hidden activation: "
                                                      "LeakyReLU(0.2) or ReLU.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout after each block / hidden layer.")
    center: bool = Field(False, description="Subtract the per-pixel mean of the classifier's own training images "
                         "from its input (Haim et al.'s dataset-mean subtraction; the mean is part of the "
                         "classifier, so inverters still work on images, and the direct inverter's candidates "
                         "start at that mean image).")
    center_mean: Literal["own", "disjoint"] = Field(
        "own", description="With center: the mean of the classifier's own training images, or of 1,000 "
        "class-balanced training-split images disjoint from the training subset and the negative "
        "control's subset (the centre then carries no training image).")
    init_scale: float = Field(1.0, gt=0, description="Multiplies the first layer's initial weights (small "
                              "initialisation drives training towards a max-margin KKT point).")
    optimizer: Literal["adam", "gd"] = Field("adam", description="Pretraining: adam (minibatches, `epochs`) or gd "
                                             "(full-batch gradient descent with momentum, `steps`).")
    epochs: int = Field(20, ge=1, description="adam: pretraining epochs over the training subset.")
    batch_size: int = Field(100, ge=1, description="adam: pretraining batch size.")
    steps: int = Field(3000, ge=1, description="gd: full-batch steps.")
    warmup_steps: int = Field(0, ge=0, description="gd: the learning rate rises linearly from lr/warmup_steps to lr "
                              "over this many first steps (0 = none); without it a bias-free ReLU MLP at lr 0.1 "
                              "can lose every unit in its first steps and stay at chance level.")
    momentum: float = Field(0.9, ge=0, lt=1, description="gd: momentum.")
    lr: float = Field(1e-3, gt=0, description="Pretraining learning rate (Adam or gd).")
    weight_decay: float = Field(1e-5, ge=0, description="Pretraining weight decay (Adam's, or gd's L2 term).")
    seed: int = seed_field(0, "Seed of the classifier's initialisation and batch order.")
    stationarity_steps: int | None = Field(
        None, ge=0, description="Adam steps that fit the KKT multipliers of the real training images (and of "
        "as many held-out images) for the stationarity diagnostic kkt_residual_train / _heldout; 0 = skip; "
        "default: 200 for optimizer gd (the reconstruction regime), 0 for adam.")

    @property
    def stationarity_budget(self) -> int:
        if self.stationarity_steps is not None:
            return self.stationarity_steps
        return 200 if self.optimizer == "gd" else 0

    @model_validator(mode="after")
    def _widths_ok(self):
        if self.widths is not None and (not self.widths or min(self.widths) < 1):
            raise ValueError("widths: give a non-empty list of positive layer widths, e.g. [1000, 1000]")
        if self.channels is not None and (len(self.channels) != self.depth or min(self.channels) < 1):
            raise ValueError(f"channels: give one positive channel count per conv block, {self.depth} for depth "
                             f"{self.depth} (e.g. {[32 * 2 ** i for i in range(self.depth)]}), or leave it out")
        return self


class GeneratorConfig(_Section):
    latent_dim: int = Field(100, ge=1, description="Dimension of the latent z.")
    embed_dim: int = Field(100, ge=1, description="Dimension of the conditioning embedding.")
    channels: int = Field(32, ge=8, description="The generator's width: every layer's channels scale with it "
                          "(2x, 1x, 1/2x and 1/4x this from the first transposed conv to the last).")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout2d in the upsampling stages (heavy: 0.1-0.5; 0.5 is the first default that was not collapsed, see README).")
    soft_fraction: float = Field(0.5, ge=0, le=1, description="Share of each training batch with "
                                 "soft (softmax) conditioning; the rest is one-hot.")
    soft_temperature: float = Field(1.0, gt=0, description="Temperature of the soft conditioning softmax.")
    rescale: Literal["none", "range"] = Field(
        "none", description="How the evaluation images are scored: as generated (none), or each image's "
        "deviation from the classifier's input mean stretched to the pixel range (range, as direct.rescale: "
        "range; a KKT-trained image is a training image only up to scale about that mean). Without a "
        "centred classifier the mean is the zero image.")
    output: Literal["tanh", "scaled_tanh"] = Field(
        "tanh", description="Output layer: tanh(h) (the study's), or scaled_tanh: origin + output_scale · tanh(h) "
        "about the classifier's input mean (the zero image without classifier.center), which reaches ±1 at a "
        "finite h; the pixel term then bounds the image itself to ±pixel_bound, as for the direct inverter's "
        "candidates, and images are clamped to [-1, 1] when scored.")
    output_scale: float = Field(2.0, gt=0, description="scaled_tanh: s of origin + s · tanh(h) (2: every pixel of "
                                "any origin in [-1, 1] reaches both -1 and 1 with |tanh| < 1).")
    code_params: Literal["none", "learned_z", "embedding"] = Field(
        "none", description="Free parameters per bank code (the fixed codes G(bank_z) that the kkt term and "
        "eval.generator_images: bank use): none; learned_z (each code's z is a learnable parameter, starting at "
        "its fixed draw); or embedding (a learnable channels x 10 x 10 map per code, zero at the start, added to "
        "the generator's 10 x 10 class map), so that the generator can hold as many distinct images as codes. "
        "Fresh-latent samples get neither.")
    distill_from: str | None = Field(
        None, description="Diagnostic: a .pt file holding `images` and `labels` (a run's samples.pt, or a direct "
        "run's inverter.pt: its raw candidates), images clamped to [-1, 1]. Before the first epoch G(bank_z) is "
        "fitted to them by MSE (target j to the next bank code of its class; train.distill_steps), then training "
        "goes on with the loss; each evaluation logs distill_matched_frac and distill_ssim_mean.")


class LossConfig(_Section):
    """Weights of the loss terms (0 = the term is not built and costs nothing) and their options."""
    ce: float = Field(1.0, ge=0, description="Cross-entropy to the target label.")
    kl: float = Field(0.0, ge=0, description="KL(c || p): match the conditioning vector.")
    cos: float = Field(0.0, ge=0, description="Mean cosine similarity of penultimate features (diversity).")
    ortho: float = Field(0.0, ge=0, description="||F^F^T - I||^2 over feature pairs (diversity).")
    ms: float = Field(0.0, ge=0, description="Mode seeking: pixel distance / latent distance of "
                      "same-class pairs, inverted (pixel-space diversity; not in the study's list).")
    tv: float = Field(1.0, ge=0, description="Total variation (smoothness; 1.0 with jitter 2 was the best "
                      "default found at equal wall time, see README).")
    pixel: float = Field(0.0, ge=0, description="Pixel-range penalty on the pre-Tanh output (on the image itself "
                        "for generator.output: scaled_tanh and for the direct inverter's candidates).")
    pert: float = Field(0.0, ge=0, description="Perturbation consistency.")
    conf: float = Field(0.0, ge=0, description="Confidence: 1 - p_y (or entropy).")
    grad: float = Field(0.0, ge=0, description="Norm of the classifier's parameter gradient.")
    kkt: float = Field(0.0, ge=0, description="KKT-inspired stationarity loss (Haim et al.).")
    bn: float = Field(0.1, ge=0, description="BatchNorm-statistics prior (DeepInversion).")

    bn_form: Literal["squared", "norm"] = Field(
        "squared", description="bn: squared differences of the BN layers' batch and running means and "
        "variances (squared), or the norms of those differences (norm: DeepInversion's form, whose "
        "gradient does not vanish as the statistics approach the running ones).")
    diversity_scope: Literal["class", "all"] = Field(
        "class", description="cos/ortho over same-class pairs (class) or over all pairs (all).")
    pixel_bound: float = Field(1.0, gt=0, description="pixel: penalise pre-Tanh values beyond ±bound.")
    pert_epsilon: float = Field(0.05, gt=0, description="pert: size of the sign-noise perturbation.")
    conf_form: Literal["prob", "entropy"] = Field("prob", description="conf: mean(1 - p_y) or entropy of p.")
    grad_layers: int = Field(0, ge=0, description="grad: last N parameterised layers of θ (0 = all).")
    kkt_codes_per_class_per_100: float = Field(
        10.0, gt=0, description="Size of the generator's bank of fixed codes, M = this x classes x N/100 (at least "
        "kkt_min_codes; 20 = 2n): the kkt term's candidates, and the images eval.generator_images: bank scores.")
    kkt_min_codes: int = Field(100, ge=1, description="kkt: lower bound on the bank size M.")
    kkt_layers: int | None = Field(None, ge=0, description="kkt: last N parameterised layers of θ (0 = all; "
                                   "default: all for the direct inverter, the last 2 for the generator).")
    kkt_margin: Literal["max", "all"] = Field(
        "max", description="kkt: one multiplier per candidate on the margin to the largest other logit "
        "(max, Haim et al.), or one per (candidate, other class) pair (all: exact at a stationary point of "
        "cross-entropy + weight decay, Buzaglo et al.); λ_min then bounds each candidate's sum.")
    kkt_lambda_min: float = Field(0.001, ge=0, description="kkt: λ_min of the λ penalty.")
    kkt_lambda_weight: float = Field(1.0, ge=0, description="kkt: w_λ, weight of the λ penalty.")
    kkt_lambda_init: float = Field(0.001, gt=0, description="kkt: initial λ of every code.")
    kkt_estimator: Literal["full", "minibatch", "unbiased"] = Field(
        "full", description="kkt, generator inverter: full (the whole bank of M codes every step, the exact "
        "residual; the direct inverter always does this); minibatch (B = the generator batch of the M codes, "
        "scaled by M/B: its expected value adds the estimate's variance, which identical candidates lower; the "
        "study's runs before this setting); or unbiased (two independent draws of B/2 codes each, the inner "
        "product of their two residuals: its expectation is the full residual; one estimate can be negative).")


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1, description="Generator epochs.")
    steps_per_epoch: int = Field(100, ge=1, description="Generator steps per epoch.")
    batch_size: int = Field(64, ge=2, description="Generated images per step.")
    batch_per_train_image: float = Field(0.0, ge=0, description="Grow the generator batch with n: at least this "
                                         "many generated images per training image (batch = max(batch_size, "
                                         "ceil(this x n))); 0 = batch_size alone.")
    channels_last: bool = Field(False, description="Run the classifier (and the generator) in channels_last "
                                "memory format during inversion, a speed switch (the numbers stay the same).")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the generator.")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 of the generator.")
    eval_every: int = Field(2, ge=1, description="Evaluate every this many epochs (the last always); "
                            "epochs in between report the last evaluation.")
    amp: bool = Field(False, description="bfloat16 autocast for the generator step's forward passes and loss "
                      "terms (a GPU switch; off by default: on a CPU it does not pay).")
    jitter: int = Field(2, ge=0, description="Random roll of the images by up to ±jitter pixels before the "
                        "classifier at every step (DeepInversion); 0 = off. The default 2: +0.024 nn-SSIM alone, "
                        "+0.036 with tv 1, at equal wall time over 3 seeds (README, lever table).")
    tv_ramp_epochs: int = Field(0, ge=0, description="Ramp the TV weight up linearly over this many first "
                                "epochs (epoch e: loss.tv · (e + 1) / tv_ramp_epochs), so that early steps shape "
                                "the images before they are smoothed; 0 = the full weight from the start.")
    relu_alpha: float = Field(0.0, ge=0, description="During inversion, the classifier's ReLUs become "
                              "softplus(α·z)/α (smooth gradients, Haim et al.); 0 = exact ReLU.")
    max_seconds: float = Field(0.0, ge=0, description="Also stop after the epoch in which the inverter's "
                               "training time (wall clock, evaluations excluded) reaches this many seconds: "
                               "levers compared at equal wall time; results then depend on the machine; "
                               "0 = epochs alone.")
    compile: bool = Field(False, description="torch.compile the generator (a GPU switch; off by default: the "
                          "compile time does not pay back on a CPU-sized run).")
    lambda_lr: float | None = Field(None, gt=0, description="Learning rate of the KKT multipliers for the generator "
                                    "inverter, a separate Adam parameter group (default: lr, one group); the direct "
                                    "inverter's is direct.lambda_lr.")
    distill_steps: int = Field(0, ge=0, description="generator.distill_from: at most this many Adam steps (lr) of "
                               "the MSE distillation before the first epoch; it stops early once every target is "
                               "matched at distill_ssim. Not counted in train_seconds (distill_seconds).")
    distill_ssim: float = Field(0.9, gt=0, le=1, description="generator.distill_from: SSIM of G(bank_z)_i to its "
                                "target at which the target counts as matched (distill_matched_frac).")


class DirectConfig(_Section):
    """The direct inverter: a bank of free candidate images with fixed labels, optimised through the
    loss registry (Haim et al.'s reconstruction when the loss is kkt + pixel)."""
    candidates_per_class: int | None = Field(None, ge=1, description="Candidates per class (default 2n/10, "
                                             "i.e. 2n in all for n training images).")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with momentum 0.9.")
    lr: float = Field(0.01, gt=0, description="Learning rate of the candidate images.")
    lambda_lr: float | None = Field(None, gt=0, description="Learning rate of the KKT multipliers (default: lr).")
    init_scale: float = Field(0.1, gt=0, description="Standard deviation of the candidates' Gaussian initialisation.")
    rescale: Literal["minmax", "range", "clamp"] = Field(
        "minmax", description="How candidates are scored: min-max scaled to [-1, 1] per image (KKT "
        "reconstruction fixes a candidate only up to its scale, as Haim et al. score it); range: the "
        "candidate's deviation from the classifier's input mean (0 without classifier.center) stretched "
        "until its strongest pixels reach ±1 (the scale-only estimate a centred classifier needs); or clamped.")


class EvalConfig(_Section):
    per_class: int = Field(100, ge=2, description="Generated evaluation images per class (hot conditioning).")
    generator_images: Literal["sample", "bank"] = Field(
        "sample", description="The generator's scored images: sample (per_class images per class from fresh "
        "latents, dropout as sample_dropout), or bank (G(bank_z), the M fixed codes that the kkt term acts on, "
        "dropout off: the candidates the objective shapes, as the direct inverter's bank). With bank, the "
        "sample's diversity and accuracies are logged as sample_diversity, sample_evaluator_acc, "
        "sample_target_acc (with sample they equal diversity, evaluator_acc, target_acc).")
    latent_seed: int = seed_field(1234, "Seed of the fixed evaluation latents (and dropout masks).")
    sample_dropout: bool = Field(
        True, description="Keep the generator's Dropout2d active when sampling the evaluation set "
        "(BatchNorm stays in eval mode): the heavy dropout is this generator's main source of "
        "diversity; false = plain eval mode, where only z varies the images.")
    topk: int = Field(15, ge=1, description="Nearest-neighbour prefilter: exact SSIM on this many "
                      "candidates by correlation and this many by L2 distance.")
    recon_threshold: float = Field(0.4, gt=0, le=1, description="SSIM at which an image counts as reconstructed.")
    strict_threshold: float = Field(0.5, gt=0, le=1, description="The stricter bar of the *_coverage_strict "
                                    "metrics (at 0.4 class-typical images already count at small n).")
    diversity_pairs: int = Field(300, ge=1, description="Image pairs per class sampled for `diversity`.")
    collapse_diversity_frac: float = Field(
        0.25, ge=0, le=1, description="collapsed if diversity < this x ref_heldout_diversity.")
    collapse_unique_frac: float = Field(0.1, ge=0, le=1, description="collapsed if unique_nn_frac < this.")
    reference_per_class: int = Field(50, ge=2, description="Held-out images per class for the reference points.")

    @model_validator(mode="after")
    def _strict_above_recon(self):
        if self.strict_threshold < self.recon_threshold:
            raise ValueError(f"strict_threshold ({self.strict_threshold}) is below recon_threshold "
                             f"({self.recon_threshold}); give eval.strict_threshold >= eval.recon_threshold")
        return self


class EvaluatorConfig(_Section):
    epochs: int = Field(15, ge=1, description="Training epochs of the independent evaluator.")
    seed: int = seed_field(0, "Seed of the evaluator.")


class TrialConfig(_Section):
    name: str = Field("trial", max_length=MAX_NAME, description="Name of the trial (run names, output folders).")
    seed: int = seed_field(0, "Seed of the generator, its latents and the loss terms' noise.")
    device: str = Field("auto", description="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    deterministic: bool = Field(False, description="Deterministic kernels only (torch.use_deterministic_algorithms; "
                                "on a GPU also CUBLAS_WORKSPACE_CONFIG): bit-exact reruns and resumes, a little slower.")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = all cores, or the CPUs Ray gives the trial).")
    cache_dir: str | None = Field(None, description="Classifier/reference cache (default: "
                                  "$HARNESS_CACHE_DIR, else ~/.cache/inversion-harness).")
    data: DataConfig = Field(default_factory=DataConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    inverter: Literal["generator", "direct"] = Field(
        "generator", description="How the classifier is inverted: generator (the study's conditioned "
        "generator) or direct (free candidate images, the reconstruction papers' method).")
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    direct: DirectConfig = Field(default_factory=DirectConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    fault: Literal["none", "raise_once", "nan"] = Field(
        "none", description="Test-only fault injection: raise once at epoch 2, or make the loss NaN.")

    @property
    def generator_batch(self) -> int:
        """Generated images per step: train.batch_size, grown with n by train.batch_per_train_image."""
        t = self.train
        return max(t.batch_size, math.ceil(t.batch_per_train_image * self.data.train_size))

    @model_validator(mode="after")
    def _device_ok(self):
        if control_character(self.name) is not None:
            raise ValueError(f"name: {short_repr(self.name)} holds a control character; it names folders, so "
                             "use printable text")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device: unknown device {short_repr(self.device)}; use auto, cpu, cuda or cuda:N")
        if self.classifier.center and self.classifier.center_mean == "disjoint":
            # the centring set comes from what the training subset and the negative control's leave
            room = DATASET_SMALLEST_CLASS[self.data.dataset] - 2 * (self.data.train_size // 10)
            if room < CENTRING_PER_CLASS:
                largest = (DATASET_SMALLEST_CLASS[self.data.dataset] - CENTRING_PER_CLASS) // 2 // 10 * 100
                raise ValueError(f"classifier.center_mean: disjoint needs {CENTRING_PER_CLASS} images per class "
                                 f"beside the training subset and the negative control's; at data.train_size "
                                 f"{self.data.train_size} the smallest {self.data.dataset} class leaves {max(room, 0)}: "
                                 f"use data.train_size <= {largest} or center_mean: own")
        if self.generator.distill_from and self.inverter != "generator":
            raise ValueError("generator.distill_from: distils into the generator's bank, but inverter is "
                             f"{self.inverter}; use inverter: generator or leave distill_from unset")
        if self.generator.distill_from and not self.train.distill_steps:
            raise ValueError("generator.distill_from: train.distill_steps is 0, so nothing would be distilled; "
                             "give train.distill_steps > 0 (e.g. 500)")
        return self


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        section = _section_at(first["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return f"{loc}: unknown key; allowed here: {allowed}"
    if first["type"] in NUMBER_ERRORS:
        return f"{loc}: {msg}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # model validators report at the section level: their message already names the field
        return f"{loc + '.' if loc else ''}{msg}"
    return f"{loc}: {msg} (got {short_repr(first.get('input'))})"


def _section_at(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = TrialConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["loss.kkt=1", "data.dataset=mnist"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set loss.kkt=1")
        key, raw = pair.split("=", 1)
        value = parse_yaml(raw, f"--set {key.strip()}") if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<:` merges may be overridden by the mapping's own keys
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key {short_repr(key)} given twice in one mapping (lines {seen[key]} and {line}; "
                                  "YAML keeps only the last); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict[int, int | None], depth: int = 0) -> int:
    """How many values `node` holds once every alias (*name) is written out in full."""
    if id(node) in memo:
        if memo[id(node)] is None:
            raise ConfigError("an alias refers to a value that holds it; write the values out")
        return memo[id(node)]
    if depth > 100:
        raise ConfigError("values nested more than 100 levels deep; flatten the file")
    memo[id(node)] = None
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, depth + 1) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values, refusing a key given twice and aliases that expand beyond
    MAX_YAML_VALUES values (a "billion laughs" file); errors name `where` and the line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise ConfigError(f"more than {MAX_YAML_VALUES:,} values once its aliases (*name) are expanded; "
                              "write the values out")
        return loader.construct_document(node)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML ({problem[:80]}{at})") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deep; flatten the file") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {short_repr(str(path))} not found; pass an existing YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {path} ({exc.__class__.__name__}: {exc})") from None
    data = parse_yaml(text, f"config: {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of settings at the top level")
    return data


def check_data_root(data: DataConfig) -> None:
    """Refuse a data folder that was named (data.root or $HARNESS_DATA_ROOT) but does not exist on
    this machine, before anything runs: torchvision would create it and try to download into it.
    The default folder is left to torchvision (it downloads there when online)."""
    if data.root:
        name, root = "data.root", data.root
    elif os.environ.get("HARNESS_DATA_ROOT"):
        name, root = "HARNESS_DATA_ROOT", os.environ["HARNESS_DATA_ROOT"]
    else:
        return
    if not Path(root).expanduser().is_dir():
        raise ConfigError(f"{name}: folder {short_repr(root)} does not exist; point it at the folder that holds "
                          f"the {data.dataset} files (torchvision's layout)")


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> TrialConfig:
    merged = deep_merge(data or {}, parse_overrides(overrides))
    try:
        return TrialConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"kkt": 1}} -> {"loss.kkt": 1}: the param names MLflow and sweeps use."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def describe_fields(model: type[BaseModel] = TrialConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field: the config documentation."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", repr(field.get_default(call_default_factory=True)),
                         field.description or ""))
    return rows
