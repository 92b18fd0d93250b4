"""The one training loop, shared by train_teacher.py and distill.py, on Hugging Face Accelerate.

`task` is a module whose forward(batch) returns {"loss", <terms...>, "logits"} and whose predict(batch) returns
logits; `task.model` is what gets checkpointed. The loop never needs to know whether it is distilling.
"""

import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from kd.config import TrainConfig
from kd.errors import UserError
from kd.models import save_checkpoint


def make_accelerator(cfg: TrainConfig, run_dir: Path, cpu: bool = False) -> Accelerator:
    """Accelerator with the config's precision and accumulation; TensorBoard logs go to <run_dir>/tb."""
    precision = cfg.mixed_precision
    if precision == "fp16" and (cpu or not torch.cuda.is_available()):
        warnings.warn(
            "precision fp16 (16-mixed) needs a CUDA GPU; training in fp32 on this CPU. "
            "Set precision=bf16-mixed for CPU autocast, or null to silence this.",
            stacklevel=2,
        )
        precision = "no"
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.accumulate_grad_batches,
        log_with="tensorboard",
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm's scheduler: linear warmup then cosine/step/plateau, stepped every optimizer update."""
    sched = "step" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    decay_epochs = cfg.max_epochs * 10 if cfg.lr_scheduler == "constant" else cfg.lr_step_size
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched,
        num_epochs=cfg.max_epochs,
        decay_epochs=decay_epochs,
        decay_rate=cfg.lr_gamma,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.learning_rate * 1e-3,
        warmup_epochs=cfg.warmup_epochs,
        warmup_prefix=True,
        plateau_mode=cfg.mode,
        patience_epochs=max(1, cfg.lr_step_size // 10),
        step_on_epochs=cfg.lr_scheduler == "plateau",
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


@torch.no_grad()
def validate(accelerator: Accelerator, task: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Exact top-1 accuracy and CE loss over the whole split, across all processes (no duplicated samples)."""
    task.eval()
    predict = accelerator.unwrap_model(task).predict
    correct, loss_sum, count = 0, 0.0, 0
    for batch in loader:
        with accelerator.autocast():
            logits = predict(batch)
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

    def is_better(self, score: float, than: float | None) -> bool:
        return than is None or self.sign * (score - than) > 0

    def update(self, score: float, epoch: int, model: torch.nn.Module, meta: dict, write: bool = True) -> None:
        """Save if `score` makes the top k (every process keeps the list; only the one with `write` saves)."""
        if len(self.entries) >= self.k and not self.is_better(score, self.entries[-1][0]):
            return
        stem = f"epoch{epoch:03d}"
        new_best = self.is_better(score, self.best)
        self.entries.append([score, stem])
        self.entries.sort(key=lambda e: -self.sign * e[0])
        dropped, self.entries = self.entries[self.k :], self.entries[: self.k]
        if not write:
            return
        save_checkpoint(self.run_dir / stem, model, meta)
        if new_best:
            save_checkpoint(self.run_dir / "best", model, meta)
        for _, old in dropped:
            for suffix in (".safetensors", ".json"):
                (self.run_dir / old).with_suffix(suffix).unlink(missing_ok=True)


def _save_state(accelerator: Accelerator, run_dir: Path, progress: dict) -> None:
    """Resumable state (model, optimizer, scheduler, scaler, RNG) in <run_dir>/last, replaced atomically."""
    tmp, last, old = run_dir / "last.tmp", run_dir / "last", run_dir / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress))
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def fit(
    accelerator: Accelerator,
    task: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    run_dir: Path,
    meta: dict,
    hparams: dict | None = None,
    resume: bool = False,
) -> dict:
    """Train `task` with AMP, accumulation, clipping, warmup + schedule, validation, top-k checkpoints, resume."""
    optimizer = create_optimizer_v2(task, "adamw", lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    task, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.accumulate_grad_batches)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.init_trackers("kd", config=hparams or {})
    accelerator.print(
        f"training on {accelerator.num_processes} process(es), device {accelerator.device}, "
        f"precision {accelerator.mixed_precision}, {updates_per_epoch} optimizer steps per epoch"
    )

    progress = {"epoch": 0, "updates": 0, "stale_epochs": 0, "top_k": []}
    if resume:
        last = run_dir / "last"
        if not (last / "progress.json").is_file():
            raise UserError(f"--resume: no complete saved state in {last}; start without --resume")
        accelerator.load_state(str(last))
        progress = json.loads((last / "progress.json").read_text())
        accelerator.print(f"resumed from {last} at epoch {progress['epoch']}")
    top_k = TopK(run_dir, cfg.save_top_k, cfg.mode, progress["top_k"])
    metrics: dict[str, float] = {}

    bar = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
    with bar:
        for epoch in range(progress["epoch"], cfg.max_epochs):
            task.train()
            bar_task = bar.add_task("train", total=len(train_loader), epoch=epoch, info="")
            start, seen = time.perf_counter(), 0
            for step, batch in enumerate(train_loader):
                with accelerator.accumulate(task):
                    terms = task(batch)
                    loss = terms["loss"]
                    if not torch.isfinite(loss):
                        values = {k: v.item() for k, v in terms.items() if k != "logits"}
                        raise FloatingPointError(
                            f"non-finite loss at epoch {epoch} step {step}: {values}. "
                            "Lower learning_rate or enable gradient_clip_val."
                        )
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.gradient_clip_val > 0:
                        grad_norm = accelerator.clip_grad_norm_(task.parameters(), cfg.gradient_clip_val)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                seen += batch["label"].shape[0]
                if accelerator.sync_gradients:
                    progress["updates"] += 1
                    scheduler.step_update(progress["updates"])
                    if progress["updates"] % cfg.log_every_n_steps == 0:
                        logs = {f"train/{k}": v.item() for k, v in terms.items() if k != "logits"}
                        logs["train/lr"] = optimizer.param_groups[0]["lr"]
                        if grad_norm is not None:
                            logs["train/grad_norm"] = float(grad_norm)
                        accelerator.log(logs, step=progress["updates"])
                bar.update(bar_task, advance=1, info=f"loss {loss.item():.4f}")
            bar.remove_task(bar_task)
            train_seconds = time.perf_counter() - start

            metrics = validate(accelerator, task, val_loader)
            score = metrics[cfg.monitor]
            scheduler.step(epoch + 1, score)
            accelerator.log(
                {
                    **{f"val/{k[4:]}": v for k, v in metrics.items()},
                    "train/images_per_s": seen * accelerator.num_processes / train_seconds,
                    "train/epoch_s": train_seconds,
                },
                step=progress["updates"],
            )
            improved = top_k.is_better(score, top_k.best)
            top_k.update(
                score,
                epoch,
                accelerator.unwrap_model(task).model,
                {**meta, "epoch": epoch, "metrics": metrics},
                write=accelerator.is_main_process,
            )
            progress["stale_epochs"] = 0 if improved else progress["stale_epochs"] + 1
            progress.update(epoch=epoch + 1, top_k=top_k.entries, metrics=metrics)
            _save_state(accelerator, run_dir, progress)
            accelerator.print(
                f"epoch {epoch}: loss {loss.item():.4f}  val_acc {metrics['val_acc']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{seen / train_seconds:.0f} img/s{'  *best*' if improved else ''}"
            )
            if 0 < cfg.early_stopping_patience <= progress["stale_epochs"]:
                accelerator.print(
                    f"early stopping: {cfg.monitor} did not improve for {progress['stale_epochs']} epochs"
                )
                break
    accelerator.end_training()
    return {"best": top_k.best, "monitor": cfg.monitor, **metrics}
