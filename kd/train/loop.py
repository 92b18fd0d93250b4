"""The one training loop, shared by train_teacher.py and distill.py, on Hugging Face Accelerate.

`fit` trains any TrainingTask (kd/train/task.py) and calls nothing else on it: the loop never needs to know whether
it is distilling. Resumable state lives in kd/train/state.py, quantization-aware training in kd/deploy/qat.py (one
QatPhase object).
"""

import contextlib
import dataclasses
import itertools
import math
import os
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import accelerate.tracking
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from kd.config import (
    Config,
    ConfigError,
    DistillationConfig,
    TrainConfig,
    optimizer_arguments,
    save_config,
    tracker_names,
)
from kd.deploy.qat import QatPhase
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, save_checkpoint
from kd.models.zoo import forward_batch
from kd.train.state import (
    CHECKPOINT_STEM,
    explain_interrupt,
    explain_lost_peers,
    find_state,
    load_state,
    new_progress,
    save_state,
)
from kd.train.task import TrainingTask


class NonFiniteLoss(UserError, FloatingPointError):
    """Too many non-finite losses in a row: a diverging run, bad data or a bad teacher; the message says what to try."""


ACCELERATE_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` passes on from its flag or config
PIP_PACKAGES = {"comet_ml": "comet-ml"}  # trackers whose pip package is spelled otherwise
RUN_NAME_ARGUMENT = {  # the init argument each tracker takes a run's name as (they all get project_name as such)
    "wandb": "name",
    "mlflow": "run_name",
    "clearml": "task_name",
    "swanlab": "experiment_name",
    "trackio": "name",
}


def section(cfg: TrainConfig) -> str:
    """The config section `cfg` was read from, for messages."""
    return "distillation" if isinstance(cfg, DistillationConfig) else "train"


def choose_precision(cfg: TrainConfig, cpu: bool = False) -> tuple[str | None, str | None]:
    """The mixed_precision to hand Accelerator, and a line to print when the config and Accelerate disagree.

    A precision set in the config (file or override) wins: it was chosen for this run, and a shared `accelerate
    config` should not silently change it. null hands the choice to Accelerate: `accelerate launch
    --mixed_precision` or `accelerate config` (passed on as ACCELERATE_MIXED_PRECISION), else fp32.
    """
    ours = cfg.mixed_precision
    theirs = os.environ.get(ACCELERATE_PRECISION, "").strip().lower() or None
    note = None
    if ours is not None and theirs is not None and ours != theirs:
        key = f"{section(cfg)}.precision"
        note = (
            f"precision: {key}={cfg.precision} ({ours}) wins over Accelerate's mixed_precision {theirs} "
            f"(accelerate launch / accelerate config); set {key}=null to use Accelerate's"
        )
    chosen = ours or theirs
    if chosen == "fp16" and (cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()):
        source = "precision fp16 (16-mixed)" if ours else "Accelerate's mixed_precision fp16"
        warnings.warn(
            f"{source} needs a CUDA GPU; training in fp32 on this CPU. "
            "Set precision=bf16-mixed for CPU autocast, or precision=no to silence this.",
            stacklevel=3,
        )
        return "no", note
    return ours, note


def check_trackers(cfg: TrainConfig) -> list[str] | None:
    """`log_with` as Accelerator takes it. A named tracker that is not installed is an error now: Accelerate would
    leave it out with a debug message, and the run would log nothing. "all" is every installed one."""
    names = tracker_names(cfg.log_with)
    installed = sorted(str(t) for t in accelerate.tracking.get_available_trackers())
    missing = [name for name in names if name != "all" and name not in installed]
    if missing:
        raise ConfigError(
            f"{section(cfg)}.log_with names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "not installed: "
            f"pip install {' '.join(PIP_PACKAGES.get(name, name) for name in missing)}, or leave it out of log_with "
            f"(installed trackers: {', '.join(installed) or 'none'})"
        )
    return names or None


def make_accelerator(cfg: TrainConfig, run_dir: Path, seed: int = 0, cpu: bool = False) -> Accelerator:
    """Accelerator with the config's precision, accumulation and trackers; TensorBoard logs go to <run_dir>/tb."""
    precision, note = choose_precision(cfg, cpu)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.accumulate_grad_batches,
        log_with=check_trackers(cfg),
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        # a per-epoch seeded shuffle makes "skip the first N batches" land on the same samples after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        # a crashed rank ends the others after this long instead of leaving them hanging forever
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=30))],
    )
    if note:
        accelerator.print(note)
    check_sharding(accelerator, cfg)
    return accelerator


def check_sharding(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Refuse, before anything trains, the FSDP setups kd does not run: FSDP that Accelerate would quietly run as
    something else, FSDP1, and the features that need the whole model on every process (EMA, QAT). Also turns off
    Accelerate's cpu_ram_efficient_loading (see below)."""
    kind = accelerator.distributed_type
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        raise UserError(
            f"FSDP was asked for (accelerate launch --use_fsdp, or an `accelerate config` with FSDP), but Accelerate "
            f"runs this as {kind.value} on {accelerator.num_processes} process(es): it shards on GPUs only, and runs "
            "--use_fsdp on a CPU as unsharded DDP. Launch on GPUs, or drop --use_fsdp (two CPU processes: "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...)"
        )
    if kind != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise UserError(
            "kd runs FSDP2 (torch's fully_shard) only: set fsdp_version: 2 in the accelerate config, or launch with "
            "`accelerate launch --use_fsdp --fsdp_version 2`"
        )
    key = section(cfg)
    if cfg.ema_decay > 0:
        raise UserError(
            f"{key}.ema_decay > 0 cannot run under FSDP: timm's EMA is a full copy of the model on every process, "
            f"outside the sharding. Set {key}.ema_decay=0, or train with DDP (launch without --use_fsdp)"
        )
    if cfg.qat_start_fraction is not None:
        raise UserError(
            f"{key}.qat_start_fraction cannot run under FSDP: the QAT graph is traced from the whole float model, "
            f"which FSDP has sharded. Set {key}.qat_start_fraction=null, or train with DDP (launch without --use_fsdp)"
        )
    # On by default with `accelerate launch --use_fsdp`: rank 0's weights are loaded into the others' empty model,
    # which Accelerate 1.15 does for parameters only and fails on BatchNorm statistics (buffers). kd builds the model
    # on every process, and `fit` broadcasts rank 0's weights before sharding them instead.
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False


def start_trackers(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path, hparams: dict | None = None) -> None:
    """Start the trackers under `project_name`, the run named `run_name` (or after its folder) where they take one."""
    run_name = cfg.run_name or Path(run_dir).resolve().name
    init_kwargs = {tracker: {argument: run_name} for tracker, argument in RUN_NAME_ARGUMENT.items()}
    accelerator.init_trackers(cfg.project_name, config=hparams or {}, init_kwargs=init_kwargs)


def build_optimizer(task: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer `cfg.optimizer` with `optimizer_args` (checked when the config loaded), in two parameter
    groups: no weight decay on norms and biases."""
    try:
        return create_optimizer_v2(
            task, cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **optimizer_arguments(cfg)
        )
    except (AssertionError, ImportError) as e:  # bitsandbytes and apex optimizers: their package and a CUDA GPU
        raise UserError(f"{section(cfg)}.optimizer {cfg.optimizer} cannot run here: {e}") from None


class LRSchedule:
    """timm's schedule until the fine-tune phase, then its constant LR (learning_rate × finetune_lr_scale) for the
    last finetune_epochs; saved and loaded as timm's scheduler state."""

    def __init__(self, scheduler, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.scheduler, self.optimizer = scheduler, optimizer
        self.finetune_epoch = cfg.max_epochs - cfg.finetune_epochs
        self.finetune_lr = cfg.learning_rate * cfg.finetune_lr_scale
        self.finetuning = False

    def set_epoch(self, epoch: int) -> None:
        """Before each epoch's first step: from the fine-tune phase's first epoch on, the LR holds still."""
        self.finetuning = epoch >= self.finetune_epoch
        if self.finetuning:
            for group in self.optimizer.param_groups:
                group["lr"] = self.finetune_lr

    def step_update(self, num_updates: int) -> None:
        """After each optimizer update."""
        if not self.finetuning:
            self.scheduler.step_update(num_updates)

    def step(self, epoch: int, metric: float) -> None:
        """After each epoch's validation (the plateau schedule steps on it)."""
        if not self.finetuning:
            self.scheduler.step(epoch, metric)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int) -> LRSchedule:
    """timm's scheduler: linear warmup, then cosine (with optional restarts) / step / plateau / constant.

    Everything but plateau is stepped every optimizer update; plateau needs the validation metric, so it steps
    per epoch. The schedule spans max_epochs - finetune_epochs; LRSchedule holds a constant LR after that.
    """
    per_epoch = cfg.lr_scheduler == "plateau"
    unit = 1 if per_epoch else updates_per_epoch
    main_epochs = cfg.max_epochs - cfg.finetune_epochs
    cycle = max(1, round((main_epochs - cfg.warmup_epochs) * unit / cfg.lr_cycles))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.lr_scheduler,
        num_epochs=cycle,
        decay_epochs=cfg.lr_step_size * unit,
        decay_rate=cfg.lr_gamma,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.learning_rate * 1e-3,
        warmup_epochs=cfg.warmup_epochs * unit,
        warmup_prefix=True,
        cycle_limit=cfg.lr_cycles,
        cycle_decay=cfg.lr_cycle_decay,
        plateau_mode=cfg.mode,
        patience_epochs=max(1, cfg.lr_step_size // 10),
        step_on_epochs=per_epoch,
        updates_per_epoch=1,
    )
    return LRSchedule(scheduler, optimizer, cfg)


def prepare_model(task: TrainingTask, cfg: TrainConfig, fsdp: bool = False) -> None:
    """The memory and speed options of the trained model, set before the optimizer and Accelerate see it. Under
    FSDP the weights stay contiguous: FSDP2 shards nothing else (torch 2.14 raises on channels_last weights)."""
    if cfg.grad_checkpointing:
        if not hasattr(task.model, "set_grad_checkpointing"):
            raise UserError(f"grad_checkpointing: {type(task.model).__name__} has no set_grad_checkpointing")
        task.model.set_grad_checkpointing(True)
    if cfg.channels_last and not fsdp:  # 4-D weights NHWC: oneDNN and tensor-core convolutions skip a conversion
        task.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the module, its state dict and checkpoints stay as they are
        task.model.compile()


class NonFiniteGuard:
    """Skips a step whose loss is non-finite on any process (all together, or DDP hangs); `limit` such steps in a
    row stop the run, and so does an epoch in which every step was skipped."""

    def __init__(self, accelerator: Accelerator, limit: int):
        self.accelerator, self.limit = accelerator, limit
        self.in_a_row, self.taken = 0, 0

    def skip(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> bool:
        finite = torch.isfinite(terms["loss"].detach()).float()
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, "min")
        if finite.item():
            self.in_a_row, self.taken = 0, self.taken + 1
            return False
        self.in_a_row += 1
        values = {k: round(v.item(), 4) for k, v in terms.items() if k != "logits"}
        message = f"non-finite loss at epoch {epoch} step {step}: {values}"
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"{message}; {self.in_a_row} such steps in a row, stopping. Lower learning_rate, "
                "enable gradient_clip_val, or check the data and the teacher."
            )
        warnings.warn(f"{message}; step skipped ({self.in_a_row} in a row)", stacklevel=1)
        return True

    def end_epoch(self, epoch: int, steps: int) -> None:
        """After an epoch of `steps` steps: one that learned nothing fails the run before anything is saved."""
        if self.taken == 0 and steps > 0:
            raise UserError(
                f"every training step of epoch {epoch} had a non-finite loss and was skipped, so the model did not "
                "train; nothing was saved for this epoch. Check the data for NaN/inf values and the teacher, or "
                "lower learning_rate."
            )
        self.taken = 0


@contextlib.contextmanager
def whole_weights(wrapped: torch.nn.Module | None) -> Iterator[None]:
    """Within the block, the modules of `wrapped` hold their whole parameters. FSDP2 (fully_shard) gathers a
    sharded module's parameters only around a call of that module, and validation calls the task's model, a
    submodule; without FSDP the weights are whole anyway and this does nothing."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in wrapped.modules() if isinstance(m, FSDPModule)] if wrapped is not None else []
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


@torch.no_grad()
def validate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    qat: QatPhase,
    wrapped: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Exact top-1 accuracy and CE loss over the whole split, across all processes (no duplicated samples), of the
    model every checkpoint of the epoch stores: rank 0's BatchNorm statistics, a QAT graph's trained ranges.
    `wrapped`: what Accelerate prepared, when it may hold `model` sharded (FSDP)."""
    sync_buffers(accelerator, model)
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    with qat.validating(model), whole_weights(wrapped):
        for batch in loader:
            with accelerator.autocast():
                logits = forward_batch(model, batch)
            logits, labels = accelerator.gather_for_metrics((logits.float(), batch["label"]))
            correct += (logits.argmax(1) == labels).sum().item()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
    return {"val_acc": correct / count, "val_loss": loss_sum / count}


class TopK:
    """Keeps the k best checkpoints on the monitored metric; the best is also written as best.safetensors."""

    def __init__(self, run_dir: Path, k: int, mode: str, entries: list | None = None):
        self.run_dir, self.k, self.sign = run_dir, k, 1.0 if mode == "max" else -1.0
        self.entries = entries or []  # [score, stem name], best first

    @property
    def best(self) -> float | None:
        return self.entries[0][0] if self.entries else None

    def is_better(self, score: float, than: float | None, min_delta: float = 0.0) -> bool:
        return than is None or self.sign * (score - than) > min_delta

    def update(
        self,
        score: float,
        epoch: int,
        model: torch.nn.Module | dict[str, torch.Tensor],
        meta: CheckpointMeta,
        write: bool = True,
        extra: dict | None = None,
    ) -> None:
        """Save `model` (a module or its whole state dict) if `score` makes the top k (every process keeps the list;
        only the one with `write` saves)."""
        if len(self.entries) >= self.k and not self.is_better(score, self.entries[-1][0]):
            return
        stem = f"epoch{epoch:03d}"
        new_best = self.is_better(score, self.best)
        self.entries.append([score, stem])
        self.entries.sort(key=lambda e: -self.sign * e[0])
        dropped, self.entries = self.entries[self.k :], self.entries[: self.k]
        if not write:
            return
        save_checkpoint(self.run_dir / stem, model, meta, extra)
        if new_best:
            save_checkpoint(self.run_dir / "best", model, meta, extra)
        for _, old in dropped:
            if not CHECKPOINT_STEM.fullmatch(old):  # never a path from elsewhere (check_state refuses those first)
                continue
            for suffix in (".safetensors", ".json"):
                (self.run_dir / old).with_suffix(suffix).unlink(missing_ok=True)


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics: DDP lets them drift apart within a step, and the
    checkpoint (written by rank 0) must be the model that validation measured."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def shard_of(parameter: torch.Tensor) -> int:
    """Which piece of `parameter` this process holds: 0 for a whole tensor (DDP: every process holds the same);
    for an FSDP2 DTensor, a number for its coordinates on the mesh dimensions it is sharded over, so that two
    processes with the same number hold replicas of one shard (HSDP) and different numbers different shards."""
    from torch.distributed.tensor import DTensor

    if not isinstance(parameter, DTensor):
        return 0
    mesh, piece = parameter.device_mesh, 0
    for dim, placement in enumerate(parameter.placements):
        if placement.is_shard():
            piece = piece * mesh.size(dim) + mesh.get_coordinate()[dim]
    return piece


def check_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """A checksum of the weights, compared across processes: unsynced DDP ranks are an error, not a surprise.
    Shard-aware under FSDP (see `weight_check`). Returns the checksum."""
    return weight_check(accelerator, model)[0]


def weight_check(accelerator: Accelerator, model: torch.nn.Module) -> tuple[float, str]:
    """(checksum of the whole model, a line saying what was compared); an error when weights are non-finite or
    processes that should hold the same values do not.

    Under DDP every process holds every parameter, and all must agree. Under FSDP each process holds a shard of
    each parameter: only processes holding the same shard (replicas, as HSDP keeps them) are compared; with plain
    full sharding no two processes hold the same shard, so there is nothing to compare, and the line says so. The
    checksum is the whole model's either way (each shard counted once).
    """
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for p in parameters]
    sums = torch.stack([t.detach().double().abs().sum() for t in local]) if local else torch.zeros(0).double()
    pieces = torch.tensor([shard_of(p) for p in parameters], dtype=torch.float64, device=sums.device)
    mine = torch.stack([sums, pieces]).unsqueeze(0).to(accelerator.device)
    everyone = accelerator.gather(mine).cpu() if accelerator.num_processes > 1 else mine.cpu()
    sums, pieces = everyone[:, 0], everyone[:, 1].long()  # [process, parameter]
    checksum, differ, compared, alone = torch.zeros((), dtype=torch.float64), [], 0, 0
    for j in range(len(parameters)):
        for piece in pieces[:, j].unique():
            replicas = sums[pieces[:, j] == piece, j]
            checksum += replicas[0]
            if len(replicas) == 1:
                alone += 1
            elif torch.allclose(replicas, replicas[0].expand_as(replicas), rtol=1e-9, atol=0):
                compared += 1
            else:
                differ.append(j)
    if not torch.isfinite(checksum):
        raise UserError(
            "the weights became non-finite (NaN/inf) during training: lower learning_rate, enable "
            "gradient_clip_val, or check the data and the teacher"
        )
    n = accelerator.num_processes
    if differ:
        names = [name for name, _ in model.named_parameters()]
        raise RuntimeError(
            f"weights differ across the {n} processes, in {len(differ)} parameter(s) that they should hold alike, "
            f"e.g. {names[differ[0]]}: {sums[:, differ[0]].tolist()}"
        )
    if not any(isinstance(p, DTensor) for p in parameters):
        return float(checksum), f"weights in sync across {n} process(es) (checksum {float(checksum):.6e})"
    line = (
        f"weights sharded (FSDP) across {n} process(es): {compared} shard(s) held by several processes are in "
        f"sync, {alone} held by one process only (nothing to compare); whole-model checksum {float(checksum):.6e}"
    )
    return float(checksum), line


def progress_bar(accelerator: Accelerator) -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )


def fit(
    accelerator: Accelerator,
    task: TrainingTask,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    run_dir: Path,
    meta: CheckpointMeta,
    hparams: dict | None = None,
    resume: bool = False,
    config: Config | None = None,
) -> dict:
    """Train `task`: AMP, accumulation, clipping, schedules, EMA, QAT, validation, top-k, resume, early stopping.

    `config`, the run's whole config, is saved as <run_dir>/config.yaml once the state to continue (if any) has
    loaded: a refused resume leaves the folder as it was, the config the state was made with included.
    """
    float_model = task.model  # what checkpoints store, also during QAT (the QAT graph shares its weights)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    prepare_model(task, cfg, fsdp)
    optimizer = build_optimizer(task, cfg)
    if fsdp:  # as DDP does: all start from rank 0's weights
        for tensor in itertools.chain(task.parameters(), task.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
    # wrapped: the task as Accelerate runs it (DDP with several processes); hooks are called on `task` itself
    wrapped, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.accumulate_grad_batches)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    ema = ModelEmaV3(float_model, decay=cfg.ema_decay, device=accelerator.device) if cfg.ema_decay > 0 else None
    if ema is not None:
        task.set_ema(ema.module)
    sharded = " (FSDP: the model sharded across them)" if fsdp else ""
    accelerator.print(
        f"training on {accelerator.num_processes} process(es){sharded}, device {accelerator.device}, "
        f"precision {accelerator.mixed_precision}, {updates_per_epoch} optimizer steps per epoch"
    )
    accelerator.print(  # the speed options, each switchable in the config (README's Performance section)
        f"speed options: precision {accelerator.mixed_precision}, channels_last "
        f"{('off (FSDP shards contiguous weights only)' if fsdp else 'on') if cfg.channels_last else 'off'}"
        f", compile {'on' if cfg.compile else 'off'}, teacher cache {getattr(cfg, 'teacher_cache', '') or 'off'}"
    )
    qat = QatPhase(cfg, task, val_loader, accelerator.mixed_precision, accelerator.print)

    progress = find_state(accelerator, run_dir, cfg, resume)
    if progress is None:
        progress = new_progress(cfg)
    else:
        qat.resume(progress)  # a state saved inside the QAT phase is the QAT graph's
        load_state(accelerator, run_dir, progress, cfg, scheduler, ema)
    top_k = TopK(run_dir, cfg.save_top_k, cfg.mode, progress["top_k"])
    if config is not None and accelerator.is_main_process:  # every check has passed: the run writes from here on
        save_config(config, run_dir / "config.yaml")
    start_trackers(accelerator, cfg, run_dir, hparams)
    guard = NonFiniteGuard(accelerator, cfg.max_nonfinite_steps)
    metrics: dict[str, float] = {}
    loss = torch.zeros(())
    bar = progress_bar(accelerator)
    with explain_interrupt(accelerator, run_dir), bar, explain_lost_peers(accelerator, run_dir):
        for epoch in range(progress["epoch"], cfg.max_epochs):
            wrapped.train()
            train_loader.set_epoch(epoch)
            skip = progress["batches_done"]
            batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            qat.start_epoch(epoch)
            scheduler.set_epoch(epoch)
            bar_task = bar.add_task("train", total=len(train_loader), completed=skip, epoch=epoch, info="")
            start, seen = time.perf_counter(), 0
            for step, batch in enumerate(batches, start=skip):
                task.set_progress(epoch + step / len(train_loader))
                with accelerator.accumulate(wrapped):
                    terms = wrapped(batch)
                    loss = terms["loss"]
                    if guard.skip(terms, epoch, step):
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.gradient_clip_val > 0:
                        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), cfg.gradient_clip_val)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                seen += batch["label"].shape[0]
                bar.update(bar_task, advance=1, info=f"loss {loss.item():.4f}")
                if not accelerator.sync_gradients:
                    continue
                progress["updates"] += 1
                if ema is not None:
                    ema.update(task.model, step=progress["updates"])
                scheduler.step_update(progress["updates"])
                if progress["updates"] % cfg.log_every_n_steps == 0:
                    logs = {f"train/{k}": v.item() for k, v in terms.items() if k != "logits"}
                    logs["train/lr"] = optimizer.param_groups[0]["lr"]
                    if grad_norm is not None:
                        logs["train/grad_norm"] = float(grad_norm)
                    accelerator.log(logs, step=progress["updates"])
                if cfg.save_every_n_steps and progress["updates"] % cfg.save_every_n_steps == 0:
                    position = {**progress, "epoch": epoch, "batches_done": step + 1}
                    save_state(accelerator, run_dir, position, scheduler, ema, qat.safe_serialization)
            bar.remove_task(bar_task)
            train_seconds = time.perf_counter() - start
            guard.end_epoch(epoch, len(train_loader) - skip)

            metrics = validate(accelerator, ema.module if ema is not None else task.model, val_loader, qat, wrapped)
            score = metrics[cfg.monitor]
            scheduler.step(epoch + 1, score)
            images_per_s = seen / max(train_seconds, 1e-9)
            logs = {f"val/{k[4:]}": v for k, v in metrics.items()}
            logs.update(
                {"train/images_per_s": images_per_s * accelerator.num_processes, "train/epoch_s": train_seconds}
            )
            accelerator.log(logs, step=progress["updates"])
            improved = top_k.is_better(score, top_k.best, cfg.min_delta)
            saved_model, ranges = (ema.module if ema is not None else float_model), qat.ranges()
            checkpoint_meta = dataclasses.replace(
                meta, epoch=epoch, metrics=metrics, ema=ema is not None, qat=qat.active
            )
            # the whole weights, gathered from every process under FSDP (all must call it); rank 0 writes them
            weights = accelerator.get_state_dict(saved_model)
            top_k.update(score, epoch, weights, checkpoint_meta, accelerator.is_main_process, ranges)
            if accelerator.is_main_process:  # the newest weights, whatever their score (e.g. after QAT)
                save_checkpoint(run_dir / "latest", weights, checkpoint_meta, ranges)
            progress["stale_epochs"] = 0 if improved else progress["stale_epochs"] + 1
            progress.update(epoch=epoch + 1, batches_done=0, top_k=top_k.entries, metrics=metrics)
            save_state(accelerator, run_dir, progress, scheduler, ema, qat.safe_serialization)
            accelerator.print(
                f"epoch {epoch}: loss {loss.item():.4f}  val_acc {metrics['val_acc']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{images_per_s:.0f} img/s{'  *best*' if improved else ''}"
            )
            if 0 < cfg.early_stopping_patience <= progress["stale_epochs"]:
                accelerator.print(
                    f"early stopping: {cfg.monitor} did not improve for {progress['stale_epochs']} epochs"
                )
                break
    accelerator.print(weight_check(accelerator, float_model)[1])
    accelerator.end_training()
    return {"best": top_k.best, "monitor": cfg.monitor, **metrics}
