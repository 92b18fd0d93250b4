"""Config: YAML -> validated dataclasses, with `section.key=value` overrides from the command line.

Every field has a default and a one-line comment. Unknown keys and wrong types are errors that say what to do.
"""

import collections
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

from kd.data.augment import parse_randaugment
from kd.distill.losses import SOFT_LOSSES, soft_loss_arguments
from kd.errors import QUOTE_LIMIT, UserError, quote


class ConfigError(UserError):
    """The config file or a command-line override is invalid."""


PRECISIONS = {  # the config's spellings -> Accelerate's; null leaves the choice to Accelerate (kd/train/loop.py)
    None: None,
    "no": "no",
    "32": "no",
    "fp16": "fp16",
    "16-mixed": "fp16",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
}
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant")
MAX_VALUES = 10_000  # values a config may hold with YAML aliases expanded: a "billion laughs" is refused, not built
SEED_LIMIT = 2**32  # numpy seeds must lie in [0, 2**32)
MAX_LOSS_WEIGHT = 1e6  # the KD weights in use are 0.1-10 (DKD's beta 8)
TEMPERATURES = (0.01, 1000.0)  # KD uses 1-20; beyond these bounds the soft loss turns non-finite in float32
MIN_STD = 1e-3  # smallest data.std: gray levels are 1/255 apart; a tinier std blows pixels up past float range
MAX_IMAGE_SIZE = 4096  # pixels a side: one 100,000 px view would be 120 GB of float32; models train at 32-1024


@dataclass
class DataConfig:
    root: str = "data/demo"  # <root>/<split>/<class>/<image>, or <root>/<class>/<image> split once into a split file
    manifest: str = ""  # CSV `path,label[,split]` (paths relative to the CSV) used instead of image folders; "" = off
    split_file: str = ""  # the saved split of a one-folder layout; "" = <root>/splits.json (beside the CSV for one)
    val_fraction: float = 0.15  # share of each class drawn into val when a split file is made
    test_fraction: float = 0.15  # share of each class drawn into test when a split file is made
    split_seed: int = 0  # seed of that draw (an existing split file is always reused, never redrawn)
    ms_root: str = ""  # folder mirroring root that holds each image's MS stack at the same relative path; "" = beside
    ms_bands: list = field(default_factory=list)  # MS bands to use: indices, or names from bands.json; [] = all
    ms_layout: str = "auto"  # band axis of .npy stacks: auto (told apart by the image size) | hwc | chw
    ms_missing: str = "error"  # an image without an MS file: error | zeros (zero-filled bands, with a warning)
    on_bad_file: str = "error"  # bad image or MS file (unreadable, truncated, NaN, odd band count): error | skip
    demo: bool = True  # write the built-in synthetic demo set to `root` first if it is not there yet
    demo_seed: int = 0  # seed of the demo set (a different seed gives a different set)
    image_size: int | None = None  # side of the square input in pixels; null = the model's timm pretrained size
    mean: list | None = None  # RGB normalization mean; null = the model's timm pretrained config (ImageNet mostly)
    std: list | None = None  # RGB normalization std; null = the model's timm pretrained config
    num_workers: int = 2  # DataLoader worker processes
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (ignored without a CUDA GPU)
    persistent_workers: bool = True  # keep DataLoader workers alive between epochs (num_workers > 0)
    prefetch_factor: int = 2  # batches each DataLoader worker loads ahead (num_workers > 0)
    hflip: float = 0.5  # probability of a horizontal flip (applied to RGB and MS together)
    vflip: float = 0.5  # probability of a vertical flip (leaves have no "up")
    scale_min: float = 0.6  # smallest area fraction kept by the random resized crop
    randaugment: str = ""  # timm RandAugment string for training, e.g. "rand-m9-n2" (kd.data.augment); "" = off
    unlabeled_root: str = ""  # folder of unlabelled images (recursive; MS beside or under ms_root); distill.py only
    unlabeled_fraction: float | None = None  # share of each training batch that is unlabelled; null = the sets' own

    def __post_init__(self):
        _check(
            self.image_size is None or 8 <= self.image_size <= MAX_IMAGE_SIZE,
            "data.image_size",
            f"must be in [8, {MAX_IMAGE_SIZE}] (pixels a side) or null",
            self.image_size,
        )
        for key in ("mean", "std"):
            value = getattr(self, key)
            _check(value is None or len(value) == 3, f"data.{key}", "must list 3 numbers (R, G, B) or be null", value)
            if value is not None:
                setattr(self, key, [_coerce(v, float, f"data.{key}[{i}]") for i, v in enumerate(value)])
        _check(
            self.mean is None or 0 <= min(self.mean) <= max(self.mean) <= 1,
            "data.mean",
            "must be in [0, 1] for every channel (pixels are read in [0, 1])",
            self.mean,
        )
        _check(
            self.std is None or min(self.std) >= MIN_STD,
            "data.std",
            f"must be >= {MIN_STD} for every channel",
            self.std,
        )
        for i, band in enumerate(self.ms_bands):
            _check(
                isinstance(band, str) or _is_int(band),
                f"data.ms_bands[{i}]",
                "must be a band index or a band name from bands.json",
                band,
            )
        _check(0.0 < self.scale_min <= 1.0, "data.scale_min", "must be in (0, 1]", self.scale_min)
        _check(0.0 <= self.hflip <= 1.0, "data.hflip", "must be a probability in [0, 1]", self.hflip)
        _check(0.0 <= self.vflip <= 1.0, "data.vflip", "must be a probability in [0, 1]", self.vflip)
        for key in ("split_seed", "demo_seed"):
            _check_seed(getattr(self, key), f"data.{key}")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _check(
            self.val_fraction >= 0 and self.test_fraction >= 0 and self.val_fraction + self.test_fraction < 1,
            "data.val_fraction + data.test_fraction",
            "must be non-negative and sum below 1",
            (self.val_fraction, self.test_fraction),
        )
        _check(self.ms_layout in ("auto", "hwc", "chw"), "data.ms_layout", "must be auto | hwc | chw", self.ms_layout)
        _check(self.ms_missing in ("error", "zeros"), "data.ms_missing", "must be error | zeros", self.ms_missing)
        _check(self.on_bad_file in ("error", "skip"), "data.on_bad_file", "must be error | skip", self.on_bad_file)
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1", self.prefetch_factor)
        _check(
            self.unlabeled_fraction is None or 0 < self.unlabeled_fraction < 1,
            "data.unlabeled_fraction",
            "must be in (0, 1) (each batch holds both kinds) or null (the share the two sets have)",
            self.unlabeled_fraction,
        )
        try:
            parse_randaugment(self.randaugment)
        except ValueError as e:
            raise ConfigError(f"data.randaugment {quote(self.randaugment)} {e}") from None


