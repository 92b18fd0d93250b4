"""Config: YAML and `section.key=value` overrides -> validated dataclasses. Each field is declared once with its
default, one-line help (--print-config) and rule (kd/config_rules.py); __post_init__ checks rules relating fields."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kd.config_checks import (  # noqa: F401 (kd.config's: optimizer_arguments, tracker_names)
    band_list,
    check_log_with,
    check_optimizer,
    check_qat,
    check_qat_depth,
    check_teacher_weights,
    layer_pairs,
    optimizer_arguments,
    plain_name,
    randaugment_text,
    teacher_list,
    tracker_names,
)
from kd.config_rules import (  # noqa: F401 (kd.config's)
    ConfigError,
    build,
    check_fields,
    flat_hparams,
    option,
    read_config,
    save_config,
    section,
    to_dict,
)
from kd.config_rules import check as _check

# the config's spellings -> Accelerate's; null leaves the choice to Accelerate
PRECISIONS = {
    None: None,
    "no": "no",
    "32": "no",
    "fp16": "fp16",
    "16-mixed": "fp16",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
}
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant")  # timm's, and warmup + constant
MAX_LOSS_WEIGHT = 1e6  # the KD weights in use are 0.1-10 (DKD's beta 8)
TEMPERATURES = (0.01, 1000.0)  # KD uses 1-20; beyond these bounds the soft loss turns non-finite in float32
MIN_STD = 1e-3  # smallest data.std: gray levels are 1/255 apart; a tinier std blows pixels up past float range
MAX_IMAGE_SIZE = 4096  # pixels a side: one 100,000 px view would be 120 GB of float32; models train at 32-1024

SEED = "in [0, 2**32), the seeds numpy accepts"
PROBABILITY = "a probability in [0, 1]"
LOSS_WEIGHT = f"in [0, {MAX_LOSS_WEIGHT:g}] (a loss weight; far larger ones overflow the float32 loss)"
MIX_ALPHA = ">= 0 (0 = off; 0.2-1 are usual)"
MAPPING = "a mapping of argument names to values, e.g. "
PRECISION_NAMES = "16-mixed, bf16-mixed, fp16, bf16, no, null"
DECAY_WHY = "(decoupled weight decay multiplies the weights by 1 - lr * wd every step)"
WARMUP_RULE = "must be >= 0 and smaller than max_epochs"


@dataclass
class DataConfig:
    SECTION: ClassVar[str] = "data"
    root: str = option(
        "data/demo", "<root>/<split>/<class>/<image>, or <root>/<class>/<image> split once into a split file"
    )
    manifest: str = option(
        "", 'CSV `path,label[,split]` (paths relative to the CSV) used instead of image folders; "" = off'
    )
    split_file: str = option(
        "", 'the saved split of a one-folder layout; "" = <root>/splits.json (beside the CSV for one)'
    )
    val_fraction: float = option(0.15, "share of each class drawn into val when a split file is made")
    test_fraction: float = option(0.15, "share of each class drawn into test when a split file is made")
    split_seed: int = option(0, "seed of that draw (an existing split file is always reused, never redrawn)", SEED)
    ms_root: str = option(
        "", 'folder mirroring root that holds each image\'s MS stack at the same relative path; "" = beside'
    )
    ms_bands: list = option([], "MS bands to use: indices, or names from bands.json; [] = all", band_list)
    ms_layout: str = option(
        "auto", "band axis of .npy stacks: auto (told apart by the image size) | hwc | chw", "auto | hwc | chw"
    )
    ms_missing: str = option(
        "error", "an image without an MS file: error | zeros (zero-filled bands, with a warning)", "error | zeros"
    )
    on_bad_file: str = option(
        "error", "bad image or MS file (unreadable, truncated, NaN, odd band count): error | skip", "error | skip"
    )
    demo: bool = option(True, "write the built-in synthetic demo set to `root` first if it is not there yet")
    demo_seed: int = option(0, "seed of the demo set (a different seed gives a different set)", SEED)
    image_size: int | None = option(
        None,
        "side of the square input in pixels; null = the model's timm pretrained size",
        f"[8, {MAX_IMAGE_SIZE}] (pixels a side)",
    )
    mean: list[float] | None = option(
        None,
        "RGB normalization mean; null = the model's timm pretrained config (ImageNet mostly)",
        "[0, 1] for every channel (pixels are read in [0, 1])",
    )
    std: list[float] | None = option(
        None, "RGB normalization std; null = the model's timm pretrained config", f">= {MIN_STD} for every channel"
    )
    num_workers: int = option(2, "DataLoader worker processes", ">= 0")
    pin_memory: bool = option(True, "page-locked batches for faster host-to-GPU copies (ignored without a CUDA GPU)")
    persistent_workers: bool = option(True, "keep DataLoader workers alive between epochs (num_workers > 0)")
    prefetch_factor: int = option(2, "batches each DataLoader worker loads ahead (num_workers > 0)", ">= 1")
    hflip: float = option(0.5, "probability of a horizontal flip (applied to RGB and MS together)", PROBABILITY)
    vflip: float = option(0.5, 'probability of a vertical flip (leaves have no "up")', PROBABILITY)
    scale_min: float = option(0.6, "smallest area fraction kept by the random resized crop", "(0, 1]")
    randaugment: str = option(
        "", 'timm RandAugment string for training, e.g. "rand-m9-n2" (kd.data.augment); "" = off', randaugment_text
    )
    unlabeled_root: str = option(
        "", "folder of unlabelled images (recursive; MS beside or under ms_root); distill.py only"
    )
    unlabeled_fraction: float | None = option(
        None,
        "share of each training batch that is unlabelled; null = the sets' own",
        "(0, 1) (each batch holds both kinds) or null (the share the two sets have)",
    )

    def __post_init__(self):
        check_fields(self)
        for key, value in (("mean", self.mean), ("std", self.std)):
            _check(value is None or len(value) == 3, f"data.{key}", "must list 3 numbers (R, G, B) or be null", value)
        fractions = (self.val_fraction, self.test_fraction)
        ok = min(fractions) >= 0 and sum(fractions) < 1
        _check(ok, "data.val_fraction + data.test_fraction", "must be non-negative and sum below 1", fractions)


@dataclass
class ModelConfig:
    SECTION: ClassVar[str] = "model"
    name: str = option("hybrid", '"hybrid" (RGB+MS HybridFusion teacher) or any timm model name (RGB only)')
    backbone: str = option("efficientnetv2_rw_s", "hybrid only: timm backbone of the RGB branch")
    ms_backbone: str = option("", 'hybrid only: timm backbone of the MS branch ("" = same as `backbone`)')
    ms_channels: int = option(5, "hybrid only: number of multispectral bands in each .npy stack", ">= 1")
    fusion: str = option(
        "concat", "hybrid only: how branch features meet: concat | add | attention", "concat | add | attention"
    )
    pretrained: str | None = option(
        None, '"imagenet" (timm weights: local cache, or the hub when online), a file, or null'
    )
    drop_rate: float = option(0.2, "dropout before the classifier", "[0, 1)")
    drop_path_rate: float = option(
        0.0, "stochastic depth: timm's drop_path_rate, the deepest block's skip chance (0.2 is usual)", "[0, 1)"
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class TrainConfig:
    SECTION: ClassVar[str] = "train"
    batch_size: int = option(64, "per-process batch size", ">= 1")
    optimizer: str = option(
        "adamw", "a timm optimizer (timm.optim.list_optimizers()): adamw, sgd, momentum, lamb, lion, …"
    )
    optimizer_args: dict = option(
        {}, "more optimizer arguments, e.g. {betas: [0.9, 0.99]}", MAPPING + "{betas: [0.9, 0.99]}"
    )
    # every LR of the schedule stays within [0, learning_rate]: beyond 1, Adam's first step overflows float32
    learning_rate: float = option(1e-3, "peak learning rate, reached after warmup", "(0, 1]")
    weight_decay: float = option(1e-4, "the optimizer's weight decay (not applied to norms and biases)", ">= 0")
    max_epochs: int = option(10, "epochs to train", ">= 1")
    warmup_epochs: int = option(0, "linear warmup, in epochs, updated every optimizer step")
    lr_scheduler: str = option(
        "cosine",
        "cosine | tanh | step | multistep | plateau | poly (timm's) | constant (warmup, then flat)",
        " | ".join(SCHEDULERS),
    )
    lr_gamma: float = option(0.1, "step/multistep/plateau: factor applied at each decay", "(0, 1] (a decay)")
    lr_step_size: int = option(
        30, "step: epochs between decays; multistep: decays at its multiples", ">= 1 (epochs between decays)"
    )
    min_lr: float = option(0.0, "floor of the cosine schedule")
    precision: str | None = option(
        None, "16-mixed/fp16, bf16-mixed/bf16, no (fp32); null = Accelerate's setting, else fp32"
    )
    accumulate_grad_batches: int = option(1, "batches per optimizer step", ">= 1")
    gradient_clip_val: float = option(1.0, "max gradient norm; 0 turns clipping off", ">= 0")
    early_stopping_patience: int = option(
        0, "epochs without improvement of `monitor` before stopping; 0 = never", ">= 0 (0 = never stop early)"
    )
    log_every_n_steps: int = option(
        50, "optimizer steps between logged scalars (TensorBoard and the other trackers)", ">= 1"
    )
    checkpoint_dir: str = option("", 'run directory; "" = runs/<name>')
    save_top_k: int = option(1, "how many best checkpoints (by `monitor`) to keep", ">= 1")
    monitor: str = option("val_acc", "val_acc | val_loss", "val_acc or val_loss")
    mode: str = option("max", "max | min: which direction of `monitor` is better", "max or min")
    min_delta: float = option(
        0.0, "early stopping: the smallest change of `monitor` that counts as an improvement", ">= 0"
    )
    lr_cycles: int = option(
        1, "cosine: number of cycles (warm restarts when > 1), each `lr_cycle_decay` times lower", ">= 1"
    )
    lr_cycle_decay: float = option(
        0.5, "cosine with restarts: peak LR factor from one cycle to the next", "(0, 1] (a decay)"
    )
    finetune_epochs: int = option(0, "last epochs at a constant, lower LR (learning_rate * finetune_lr_scale)")
    finetune_lr_scale: float = option(0.1, "LR factor of the fine-tuning phase", "(0, 1]")
    ema_decay: float = option(
        0.0, "EMA of the weights (timm ModelEmaV3), used for validation and checkpoints; 0 = off", "[0, 1)"
    )
    grad_checkpointing: bool = option(
        False, "trade compute for memory in the trained model (timm set_grad_checkpointing)"
    )
    channels_last: bool = option(
        False, "trained model and teachers in channels_last memory format (faster convolutions)"
    )
    compile: bool = option(False, "torch.compile the trained model's and the teachers' forward (not the QAT graph)")
    max_nonfinite_steps: int = option(5, "non-finite losses are skipped; this many in a row stop the run", ">= 1")
    save_every_n_steps: int = option(
        0,
        "also save the resumable state every N optimizer steps (mid-epoch); 0 = per epoch",
        ">= 0 (0 = save once per epoch)",
    )
    resume: str | None = option(
        None, '"auto": continue from <run_dir>/last when it exists (like --resume), else start', "null or auto"
    )
    log_with: str | list = option(
        "tensorboard", "Accelerate tracker(s): tensorboard, wandb, mlflow, …, a list, all, none", check_log_with
    )
    project_name: str = option(
        "kd", "trackers' project (TensorBoard: the folder <run_dir>/tb/<project_name>)", plain_name
    )
    run_name: str = option(
        "", "the run's name in wandb, mlflow, clearml, swanlab, trackio; \"\" = the run folder's name"
    )
    qat_start_fraction: float | None = option(
        None, "quantization-aware training from this fraction of max_epochs; null = off", "[0, 1)"
    )
    mixup_alpha: float = option(
        0.0, "Mixup of each training batch, lambda ~ Beta(alpha, alpha) (timm's mixup); 0 = off", MIX_ALPHA
    )
    cutmix_alpha: float = option(
        0.0, "CutMix of each training batch, box share ~ Beta(alpha, alpha) (timm's cutmix); 0 = off", MIX_ALPHA
    )
    mixup_prob: float = option(
        1.0, "probability that a batch is mixed at all (when mixup_alpha or cutmix_alpha > 0)", PROBABILITY
    )
    mixup_switch_prob: float = option(
        0.5, "with both alphas > 0: probability of CutMix rather than Mixup for a batch", PROBABILITY
    )
    label_smoothing: float = option(
        0.0, "label smoothing of the hard cross-entropy (timm's smoothing); 0 = off", "[0, 1) (0.1 is usual)"
    )

    def __post_init__(self):
        if self.precision is False:
            self.precision = "no"  # YAML 1.1 reads a bare `no` as false
        check_fields(self)
        key, lr, wd, epochs = f"{self.SECTION}.", self.learning_rate, self.weight_decay, self.max_epochs
        _check(self.precision in PRECISIONS, key + "precision", f"must be one of {PRECISION_NAMES}", self.precision)
        _check(lr * wd < 1, key + "learning_rate * weight_decay", f"must be below 1 {DECAY_WHY}", (lr, wd))
        _check(0 <= self.warmup_epochs < epochs, key + "warmup_epochs", WARMUP_RULE, self.warmup_epochs)
        _check(0 <= self.min_lr <= lr, key + "min_lr", "must be in [0, learning_rate]", self.min_lr)
        _check(
            self.finetune_epochs < epochs, key + "finetune_epochs", "must be in [0, max_epochs)", self.finetune_epochs
        )
        check_qat(self, key)
        check_optimizer(self, key)

    @property
    def mixed_precision(self) -> str | None:
        """The precision in Accelerate's spelling: fp16 | bf16 | no, or None to let Accelerate decide."""
        return PRECISIONS[self.precision]


