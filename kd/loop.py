"""The one training loop, shared by train_teacher.py and distill.py, on Hugging Face Accelerate.

`task` is a module whose forward(batch) returns {"loss", <terms...>, "logits"} (kd/task.py); `task.model` is what
gets validated and checkpointed. If it has `set_progress(epoch: float)`, the loop calls it before every step
(temperature schedules, loss warmups). The loop never needs to know whether it is distilling.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import accelerate.utils
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from kd.checkpoint import CheckpointMeta, save_checkpoint
from kd.config import TrainConfig
from kd.errors import UserError
from kd.models import forward_batch, input_keys
from kd.qat import frozen_observers, prepare_qat, range_state


class NonFiniteLoss(UserError, FloatingPointError):
    """Too many non-finite losses in a row: a diverging run, bad data or a bad teacher; the message says what to try."""


def make_accelerator(cfg: TrainConfig, run_dir: Path, seed: int = 0, cpu: bool = False) -> Accelerator:
    """Accelerator with the config's precision, accumulation and trackers; TensorBoard logs go to <run_dir>/tb."""
    precision = cfg.mixed_precision
    if precision == "fp16" and (cpu or not torch.cuda.is_available()):
        warnings.warn(
            "precision fp16 (16-mixed) needs a CUDA GPU; training in fp32 on this CPU. "
            "Set precision=bf16-mixed for CPU autocast, or null to silence this.",
            stacklevel=2,
        )
        precision = "no"
    log_with = {"none": None, "all": ["tensorboard", "wandb"]}.get(cfg.log_with, cfg.log_with)
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.accumulate_grad_batches,
        log_with=log_with,
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        # a per-epoch seeded shuffle makes "skip the first N batches" land on the same samples after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        # a crashed rank ends the others after this long instead of leaving them hanging forever
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=30))],
    )


def lost_peer(error: BaseException) -> bool:
    """Whether a distributed error means another process of the run is gone (gloo's and NCCL's wordings)."""
    text = str(error)
    return (
        isinstance(error, torch.distributed.DistError) or "Connection closed by peer" in text or "remote worker" in text
    )


@contextlib.contextmanager
def explain_lost_peers(accelerator: Accelerator, run_dir: Path):
    """With several processes, say what to do when another one dies, instead of a stack dump from this one.

    A killed rank shows up in the others either as a failed collective (gloo: "Connection closed by peer") or as
    the launcher's SIGTERM; either way this process prints one line: where the last saved state is and that
    `--resume` continues from it. Which rank died, and how, is in the launcher's own report ("Root Cause").
    """
    if accelerator.num_processes == 1:
        yield
        return

    def message() -> str:
        progress = run_dir / "last" / "progress.json"
        saved = json.loads(progress.read_text()) if progress.is_file() else None
        where = (
            f"the last saved state, {run_dir / 'last'} (epoch {saved['epoch']}, batch {saved['batches_done']}), "
            "with the same command and --resume"
            if saved
            else "the start: no state was saved yet, so run the same command again (without --resume)"
        )
        return (
            f"process {accelerator.process_index} of {accelerator.num_processes} stopped: another process of this "
            f"run ended first (the launcher's report names it under 'Root Cause'). Continue from {where}."
        )

    def on_sigterm(signum, frame) -> None:
        print(f"error: {message()}", file=sys.stderr, flush=True)
        os._exit(2)  # at once: the launcher kills what is still running after a grace period

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except RuntimeError as e:  # DistError is one
        if lost_peer(e):
            raise UserError(message()) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm's scheduler: linear warmup, then cosine (with optional restarts) / step / plateau / constant.

    Everything but plateau is stepped every optimizer update; plateau needs the validation metric, so it steps
    per epoch. The schedule spans max_epochs - finetune_epochs; the loop holds a constant LR after that.
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
    return scheduler


@torch.no_grad()
def validate(accelerator: Accelerator, predict: Callable, loader: DataLoader) -> dict[str, float]:
    """Exact top-1 accuracy and CE loss over the whole split, across all processes (no duplicated samples)."""
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

    def is_better(self, score: float, than: float | None, min_delta: float = 0.0) -> bool:
        return than is None or self.sign * (score - than) > min_delta

    def update(
        self,
        score: float,
        epoch: int,
        model: torch.nn.Module,
        meta: CheckpointMeta,
        write: bool = True,
        extra: dict | None = None,
    ) -> None:
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
        save_checkpoint(self.run_dir / stem, model, meta, extra)
        if new_best:
            save_checkpoint(self.run_dir / "best", model, meta, extra)
        for _, old in dropped:
            for suffix in (".safetensors", ".json"):
                (self.run_dir / old).with_suffix(suffix).unlink(missing_ok=True)


