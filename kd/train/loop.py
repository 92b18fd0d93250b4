"""The one training loop of both scripts, on Accelerate: `fit` trains any TrainingTask (kd/train/task.py), never
knowing whether it distils, alternating `train_one_epoch` and `validate_and_save`."""

import dataclasses
import itertools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as ProgressBar
from timm.optim import create_optimizer_v2
from timm.utils import AverageMeter, ModelEmaV3
from torch.utils.data import DataLoader

from kd.config import Config, TrainConfig, optimizer_arguments, save_config
from kd.deploy.qat import QatPhase
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, save_checkpoint
from kd.models.zoo import forward_batch
from kd.train.accelerator import start_trackers
from kd.train.nonfinite import NonFiniteGuard
from kd.train.schedule import LRSchedule, build_scheduler
from kd.train.state import Progress, explain_interrupt, explain_lost_peers, find_state, load_state, save_state
from kd.train.task import TrainingTask
from kd.train.topk import TopK
from kd.train.weights import sync_buffers, weight_check, whole_weights


@dataclasses.dataclass
class Run:
    accelerator: Accelerator
    cfg: TrainConfig
    run_dir: Path
    task: TrainingTask
    wrapped: torch.nn.Module  # the task as Accelerate runs it (DDP, FSDP)
    float_model: torch.nn.Module  # what checkpoints store, also during QAT (the QAT graph shares its weights)
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    ema: ModelEmaV3 | None
    qat: QatPhase
    progress: Progress
    top_k: TopK
    guard: NonFiniteGuard
    bar: ProgressBar
    since_log: dict[str, AverageMeter] = dataclasses.field(default_factory=dict)  # each loss term since the last log