@dataclass
class DistillationConfig(TrainConfig):
    SECTION: ClassVar[str] = "distillation"
    teacher_checkpoint: str = option("checkpoints/teacher/best.safetensors", "frozen teacher (.safetensors/.json stem)")
    teachers: list = option([], "multi-teacher: [{checkpoint: path, weight: w}, ...]", teacher_list)
    student_backbone: str = option("efficientnet_b0", "timm name of the RGB student")
    student_pretrained: str | None = option(None, '"imagenet", a weights file, or null (random init)')
    student_drop_rate: float | None = option(
        None, "the student's dropout before the classifier; null = the timm model's own (0 for EfficientNet)", "[0, 1)"
    )
    student_drop_path_rate: float = option(
        0.0, "the student's stochastic depth (timm's drop_path_rate); 0 = off, 0.2 is usual", "[0, 1)"
    )
    temperature: float = option(4.0, "softmax temperature of the soft (KL) loss", "> 0")
    alpha: float = option(0.3, "weight of the hard label loss; 1 - alpha weighs the soft loss", "within [0, 1]")
    feature_weight: float = option(0.5, "weight of the feature loss", LOSS_WEIGHT)
    feature_matching: bool = option(True, "match intermediate features of `feature_layers`")
    feature_layers: list = option([], "names shared by both models, or [student, teacher] pairs", layer_pairs)
    feature_teacher: int = option(0, "index (in `teachers`) of the teacher whose features are matched", ">= 0")
    feature_loss: str = option(
        "mse", "mse | attention | rkd: how matched features are compared (kd.distill.feature_losses)"
    )
    feature_loss_args: dict = option(
        {}, "the feature loss's keyword arguments, e.g. {p: 2} for attention", MAPPING + "{p: 2}"
    )
    final_temperature: float | None = option(
        None, "linear decay from `temperature` to this over training; null = constant", "> 0"
    )
    soft_loss: str = option(
        "kl", "kl (Hinton) | dkd (Decoupled KD, CVPR 2022) | dist (DIST, NeurIPS 2022): kd.distill.losses"
    )
    soft_loss_args: dict = option(
        {}, "the soft loss's keyword arguments, e.g. {alpha: 1.0, beta: 8.0} for dkd", MAPPING + "{beta: 2.0}"
    )
    dkd_warmup_epochs: float = option(20.0, "dkd: epochs over which the DKD term ramps up linearly from 0", ">= 0")
    ema_teacher_weight: float = option(
        0.0, "self-distillation: the student's EMA as an extra teacher with this weight", ">= 0"
    )
    ema_teacher_start_epoch: float = option(
        1.0, "the EMA teacher joins after this many epochs (it starts as noise)", ">= 0"
    )
    teacher_sanity_check: bool = option(True, "log teacher logit stats and accuracy on one val batch; warn near chance")
    teacher_cache: str = option(
        "", 'folder of cached teacher top-k logits (built by distill.py --cache-teacher); "" = online'
    )
    teacher_cache_top_k: int = option(
        10, "logits cached per (sample, epoch) view; the rest share the leftover mass evenly", ">= 1"
    )

    def __post_init__(self):
        super().__post_init__()
        low, high = TEMPERATURES
        rule = f"must be in [{low}, {high}] (the logits are divided by it and the soft loss multiplied by its square)"
        for key, value in (("temperature", self.temperature), ("final_temperature", self.final_temperature)):
            _check(value is None or low <= value <= high, f"distillation.{key}", rule, value)
        check_teacher_weights(self)
        check_qat_depth(self.qat_start_fraction, self.student_drop_path_rate, "distillation.student_drop_path_rate")


@dataclass
class Config:
    SECTION: ClassVar[str] = ""
    name: str = option("run", "run name: the run directory defaults to runs/<name>")
    seed: int = option(0, "seed for weights, augmentation and data order", SEED)
    data: DataConfig = section(DataConfig, "the images: where they are, how they are read")
    model: ModelConfig = section(ModelConfig, "what train_teacher.py trains")
    train: TrainConfig = section(TrainConfig, "how train_teacher.py trains it")
    distillation: DistillationConfig = section(DistillationConfig, "what and how distill.py trains")

    def __post_init__(self):
        check_fields(self)
        check_qat_depth(self.train.qat_start_fraction, self.model.drop_path_rate, "model.drop_path_rate")


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key=value` overrides, validate, and return a Config."""
    return build(Config, read_config(path, overrides))