@dataclass
class ModelConfig:
    name: str = "hybrid"  # "hybrid" (RGB+MS HybridFusion teacher) or any timm model name (RGB only)
    backbone: str = "efficientnetv2_rw_s"  # hybrid only: timm backbone of the RGB branch
    ms_backbone: str = ""  # hybrid only: timm backbone of the MS branch ("" = same as `backbone`)
    ms_channels: int = 5  # hybrid only: number of multispectral bands in each .npy stack
    fusion: str = "concat"  # hybrid only: how branch features meet: concat | add | attention
    pretrained: str | None = None  # "imagenet" (timm weights: local cache, or the hub when online), a file, or null
    drop_rate: float = 0.2  # dropout before the classifier

    def __post_init__(self):
        _check(
            self.fusion in ("concat", "add", "attention"),
            "model.fusion",
            "must be concat | add | attention",
            self.fusion,
        )
        _check(self.ms_channels >= 1, "model.ms_channels", "must be >= 1", self.ms_channels)
        _check(0.0 <= self.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)", self.drop_rate)


@dataclass
class TrainConfig:
    SECTION: ClassVar[str] = "train"  # the section it is read from, for messages
    batch_size: int = 64  # per-process batch size
    optimizer: str = "adamw"  # a timm optimizer (timm.optim.list_optimizers()): adamw, sgd, momentum, lamb, lion, …
    optimizer_args: dict = field(default_factory=dict)  # more optimizer arguments, e.g. {betas: [0.9, 0.99]}
    learning_rate: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 1e-4  # the optimizer's weight decay (not applied to norms and biases)
    max_epochs: int = 10  # epochs to train
    warmup_epochs: int = 0  # linear warmup, in epochs, updated every optimizer step
    lr_scheduler: str = "cosine"  # cosine | step | plateau | constant
    lr_gamma: float = 0.1  # step/plateau: factor applied at each decay
    lr_step_size: int = 30  # step: epochs between decays
    min_lr: float = 0.0  # floor of the cosine schedule
    precision: str | None = None  # 16-mixed/fp16, bf16-mixed/bf16, no (fp32); null = Accelerate's setting, else fp32
    accumulate_grad_batches: int = 1  # batches per optimizer step
    gradient_clip_val: float = 1.0  # max gradient norm; 0 turns clipping off
    early_stopping_patience: int = 0  # epochs without improvement of `monitor` before stopping; 0 = never
    log_every_n_steps: int = 50  # optimizer steps between logged scalars (TensorBoard and the other trackers)
    checkpoint_dir: str = ""  # run directory; "" = runs/<name>
    save_top_k: int = 1  # how many best checkpoints (by `monitor`) to keep
    monitor: str = "val_acc"  # val_acc | val_loss
    mode: str = "max"  # max | min: which direction of `monitor` is better
    min_delta: float = 0.0  # early stopping: the smallest change of `monitor` that counts as an improvement
    lr_cycles: int = 1  # cosine: number of cycles (warm restarts when > 1), each `lr_cycle_decay` times lower
    lr_cycle_decay: float = 0.5  # cosine with restarts: peak LR factor from one cycle to the next
    finetune_epochs: int = 0  # last epochs at a constant, lower LR (learning_rate * finetune_lr_scale)
    finetune_lr_scale: float = 0.1  # LR factor of the fine-tuning phase
    ema_decay: float = 0.0  # EMA of the weights (timm ModelEmaV3), used for validation and checkpoints; 0 = off
    grad_checkpointing: bool = False  # trade compute for memory in the trained model (timm set_grad_checkpointing)
    channels_last: bool = False  # trained model and teachers in channels_last memory format (faster convolutions)
    compile: bool = False  # torch.compile the trained model's and the teachers' forward (not the QAT graph)
    max_nonfinite_steps: int = 5  # non-finite losses are skipped; this many in a row stop the run
    save_every_n_steps: int = 0  # also save the resumable state every N optimizer steps (mid-epoch); 0 = per epoch
    resume: str | None = None  # "auto": continue from <run_dir>/last when it exists (like --resume), else start
    log_with: str | list = "tensorboard"  # Accelerate tracker(s): tensorboard, wandb, mlflow, …, a list, all, none
    project_name: str = "kd"  # trackers' project (TensorBoard: the folder <run_dir>/tb/<project_name>)
    run_name: str = ""  # the run's name in wandb, mlflow, clearml, swanlab, trackio; "" = the run folder's name
    qat_start_fraction: float | None = None  # quantization-aware training from this fraction of max_epochs; null = off
    mixup_alpha: float = 0.0  # Mixup of each training batch, lambda ~ Beta(alpha, alpha) (timm's mixup); 0 = off
    cutmix_alpha: float = 0.0  # CutMix of each training batch, box share ~ Beta(alpha, alpha) (timm's cutmix); 0 = off
    mixup_prob: float = 1.0  # probability that a batch is mixed at all (when mixup_alpha or cutmix_alpha > 0)
    mixup_switch_prob: float = 0.5  # with both alphas > 0: probability of CutMix rather than Mixup for a batch
    label_smoothing: float = 0.0  # label smoothing of the hard cross-entropy (timm's smoothing); 0 = off

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        # every LR of the schedule stays within [0, learning_rate]: beyond 1, Adam's first step overflows float32
        _check(0 < self.learning_rate <= 1, "learning_rate", "must be in (0, 1]", self.learning_rate)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(
            self.learning_rate * self.weight_decay < 1,
            "learning_rate * weight_decay",
            "must be below 1 (decoupled weight decay multiplies the weights by 1 - lr * wd every step)",
            (self.learning_rate, self.weight_decay),
        )
        _check(self.max_epochs >= 1, "max_epochs", "must be >= 1", self.max_epochs)
        _check(
            0 <= self.warmup_epochs < self.max_epochs or self.warmup_epochs == 0,
            "warmup_epochs",
            "must be >= 0 and smaller than max_epochs",
            self.warmup_epochs,
        )
        _check(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {SCHEDULERS}", self.lr_scheduler)
        _check(0 < self.lr_gamma <= 1, "lr_gamma", "must be in (0, 1] (a decay)", self.lr_gamma)
        _check(self.lr_step_size >= 1, "lr_step_size", "must be >= 1 (epochs between decays)", self.lr_step_size)
        _check(0 <= self.min_lr <= self.learning_rate, "min_lr", "must be in [0, learning_rate]", self.min_lr)
        _check(
            self.precision in PRECISIONS,
            "precision",
            "must be one of 16-mixed, bf16-mixed, fp16, bf16, no, null",
            self.precision,
        )
        _check(
            self.accumulate_grad_batches >= 1, "accumulate_grad_batches", "must be >= 1", self.accumulate_grad_batches
        )
        _check(self.gradient_clip_val >= 0, "gradient_clip_val", "must be >= 0", self.gradient_clip_val)
        _check(
            self.early_stopping_patience >= 0,
            "early_stopping_patience",
            "must be >= 0 (0 = never stop early)",
            self.early_stopping_patience,
        )
        _check(self.log_every_n_steps >= 1, "log_every_n_steps", "must be >= 1", self.log_every_n_steps)
        _check(self.save_top_k >= 1, "save_top_k", "must be >= 1", self.save_top_k)
        _check(self.monitor in ("val_acc", "val_loss"), "monitor", "must be val_acc or val_loss", self.monitor)
        _check(self.mode in ("max", "min"), "mode", "must be max or min", self.mode)
        _check(self.min_delta >= 0, "min_delta", "must be >= 0", self.min_delta)
        _check(self.lr_cycles >= 1, "lr_cycles", "must be >= 1", self.lr_cycles)
        _check(0 < self.lr_cycle_decay <= 1, "lr_cycle_decay", "must be in (0, 1] (a decay)", self.lr_cycle_decay)
        _check(
            0 <= self.finetune_epochs < self.max_epochs,
            "finetune_epochs",
            "must be in [0, max_epochs)",
            self.finetune_epochs,
        )
        _check(0 < self.finetune_lr_scale <= 1, "finetune_lr_scale", "must be in (0, 1]", self.finetune_lr_scale)
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1", self.max_nonfinite_steps)
        _check(
            self.save_every_n_steps >= 0,
            "save_every_n_steps",
            "must be >= 0 (0 = save once per epoch)",
            self.save_every_n_steps,
        )
        _check(self.resume in (None, "auto"), "resume", "must be null or auto", self.resume)
        _check_mixing(self)
        _check(
            self.qat_start_fraction is None or 0 <= self.qat_start_fraction < 1,
            "qat_start_fraction",
            "must be in [0, 1) or null",
            self.qat_start_fraction,
        )
        if self.qat_start_fraction is not None and self.ema_decay > 0:
            raise ConfigError(
                "qat_start_fraction and ema_decay cannot be combined: the EMA would average float "
                "weights into a fake-quantized graph. Turn one of them off."
            )
        # fp16 is not refused here: without a CUDA GPU the loop trains fp16 configs in fp32, which QAT takes
        if self.qat_start_fraction is not None and self.mixed_precision == "bf16":
            raise ConfigError(
                f"qat_start_fraction cannot train under precision {quote(self.precision)}: PyTorch's fake "
                "quantization takes float32 only (the run would crash when QAT starts). Set precision: no."
            )
        _check_optimizer(self)
        _check_log_with(self.log_with)
        _check(
            self.project_name not in ("", ".", "..") and not set("/\\") & set(self.project_name),
            "project_name",
            "must be a plain name, without / or \\ (TensorBoard makes it a folder under <run_dir>/tb)",
            self.project_name,
        )
        _check(len(self.project_name) <= 64, "project_name", "must be at most 64 characters", self.project_name)

    @property
    def mixed_precision(self) -> str | None:
        """The precision in Accelerate's spelling: fp16 | bf16 | no, or None to let Accelerate decide."""
        return PRECISIONS[self.precision]


@dataclass
class DistillationConfig(TrainConfig):
    SECTION: ClassVar[str] = "distillation"
    teacher_checkpoint: str = "checkpoints/teacher/best.safetensors"  # frozen teacher (.safetensors/.json stem)
    teachers: list = field(default_factory=list)  # multi-teacher: [{checkpoint: path, weight: w}, ...]
    student_backbone: str = "efficientnet_b0"  # timm name of the RGB student
    student_pretrained: str | None = None  # "imagenet", a weights file, or null (random init)
    temperature: float = 4.0  # softmax temperature of the soft (KL) loss
    alpha: float = 0.3  # weight of the hard label loss; 1 - alpha weighs the soft loss
    feature_weight: float = 0.5  # weight of the feature-matching MSE
    feature_matching: bool = True  # match intermediate features of `feature_layers`
    feature_layers: list = field(default_factory=list)  # names shared by both models, or [student, teacher] pairs
    feature_teacher: int = 0  # index (in `teachers`) of the teacher whose features are matched
    final_temperature: float | None = None  # linear decay from `temperature` to this over training; null = constant
    soft_loss: str = "kl"  # kl (Hinton) | dkd (Decoupled KD, CVPR 2022) | dist (DIST, NeurIPS 2022): kd.distill.losses
    soft_loss_args: dict = field(default_factory=dict)  # the soft loss's keyword arguments; win over dkd_*, dist_*
    dkd_alpha: float = 1.0  # dkd: weight of the target-class term (TCKD)
    dkd_beta: float = 8.0  # dkd: weight of the non-target-class term (NCKD)
    dkd_warmup_epochs: float = 20.0  # dkd: epochs over which the DKD term ramps up linearly from 0
    dist_beta: float = 1.0  # dist: weight of the inter-class (per-sample) correlation term
    dist_gamma: float = 1.0  # dist: weight of the intra-class (per-class, across the batch) correlation term
    ema_teacher_weight: float = 0.0  # self-distillation: the student's EMA as an extra teacher with this weight
    ema_teacher_start_epoch: float = 1.0  # the EMA teacher joins after this many epochs (it starts as noise)
    teacher_sanity_check: bool = True  # log teacher logit stats and accuracy on one val batch; warn near chance
    teacher_cache: str = ""  # folder of cached teacher top-k logits (built by distill.py --cache-teacher); "" = online
    teacher_cache_top_k: int = 10  # logits cached per (sample, epoch) view; the rest share the leftover mass evenly

    def __post_init__(self):
        super().__post_init__()
        _check(self.temperature > 0, "distillation.temperature", "must be > 0", self.temperature)
        for key in ("temperature", "final_temperature"):
            value = getattr(self, key)
            _check(
                value is None or value <= 0 or TEMPERATURES[0] <= value <= TEMPERATURES[1],
                f"distillation.{key}",
                f"must be in [{TEMPERATURES[0]}, {TEMPERATURES[1]}] (the logits are divided by it and the soft loss "
                "multiplied by its square)",
                value,
            )
        _check(0.0 <= self.alpha <= 1.0, "distillation.alpha", "must be within [0, 1]", self.alpha)
        for key in ("feature_weight", "dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma"):
            value = getattr(self, key)
            rule = f"must be in [0, {MAX_LOSS_WEIGHT:g}] (a loss weight; far larger ones overflow the float32 loss)"
            _check(0 <= value <= MAX_LOSS_WEIGHT, f"distillation.{key}", rule, value)
        _check(
            self.soft_loss in SOFT_LOSSES,
            "distillation.soft_loss",
            f"must be {' | '.join(SOFT_LOSSES)}",
            self.soft_loss,
        )
        _check(
            isinstance(self.soft_loss_args, dict),
            "distillation.soft_loss_args",
            "must be a mapping of argument names to values, e.g. {beta: 2.0}",
            self.soft_loss_args,
        )
        arguments = soft_loss_arguments(self.soft_loss)
        for name, value in self.soft_loss_args.items():
            if name not in arguments:
                raise ConfigError(
                    f"distillation.soft_loss_args: soft loss {self.soft_loss} has no argument {quote(name)}; "
                    f"its arguments: {', '.join(arguments) or 'none'}"
                )
            self.soft_loss_args[name] = _coerce(
                value, arguments[name].annotation, f"distillation.soft_loss_args.{name}"
            )
        _check(
            self.final_temperature is None or self.final_temperature > 0,
            "distillation.final_temperature",
            "must be > 0 or null",
            self.final_temperature,
        )
        _check(self.feature_teacher >= 0, "distillation.feature_teacher", "must be >= 0", self.feature_teacher)
        for key in ("dkd_warmup_epochs", "ema_teacher_start_epoch"):
            _check(getattr(self, key) >= 0, f"distillation.{key}", "must be >= 0", getattr(self, key))
        _check(self.ema_teacher_weight >= 0, "distillation.ema_teacher_weight", "must be >= 0", self.ema_teacher_weight)
        if self.ema_teacher_weight > 0 and self.ema_decay == 0:
            raise ConfigError(
                "distillation.ema_teacher_weight > 0 needs an EMA: set distillation.ema_decay, e.g. 0.999"
            )
        _check(
            self.teacher_cache_top_k >= 1, "distillation.teacher_cache_top_k", "must be >= 1", self.teacher_cache_top_k
        )
        for i, entry in enumerate(self.feature_layers):
            _check(
                isinstance(entry, str)
                or (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(e, str) for e in entry)),
                f"distillation.feature_layers[{i}]",
                "must be a layer name or a [student, teacher] pair of names",
                entry,
            )
        pairs = [(e, e) if isinstance(e, str) else tuple(e) for e in self.feature_layers]
        for side, names in (("student", [s for s, _ in pairs]), ("teacher", [t for _, t in pairs])):
            twice = sorted(name for name, count in collections.Counter(names).items() if count > 1)
            _check(not twice, "distillation.feature_layers", f"must name each {side} layer once", twice)
        for i, t in enumerate(self.teachers):
            where = f"distillation.teachers[{i}]"
            if not (isinstance(t, dict) and "checkpoint" in t and set(t) <= {"checkpoint", "weight"}):
                raise ConfigError(f"{where} must look like {{checkpoint: path, weight: 1.0}}, got {quote(t)}")
            t["checkpoint"] = _coerce(t["checkpoint"], str, f"{where}.checkpoint")
            if "weight" in t:
                t["weight"] = _coerce(t["weight"], float, f"{where}.weight")
                _check(t["weight"] > 0, f"{where}.weight", "must be > 0", t["weight"])
        _check_teacher_weights(self)