SCHEDULER_FILE, EMA_FILE = "scheduler.json", "ema.safetensors"  # our own state in last/: JSON and tensors only


def save_state(
    accelerator: Accelerator,
    run_dir: Path,
    progress: dict,
    scheduler=None,
    ema: ModelEmaV3 | None = None,
    safe_serialization: bool = True,
) -> None:
    """Resumable state (model, optimizer, scaler, RNG; scheduler, EMA) in <run_dir>/last, replaced atomically.

    The new state is written to last.tmp, completed by progress.json, then swapped in (last -> last.old,
    last.tmp -> last). A kill at any point leaves one complete state that `recover_state` finds.
    The scheduler is saved as JSON and the EMA as safetensors, not through Accelerate's custom-state pickles, which
    it loads with code execution allowed (see `load_state`).
    A QAT graph needs safe_serialization=False: it reuses observers under several names, and safetensors keeps one
    name per shared tensor by a rule that differs between Accelerate's save and safetensors' load.
    """
    tmp, last, old = run_dir / "last.tmp", run_dir / "last", run_dir / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=safe_serialization)
    if accelerator.is_main_process:
        if scheduler is not None:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        if ema is not None:
            ema_state = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
            safetensors.torch.save_file(ema_state, str(tmp / EMA_FILE))
        (tmp / "progress.json.tmp").write_text(json.dumps(progress))
        os.replace(tmp / "progress.json.tmp", tmp / "progress.json")  # its presence marks a complete state
        shutil.rmtree(old, ignore_errors=True)  # left by a kill after an earlier swap
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def recover_state(run_dir: Path) -> Path | None:
    """<run_dir>/last, after finishing a swap that a kill interrupted; None when there is no complete state."""
    last = run_dir / "last"
    if not (last / "progress.json").is_file():
        for candidate in (run_dir / "last.tmp", run_dir / "last.old"):  # newest complete state first
            if (candidate / "progress.json").is_file():
                shutil.rmtree(last, ignore_errors=True)
                candidate.rename(last)
                break
    return last if (last / "progress.json").is_file() else None