def build_optimizer(task: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer (no weight decay on norms and biases)."""
    try:
        return create_optimizer_v2(
            task, cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **optimizer_arguments(cfg)
        )
    except (AssertionError, ImportError) as e:  # bitsandbytes and apex optimizers: their package and a CUDA GPU
        raise UserError(f"{cfg.SECTION}.optimizer {cfg.optimizer} cannot run here: {e}") from None


def prepare_model(task: TrainingTask, cfg: TrainConfig, fsdp: bool = False) -> None:
    """The memory and speed options, set before the optimizer and Accelerate see the model. Under FSDP the weights
    stay contiguous: FSDP2 shards nothing else (torch 2.14 raises on channels_last weights)."""
    if cfg.grad_checkpointing:
        if not hasattr(task.model, "set_grad_checkpointing"):
            raise UserError(f"grad_checkpointing: {type(task.model).__name__} has no set_grad_checkpointing")
        task.model.set_grad_checkpointing(True)
    if cfg.channels_last and not fsdp:  # 4-D weights NHWC: oneDNN and tensor-core convolutions skip a conversion
        task.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the module, its state dict and checkpoints stay as they are
        task.model.compile()


@torch.no_grad()
def validate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    qat: QatPhase,
    wrapped: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Exact top-1 accuracy and CE loss over the whole split, across all processes, of the model the checkpoints
    store (rank 0's BatchNorm statistics, a QAT graph's trained ranges). `wrapped` may hold `model` sharded (FSDP)."""
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


def start_run(
    accelerator: Accelerator,
    task: TrainingTask,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
) -> tuple[Run, DataLoader, DataLoader]:
    """Everything a run needs before its first step, prepared, with the saved state (if any) loaded."""
    float_model = task.model
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    prepare_model(task, cfg, fsdp)
    optimizer = build_optimizer(task, cfg)
    if fsdp:  # as DDP does: all start from rank 0's weights
        for tensor in itertools.chain(task.parameters(), task.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
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
    accelerator.print(
        f"speed options: precision {accelerator.mixed_precision}, channels_last "
        f"{('off (FSDP shards contiguous weights only)' if fsdp else 'on') if cfg.channels_last else 'off'}"
        f", compile {'on' if cfg.compile else 'off'}"
    )
    qat = QatPhase(cfg, task, val_loader, accelerator.mixed_precision, accelerator.print)
    progress = find_state(accelerator, run_dir, cfg, resume)
    if progress is None:
        progress = Progress(max_epochs=cfg.max_epochs)
    else:
        qat.resume(dataclasses.asdict(progress))  # a state saved inside the QAT phase is the QAT graph's
        load_state(accelerator, run_dir, progress, cfg, scheduler, ema)
    top_k = TopK(run_dir, cfg.save_top_k, cfg.mode, progress.top_k)
    guard = NonFiniteGuard(accelerator, cfg.max_nonfinite_steps)
    columns = (TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn())
    columns += (TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    bar = ProgressBar(*columns, disable=not accelerator.is_main_process)
    parts = (task, wrapped, float_model, optimizer, scheduler, ema, qat, progress, top_k, guard, bar)
    return Run(accelerator, cfg, run_dir, *parts), train_loader, val_loader


def train_one_epoch(run: Run, loader: DataLoader, epoch: int) -> tuple[dict[str, AverageMeter], int, float]:
    """The optimizer steps of `epoch`, from the batch a resumed state reached: the epoch's mean of each loss term
    (skipped steps left out), the images this process trained on, and the seconds it took."""
    accelerator, cfg, progress = run.accelerator, run.cfg, run.progress
    run.wrapped.train()
    loader.set_epoch(epoch)
    skip = progress.batches_done
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    run.qat.start_epoch(epoch)
    run.scheduler.set_epoch(epoch)
    bar_task = run.bar.add_task("train", total=len(loader), completed=skip, epoch=epoch, info="")
    start, seen, epoch_means = time.perf_counter(), 0, {}
    for step, batch in enumerate(batches, start=skip):
        run.task.set_progress(epoch + step / len(loader))
        with accelerator.accumulate(run.wrapped):
            terms = run.wrapped(batch)
            loss = terms["loss"]
            if run.guard.skip(terms, epoch, step):
                run.optimizer.zero_grad(set_to_none=True)
                continue
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and cfg.gradient_clip_val > 0:
                grad_norm = accelerator.clip_grad_norm_(run.wrapped.parameters(), cfg.gradient_clip_val)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        images = batch["label"].shape[0]
        seen += images
        for name, value in terms.items():  # running means, weighted by images as timm does
            if name != "logits":
                epoch_means.setdefault(name, AverageMeter()).update(value.item(), images)
                run.since_log.setdefault(name, AverageMeter()).update(value.item(), images)
        run.bar.update(bar_task, advance=1, info=f"loss {loss.item():.4f}")
        if accelerator.sync_gradients:
            after_update(run, epoch, step, grad_norm)
    run.bar.remove_task(bar_task)
    seconds = time.perf_counter() - start
    run.guard.end_epoch(epoch, len(loader) - skip)
    return epoch_means, seen, seconds


def after_update(run: Run, epoch: int, step: int, grad_norm: torch.Tensor | None) -> None:
    """The EMA and the schedule advance; logs and mid-epoch states every so many updates."""
    accelerator, cfg, progress = run.accelerator, run.cfg, run.progress
    progress.updates += 1
    if run.ema is not None:
        run.ema.update(run.task.model, step=progress.updates)
    run.scheduler.step_update(progress.updates)
    if progress.updates % cfg.log_every_n_steps == 0:  # the mean of each term since the last log, not one batch's
        logs = {f"train/{k}": means.avg for k, means in run.since_log.items()}
        run.since_log.clear()
        logs["train/lr"] = run.optimizer.param_groups[0]["lr"]
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        accelerator.log(logs, step=progress.updates)
    if cfg.save_every_n_steps and progress.updates % cfg.save_every_n_steps == 0:
        position = dataclasses.replace(progress, epoch=epoch, batches_done=step + 1)
        save_state(accelerator, run.run_dir, position, run.scheduler, run.ema, run.qat.safe_serialization)


def validate_and_save(
    run: Run, loader: DataLoader, epoch: int, meta: CheckpointMeta, trained: tuple[dict[str, AverageMeter], int, float]
) -> dict[str, float]:
    """Validate, write the checkpoints (top-k, best, latest) and the resumable state, print the epoch's line."""
    accelerator, cfg, progress, ema, qat = run.accelerator, run.cfg, run.progress, run.ema, run.qat
    epoch_means, seen, seconds = trained
    metrics = validate(accelerator, ema.module if ema is not None else run.task.model, loader, qat, run.wrapped)
    score = metrics[cfg.monitor]
    run.scheduler.step(epoch + 1, score)
    images_per_s = seen / max(seconds, 1e-9)
    logs = {f"val/{k[4:]}": v for k, v in metrics.items()}
    logs.update({"train/images_per_s": images_per_s * accelerator.num_processes, "train/epoch_s": seconds})
    accelerator.log(logs, step=progress.updates)
    improved = run.top_k.is_better(score, run.top_k.best, cfg.min_delta)
    saved_model, ranges = (ema.module if ema is not None else run.float_model), qat.ranges()
    checkpoint_meta = dataclasses.replace(meta, epoch=epoch, metrics=metrics, ema=ema is not None, qat=qat.active)
    # the whole weights, gathered from every process under FSDP (all must call it); rank 0 writes them
    weights = accelerator.get_state_dict(saved_model)
    run.top_k.update(score, epoch, weights, checkpoint_meta, accelerator.is_main_process, ranges)
    if accelerator.is_main_process:  # the newest weights, whatever their score (e.g. after QAT)
        save_checkpoint(run.run_dir / "latest", weights, checkpoint_meta, ranges)
    progress.stale_epochs = 0 if improved else progress.stale_epochs + 1
    progress.epoch, progress.batches_done, progress.top_k, progress.metrics = epoch + 1, 0, run.top_k.entries, metrics
    save_state(accelerator, run.run_dir, progress, run.scheduler, ema, qat.safe_serialization)
    terms = "".join(f"{name} {means.avg:.4f}  " for name, means in epoch_means.items())  # loss first
    accelerator.print(
        f"epoch {epoch}: {terms}val_acc {metrics['val_acc']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  lr {run.optimizer.param_groups[0]['lr']:.2e}  "
        f"{images_per_s:.0f} img/s{'  *best*' if improved else ''}"
    )
    return metrics


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
    `config` is saved as <run_dir>/config.yaml only once the state to continue (if any) has loaded: a refused resume
    leaves the folder as it was."""
    run, train_loader, val_loader = start_run(accelerator, task, train_loader, val_loader, cfg, run_dir, resume)
    if config is not None and accelerator.is_main_process:  # every check has passed: the run writes from here on
        save_config(config, run_dir / "config.yaml")
    start_trackers(accelerator, cfg, run_dir, hparams)
    metrics: dict[str, float] = {}
    with explain_interrupt(accelerator, run_dir), run.bar, explain_lost_peers(accelerator, run_dir):
        for epoch in range(run.progress.epoch, cfg.max_epochs):
            trained = train_one_epoch(run, train_loader, epoch)
            metrics = validate_and_save(run, val_loader, epoch, meta, trained)
            if 0 < cfg.early_stopping_patience <= run.progress.stale_epochs:
                accelerator.print(
                    f"early stopping: {cfg.monitor} did not improve for {run.progress.stale_epochs} epochs"
                )
                break
    accelerator.print(weight_check(accelerator, run.float_model)[1])
    accelerator.end_training()
    return {"best": run.top_k.best, "monitor": cfg.monitor, **metrics}