@dataclass
class Config:
    name: str = "run"  # run name: the run directory defaults to runs/<name>
    seed: int = 0  # seed for weights, augmentation and data order
    data: DataConfig = field(default_factory=DataConfig)  # the images: where they are, how they are read
    model: ModelConfig = field(default_factory=ModelConfig)  # what train_teacher.py trains
    train: TrainConfig = field(default_factory=TrainConfig)  # how train_teacher.py trains it
    distillation: DistillationConfig = field(default_factory=DistillationConfig)  # what and how distill.py trains

    def __post_init__(self):
        _check_seed(self.seed, "seed")


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {quote(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true/false are ints to Python


def _check_seed(seed: int, key: str) -> None:
    _check(0 <= seed < SEED_LIMIT, key, "must be in [0, 2**32), the seeds numpy accepts", seed)


def _check_teacher_weights(d: "DistillationConfig") -> None:
    """The ensemble's weights, normalized as kd.distill.teachers does (the EMA teacher's among them when it joins), are
    finite and sum to one: 1e308 + 1e308 overflows the sum to inf and every normalized weight to 0."""
    weights, keys = [t.get("weight", 1.0) for t in d.teachers] or [1.0], "distillation.teachers[*].weight"
    if d.ema_teacher_weight > 0:
        weights, keys = [*weights, d.ema_teacher_weight], f"{keys} and distillation.ema_teacher_weight"
    total = sum(weights)
    normalized = [w / total for w in weights] if math.isfinite(total) and total > 0 else [math.nan]
    _check(
        all(math.isfinite(w) for w in normalized) and abs(sum(normalized) - 1) <= 1e-6,
        keys,
        "must normalize to finite weights that sum to 1 (their sum overflows or vanishes): use weights like 1 or 0.5",
        weights,
    )


def _check_mixing(cfg: "TrainConfig") -> None:
    """Mixup / CutMix (kd/data/mixing.py) and label smoothing."""
    for key in ("mixup_alpha", "cutmix_alpha"):
        _check(getattr(cfg, key) >= 0, key, "must be >= 0 (0 = off; 0.2-1 are usual)", getattr(cfg, key))
    for key in ("mixup_prob", "mixup_switch_prob"):
        _check(0 <= getattr(cfg, key) <= 1, key, "must be a probability in [0, 1]", getattr(cfg, key))
    _check(0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1) (0.1 is usual)", cfg.label_smoothing)


def _did_you_mean(value: str, choices: list[str], n: int = 1) -> str:
    close = [repr(c) for c in difflib.get_close_matches(value[:QUOTE_LIMIT], choices, n=n)]
    if not close:
        return ""
    return f" Did you mean {' or '.join([', '.join(close[:-1]), close[-1]] if len(close) > 1 else close)}?"


def tracker_names(log_with: str | list) -> list[str]:
    """`log_with` as a list of Accelerate tracker names: [] for "none", ["all"] for every installed tracker."""
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    return [name for name in names if name != "none"]


def _check_log_with(log_with: Any) -> None:
    """Names only: whether each tracker's package is installed is checked when a run starts (kd/train/loop.py), so a
    config naming wandb still loads where evaluate.py reads it."""
    _check(
        isinstance(log_with, str) or (isinstance(log_with, list) and all(isinstance(n, str) for n in log_with)),
        "log_with",
        "must be a tracker name or a list of them, e.g. [tensorboard, wandb]",
        log_with,
    )
    names = [log_with] if isinstance(log_with, str) else log_with
    known = [*LOGGER_TYPE_TO_CLASS]  # Accelerate's trackers (and any registered with register_tracker_class)
    for name in names:
        if name not in (*known, "all", "none"):
            raise ConfigError(
                f"log_with: Accelerate has no tracker {quote(name)}.{_did_you_mean(name, [*known, 'all', 'none'])} "
                f"Its trackers: {', '.join(known)}; or all (every installed one), none"
            )
    _check("none" not in names or len(names) == 1, "log_with", "cannot list none beside trackers", log_with)


@functools.cache
def optimizer_names() -> tuple[str, ...]:
    return tuple(list_optimizers())


def optimizer_arguments(cfg: "TrainConfig") -> dict:
    """`optimizer_args` as the optimizer takes them: YAML has no tuples, so lists (betas) become tuples."""
    return {key: tuple(v) if isinstance(v, list) else v for key, v in cfg.optimizer_args.items()}


def _optimizer_argument(value: Any, parameter: inspect.Parameter, key: str) -> Any:
    """`value` as the optimizer's parameter takes it, judged by its default: few optimizers annotate their types,
    and some default a float argument to an int 0."""
    default, hint = parameter.default, parameter.annotation
    if value is None and (default is None or type(None) in typing.get_args(hint)):
        return None
    if isinstance(default, bool):
        return _coerce(value, bool, key)
    if isinstance(default, (int, float)):
        return _coerce(value, int if hint is int else float, key)
    if isinstance(default, tuple):  # betas
        _check(
            isinstance(value, (list, tuple)) and len(value) == len(default),
            key,
            f"must list {len(default)} numbers, like its default {list(default)}",
            value,
        )
        return [_coerce(v, float, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _check_optimizer(cfg: "TrainConfig") -> None:
    """The optimizer exists in timm, trains with the loop's first-order backward, and takes `optimizer_args`; the
    arguments are tried on a throwaway parameter, so a value the optimizer refuses fails here, not after loading."""
    name, args = cfg.optimizer, cfg.optimizer_args
    if name not in optimizer_names():
        raise ConfigError(
            f"optimizer: timm has no optimizer {quote(name)}.{_did_you_mean(name, list(optimizer_names()), n=5)} "
            "All of them: python -c 'import timm.optim; print(timm.optim.list_optimizers())'"
        )
    info = get_optimizer_info(name)
    if info.second_order:
        raise ConfigError(
            f"optimizer: {name} needs a second-order backward (create_graph=True), which the training loop does "
            "not run; choose a first-order optimizer such as adamw, sgd or lamb"
        )
    _check(
        isinstance(args, dict),
        "optimizer_args",
        "must be a mapping of argument names to values, e.g. {betas: [0.9, 0.99]}",
        args,
    )
    for key, instead in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
        if key in args:
            raise ConfigError(
                f"optimizer_args.{key}: set {instead} instead (the LR schedule and no-decay groups use it)"
            )
    if isinstance(info.opt_class, str):  # bitsandbytes and apex optimizers: imported (and CUDA needed) at the start
        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"optimizer: {name} comes from the {package} package, which is not installed: install it (it needs "
                "a CUDA GPU) or choose another optimizer"
            )
        return
    parameters = inspect.signature(info.opt_class).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    arguments = [p for p in parameters if p not in ("self", "params", "lr", "weight_decay")]
    for key, value in args.items():
        if key not in arguments and not takes_any:
            raise ConfigError(
                f"optimizer_args: {name} ({info.opt_class.__name__}) takes no argument {quote(key)}."
                f"{_did_you_mean(str(key), arguments)} Its arguments: {', '.join(arguments)}"
            )
        if key in parameters:
            args[key] = _optimizer_argument(value, parameters[key], f"optimizer_args.{key}")
    try:
        create_optimizer_v2(
            [torch.zeros(2, 2, requires_grad=True)],
            name,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            **optimizer_arguments(cfg),
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"optimizer_args: {name} refuses {quote(args)}: {e}") from None


def _too_many_values(value: Any, limit: int = MAX_VALUES) -> bool:
    """Whether `value` holds more than `limit` values once YAML aliases are expanded; stops counting at the limit.

    A YAML alias is a reference, so a 400-byte document of nested aliases loads in a blink but is billions of
    values to anything that walks it (a repr in an error message, a copy); a self-referencing one never ends.
    """
    pending, count = [value], 0
    while pending:
        node = pending.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return False


def _load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with what a YAML parser lets through that would be a traceback or a memory bomb refused.

    Raises yaml.YAMLError for text that is not YAML; ConfigError (naming `where`) for everything else.
    """
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where} nests lists or mappings too deeply to read") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError(f"{where} holds a value Python cannot read: {e}") from None
    if _too_many_values(value):
        raise ConfigError(
            f"{where} expands to more than {MAX_VALUES} values (nested YAML anchors and aliases?); "
            "a config needs far fewer: write the values out"
        )
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint; accept ints for floats and numeric strings like '3e-4' for floats.

    Floats must be finite, ints fit in 64 bits, strings hold no NUL character.
    """
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    optional = is_union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
            except OverflowError:
                number = math.inf  # an int beyond the float range
            except ValueError:
                pass
        if number is not None:
            # once here for every float key, so no range check below has to think of nan (which fails every
            # comparison) or inf (which passes every lower bound): both would only fail mid-training
            _check(math.isfinite(number), key, "must be a finite number", value)
            return number
    elif hint is int:
        if _is_int(value):
            _check(-(2**63) <= value < 2**63, key, "must fit in 64 bits (torch and numpy take no larger)", value)
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value)
            _check("\0" not in text, key, "must not contain a NUL character (paths and names cannot)", value)
            return text
    elif hint is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(
        f"{key} must be {'null or ' if optional else ''}{name}, got {quote(value)} ({type(value).__name__})"
    )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix[:-1] or 'the config'} must be a mapping of keys to values, got {quote(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key)[:QUOTE_LIMIT], names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown config key {quote(where)}.{hint}")
        if key == "precision" and value is False:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value if value is not None else {}, where + ".")
        else:
            kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if str(e).startswith(prefix):
            raise
        raise ConfigError(f"{prefix}{e}") from None  # train and distillation share TrainConfig's checks: say which


def parse_override(text: str) -> tuple[list[str], Any]:
    """'distillation.alpha=0.5' -> (['distillation', 'alpha'], 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} must look like section.key=value, e.g. train.max_epochs=3")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), _load_yaml(value, f"override {quote(text)}") if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {quote(text)}: the value is not valid YAML ({getattr(e, 'problem', e)}); put text in quotes"
        ) from None


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key=value` overrides, validate, and return a Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist (configs live in configs/, e.g. configs/b0.yaml)")
        if path.is_dir():  # anything else that reads, a pipe such as --config <(...) included, is read once
            raise ConfigError(f"config file {path} is a folder; pass a YAML file, e.g. configs/b0.yaml")
        try:
            raw = _load_yaml(path.read_text(), str(path)) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping of sections to keys (data:, train:, ...), got {quote(raw)}")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:  # an absent or empty section
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {quote(text)}: {quote(k)} is a value, not a section")
            node = node[k]
        node[keys[-1]] = value
    return _build(Config, raw, "")


def flat_hparams(config: Config) -> dict:
    """The config flattened to {"section/key": scalar} for TensorBoard's hparams view."""
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            name = f"{section}/{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def to_dict(config: Config) -> dict:
    """The resolved config as plain data, ready for YAML (saved beside every run)."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