def check_state(last: Path) -> dict:
    """Check every file of a saved state before anything reads it, and return its progress.json.

    A run folder is often copied from a colleague or a shared drive, and a pickle can run code when it is loaded.
    Each pickled file (optimizer, scaler, RNG states, ...) must load with torch's weights_only unpickler, which builds
    tensors and plain containers only and refuses anything else without running it; .safetensors and .json files
    must parse. A file that fails is named, and nothing is resumed.
    """
    for path in sorted(p for p in last.iterdir() if p.is_file()):
        try:
            if path.suffix in (".bin", ".pkl", ".pt"):
                accelerate.utils.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".safetensors":
                with safetensors.safe_open(str(path), "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except pickle.UnpicklingError:  # torch's weights_only unpickler met an object it does not build
            problem = "holds more than tensors and plain data, and unpickling it could run code"
        except Exception as e:  # truncated, foreign or garbled
            problem = (
                f"cannot be read ({type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})"
            )
        else:
            continue
        raise UserError(
            f"refused to resume from {last}: {path.name} {problem}. Resume only from run folders you made or trust; "
            "to start over, set checkpoint_dir to a new folder."
        )
    progress = json.loads((last / "progress.json").read_text())
    keys = ("epoch", "batches_done", "updates", "stale_epochs", "top_k")
    if not (isinstance(progress, dict) and all(k in progress for k in keys)):
        raise UserError(f"refused to resume from {last}: progress.json lacks some of {keys}; the state is damaged")
    return progress


def load_state(accelerator: Accelerator, run_dir: Path, scheduler=None, ema: ModelEmaV3 | None = None) -> None:
    """Load <run_dir>/last into the prepared objects; `scheduler=None` keeps the freshly built schedule."""
    last = run_dir / "last"
    try:
        accelerator.load_state(str(last))
    except (RuntimeError, KeyError, ValueError, OSError, safetensors.SafetensorError) as e:
        detail = str(e).strip().splitlines()[0][:300]
        raise UserError(
            f"cannot resume from {last}: the saved state does not fit the model and optimizer this run builds "
            f"({detail}). It was saved by another model or configuration: resume with the config it was made with "
            f"({run_dir / 'config.yaml'}), or start a new run with another checkpoint_dir."
        ) from None
    # states saved before kd wrote its own files: Accelerate's custom pickles, registered scheduler first, then EMA
    legacy = {"scheduler": last / "custom_checkpoint_0.pkl", "ema": last / "custom_checkpoint_1.pkl"}
    if scheduler is not None:
        if (last / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(json.loads((last / SCHEDULER_FILE).read_text()))
        elif legacy["scheduler"].is_file():  # checked by check_state: plain data
            scheduler.load_state_dict(accelerate.utils.load(legacy["scheduler"], weights_only=True))
    if ema is not None:
        if (last / EMA_FILE).is_file():
            ema.load_state_dict(safetensors.torch.load_file(str(last / EMA_FILE), device=str(accelerator.device)))
        elif legacy["ema"].is_file():
            ema.load_state_dict(
                accelerate.utils.load(legacy["ema"], map_location=accelerator.device, weights_only=True)
            )
        else:
            raise UserError(f"cannot resume from {last}: it holds no EMA weights, but this run has ema_decay > 0")


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics: DDP lets them drift apart within a step, and the
    checkpoint (written by rank 0) must be the model that validation measured."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def check_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """A checksum of the weights, compared across processes: unsynced DDP ranks are an error, not a surprise."""
    checksum = torch.stack([p.detach().double().abs().sum() for p in model.parameters()]).sum()
    if not torch.isfinite(checksum):
        raise UserError(
            "the weights became non-finite (NaN/inf) during training: lower learning_rate, enable "
            "gradient_clip_val, or check the data and the teacher"
        )
    everyone = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    if not torch.allclose(everyone, everyone[0].expand_as(everyone), rtol=1e-9, atol=0):
        raise RuntimeError(f"weights differ across the {accelerator.num_processes} processes: {everyone.tolist()}")
    return float(checksum)


def resumed_schedule(progress: dict, cfg: TrainConfig) -> bool:
    """Whether a resumed run must rebuild its LR schedule: max_epochs changed since the state was saved.

    A finished run resumed with a larger max_epochs continues training on the schedule of the new length (its LR
    jumps from the old schedule's end to the new one's value at that step); a smaller one than already trained is
    refused.
    """
    saved = progress.get("max_epochs", cfg.max_epochs)  # states saved before max_epochs was recorded
    if cfg.max_epochs < progress["epoch"]:
        raise UserError(
            f"--resume: the saved run has already trained {progress['epoch']} epochs, more than max_epochs="
            f"{cfg.max_epochs}; set max_epochs >= {progress['epoch']} (or its former {saved})"
        )
    return saved != cfg.max_epochs


def fit(
    accelerator: Accelerator,
    task: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    run_dir: Path,
    meta: CheckpointMeta,
    hparams: dict | None = None,
    resume: bool = False,
) -> dict:
    """Train `task`: AMP, accumulation, clipping, schedules, EMA, validation, top-k checkpoints, resume, early stop."""
    unwrapped = task
    if cfg.grad_checkpointing:
        if not hasattr(unwrapped.model, "set_grad_checkpointing"):
            raise UserError(f"grad_checkpointing: {type(unwrapped.model).__name__} has no set_grad_checkpointing")
        unwrapped.model.set_grad_checkpointing(True)
    if cfg.channels_last:  # 4-D weights NHWC: oneDNN and tensor-core convolutions skip a layout conversion
        unwrapped.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the module, its state dict and checkpoints stay as they are
        unwrapped.model.compile()
    optimizer = create_optimizer_v2(task, "adamw", lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    task, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.accumulate_grad_batches)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    ema = None
    if cfg.ema_decay > 0:
        ema = ModelEmaV3(unwrapped.model, decay=cfg.ema_decay, device=accelerator.device)
        if hasattr(unwrapped, "set_ema"):
            unwrapped.set_ema(ema.module)
    accelerator.init_trackers("kd", config=hparams or {})
    accelerator.print(
        f"training on {accelerator.num_processes} process(es), device {accelerator.device}, "
        f"precision {accelerator.mixed_precision}, {updates_per_epoch} optimizer steps per epoch"
    )

    progress = {
        "epoch": 0,
        "batches_done": 0,
        "updates": 0,
        "stale_epochs": 0,
        "top_k": [],
        "max_epochs": cfg.max_epochs,
    }
    float_model = unwrapped.model  # what checkpoints store, also during QAT (the QAT graph shares its weights)
    qat_epoch = None if cfg.qat_start_fraction is None else round(cfg.qat_start_fraction * cfg.max_epochs)
    if qat_epoch is not None and accelerator.mixed_precision == "fp16":
        raise UserError(
            "qat_start_fraction cannot train under fp16 autocast: PyTorch's fake quantization takes float32 only. "
            "Set precision=null for a QAT run."
        )
    if qat_epoch is not None and input_keys(float_model) != ("rgb",):
        raise UserError("qat_start_fraction applies to RGB students; this model also takes MS input")

    def enter_qat() -> None:
        if unwrapped.model is not float_model:
            return  # already entered (resumed inside the QAT phase)
        example = next(iter(val_loader))["rgb"][:2]
        unwrapped.set_model(prepare_qat(float_model, example))
        accelerator.print("quantization-aware training from here on (fake-quantized INT8 weights and activations)")

    if accelerator.is_main_process and (resume or cfg.resume == "auto"):
        recover_state(run_dir)
    accelerator.wait_for_everyone()
    last = run_dir / "last"
    if resume or (cfg.resume == "auto" and (last / "progress.json").is_file()):
        if not (last / "progress.json").is_file():
            raise UserError(f"--resume: no complete saved state in {last}; start without --resume")
        progress = check_state(last)
        reschedule = resumed_schedule(progress, cfg)
        if qat_epoch is not None and (progress["epoch"], progress["batches_done"]) > (qat_epoch, 0):
            enter_qat()  # the saved state is of the QAT graph
        load_state(accelerator, run_dir, None if reschedule else scheduler, ema)
        if reschedule:  # the new schedule at the step reached, as if max_epochs had been this from the start
            scheduler.step_update(progress["updates"])
            accelerator.print(
                f"max_epochs {progress['max_epochs']} -> {cfg.max_epochs}: the LR schedule is rebuilt for "
                f"{cfg.max_epochs} epochs and continues from optimizer step {progress['updates']}"
            )
        progress["max_epochs"] = cfg.max_epochs
        accelerator.print(f"resumed from {last} at epoch {progress['epoch']}, batch {progress['batches_done']}")
    top_k = TopK(run_dir, cfg.save_top_k, cfg.mode, progress["top_k"])
    main_epochs = cfg.max_epochs - cfg.finetune_epochs
    metrics: dict[str, float] = {}
    bad_steps, loss = 0, torch.zeros(())

    bar = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
    with bar, explain_lost_peers(accelerator, run_dir):
        for epoch in range(progress["epoch"], cfg.max_epochs):
            task.train()
            train_loader.set_epoch(epoch)
            skip = progress["batches_done"]
            batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            if epoch == qat_epoch:
                enter_qat()
            if epoch >= main_epochs:  # fine-tuning phase: constant, lower LR
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * cfg.finetune_lr_scale
            bar_task = bar.add_task("train", total=len(train_loader), completed=skip, epoch=epoch, info="")
            start, seen, taken = time.perf_counter(), 0, 0
            for step, batch in enumerate(batches, start=skip):
                if hasattr(unwrapped, "set_progress"):
                    unwrapped.set_progress(epoch + step / len(train_loader))
                with accelerator.accumulate(task):
                    terms = task(batch)
                    loss = terms["loss"]
                    finite = torch.isfinite(loss.detach()).float()
                    if accelerator.num_processes > 1:  # every rank must skip together, or DDP hangs
                        finite = accelerator.reduce(finite, "min")
                    if finite.item() == 0:
                        bad_steps += 1
                        values = {k: round(v.item(), 4) for k, v in terms.items() if k != "logits"}
                        message = f"non-finite loss at epoch {epoch} step {step}: {values}"
                        if bad_steps >= cfg.max_nonfinite_steps:
                            raise NonFiniteLoss(
                                f"{message}; {bad_steps} such steps in a row, stopping. Lower learning_rate, "
                                "enable gradient_clip_val, or check the data and the teacher."
                            )
                        warnings.warn(f"{message}; step skipped ({bad_steps} in a row)", stacklevel=1)
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    bad_steps, taken = 0, taken + 1
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.gradient_clip_val > 0:
                        grad_norm = accelerator.clip_grad_norm_(task.parameters(), cfg.gradient_clip_val)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                seen += batch["label"].shape[0]
                bar.update(bar_task, advance=1, info=f"loss {loss.item():.4f}")
                if not accelerator.sync_gradients:
                    continue
                progress["updates"] += 1
                if ema is not None:
                    ema.update(unwrapped.model, step=progress["updates"])
                if epoch < main_epochs:
                    scheduler.step_update(progress["updates"])
                if progress["updates"] % cfg.log_every_n_steps == 0:
                    logs = {f"train/{k}": v.item() for k, v in terms.items() if k != "logits"}
                    logs["train/lr"] = optimizer.param_groups[0]["lr"]
                    if grad_norm is not None:
                        logs["train/grad_norm"] = float(grad_norm)
                    accelerator.log(logs, step=progress["updates"])
                if cfg.save_every_n_steps and progress["updates"] % cfg.save_every_n_steps == 0:
                    save_state(
                        accelerator,
                        run_dir,
                        {**progress, "epoch": epoch, "batches_done": step + 1},
                        scheduler,
                        ema,
                        safe_serialization=unwrapped.model is float_model,
                    )
            bar.remove_task(bar_task)
            train_seconds = time.perf_counter() - start
            if taken == 0 and len(train_loader) > skip:  # nothing learned: no checkpoint, no success
                raise UserError(
                    f"every training step of epoch {epoch} had a non-finite loss and was skipped, so the model did not "
                    "train; nothing was saved for this epoch. Check the data for NaN/inf values and the teacher, or "
                    "lower learning_rate."
                )

            evaluated_model = ema.module if ema is not None else unwrapped.model
            saved_model = ema.module if ema is not None else float_model
            sync_buffers(accelerator, evaluated_model)
            evaluated_model.eval()
            with frozen_observers(evaluated_model):  # a QAT graph is measured with the ranges it trained with
                metrics = validate(accelerator, functools.partial(forward_batch, evaluated_model), val_loader)
            score = metrics[cfg.monitor]
            if epoch < main_epochs:
                scheduler.step(epoch + 1, score)
            accelerator.log(
                {
                    **{f"val/{k[4:]}": v for k, v in metrics.items()},
                    "train/images_per_s": seen * accelerator.num_processes / max(train_seconds, 1e-9),
                    "train/epoch_s": train_seconds,
                },
                step=progress["updates"],
            )
            improved = top_k.is_better(score, top_k.best, cfg.min_delta)
            qat = qat_epoch is not None and epoch >= qat_epoch
            checkpoint_meta = dataclasses.replace(meta, epoch=epoch, metrics=metrics, ema=ema is not None, qat=qat)
            ranges = range_state(unwrapped.model) if qat else None  # what export.py's torch-int8-qat converts with
            top_k.update(score, epoch, saved_model, checkpoint_meta, accelerator.is_main_process, ranges)
            if accelerator.is_main_process:  # the newest weights, whatever their score (e.g. after QAT)
                save_checkpoint(run_dir / "latest", saved_model, checkpoint_meta, ranges)
            progress["stale_epochs"] = 0 if improved else progress["stale_epochs"] + 1
            progress.update(epoch=epoch + 1, batches_done=0, top_k=top_k.entries, metrics=metrics)
            save_state(
                accelerator, run_dir, progress, scheduler, ema, safe_serialization=unwrapped.model is float_model
            )
            accelerator.print(
                f"epoch {epoch}: loss {loss.item():.4f}  val_acc {metrics['val_acc']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{seen / max(train_seconds, 1e-9):.0f} img/s{'  *best*' if improved else ''}"
            )
            if 0 < cfg.early_stopping_patience <= progress["stale_epochs"]:
                accelerator.print(
                    f"early stopping: {cfg.monitor} did not improve for {progress['stale_epochs']} epochs"
                )
                break
    checksum = check_in_sync(accelerator, float_model)
    accelerator.print(f"weights in sync across {accelerator.num_processes} process(es) (checksum {checksum:.6e})")
    accelerator.end_training()
    return {"best": top_k.best, "monitor": cfg.monitor, **metrics}
