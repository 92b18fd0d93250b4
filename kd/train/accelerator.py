"""The Accelerator a run trains with: precision, accumulation, trackers, seeded data order; the FSDP setups kd
refuses."""

import os
from datetime import timedelta
from pathlib import Path

import accelerate.tracking
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, parse_flag_from_env

from kd.config import ConfigError, TrainConfig, tracker_names
from kd.errors import UserError

ACCELERATE_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` passes on from its flag or config
PIP_PACKAGES = {"comet_ml": "comet-ml"}  # trackers whose pip package is spelled otherwise
RUN_NAME_ARGUMENT = {  # the init argument each tracker takes a run's name as (they all get project_name as such)
    "wandb": "name",
    "mlflow": "run_name",
    "clearml": "task_name",
    "swanlab": "experiment_name",
    "trackio": "name",
}


def choose_precision(cfg: TrainConfig, cpu: bool = False) -> tuple[str | None, str | None]:
    """The mixed_precision for Accelerator, and a line to print when it is not simply the config's. The config's
    wins (a shared `accelerate config` must not silently change it); null hands the choice to Accelerate. fp16
    autocast needs a CUDA GPU: on a CPU, either one's fp16 trains in fp32."""
    ours = cfg.mixed_precision
    theirs = os.environ.get(ACCELERATE_PRECISION, "").strip().lower() or None
    key = f"{cfg.SECTION}.precision"
    if (ours or theirs) == "fp16" and (
        cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    ):
        source = (
            f"{key}={cfg.precision} (fp16)"
            if ours
            else "Accelerate's mixed_precision fp16 (accelerate launch / accelerate config)"
        )
        return "no", (
            f"precision: no (fp32): {source} needs a CUDA GPU, and this run is on a CPU; set {key}=bf16-mixed for "
            f"CPU autocast, or {key}=no to say fp32"
        )
    if ours is not None and theirs is not None and ours != theirs:
        return ours, (
            f"precision: {key}={cfg.precision} ({ours}) wins over Accelerate's mixed_precision {theirs} "
            f"(accelerate launch / accelerate config); set {key}=null to use Accelerate's"
        )
    return ours, None


def check_trackers(cfg: TrainConfig) -> list[str] | None:
    """`log_with` as Accelerator takes it. A tracker that is not installed is an error: Accelerate would leave it
    out with a debug message, and the run would log nothing."""
    names = tracker_names(cfg.log_with)
    installed = sorted(str(t) for t in accelerate.tracking.get_available_trackers())
    if missing := [name for name in names if name != "all" and name not in installed]:
        raise ConfigError(
            f"{cfg.SECTION}.log_with names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "not installed: "
            f"pip install {' '.join(PIP_PACKAGES.get(name, name) for name in missing)}, or leave it out of log_with "
            f"(installed trackers: {', '.join(installed) or 'none'})"
        )
    return names or None


def make_accelerator(cfg: TrainConfig, run_dir: Path, seed: int = 0, cpu: bool = False) -> Accelerator:
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
    """Refuse the FSDP setups kd does not run: FSDP that Accelerate would quietly run as something else, FSDP1,
    and the features that need the whole model on every process (EMA, QAT)."""
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
    key = cfg.SECTION
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
    # Its default loads rank 0's weights into the others' empty model, which Accelerate 1.15 does for parameters
    # only (BatchNorm statistics fail); `fit` broadcasts rank 0's weights before sharding instead.
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False


def start_trackers(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path, hparams: dict | None = None) -> None:
    run_name = cfg.run_name or Path(run_dir).resolve().name
    init_kwargs = {tracker: {argument: run_name} for tracker, argument in RUN_NAME_ARGUMENT.items()}
    accelerator.init_trackers(cfg.project_name, config=hparams or {}, init_kwargs=init_kwargs)
