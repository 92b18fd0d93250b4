"""The weights across a run's processes: rank 0's buffers for all, whole weights under FSDP, the end-of-run check."""

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator

from kd.errors import UserError


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics, a QAT graph's observers drift apart), so that the
    checkpoint rank 0 writes is the model validation measured. Not timm's distribute_bn: it broadcasts only
    running_mean/running_var, so a QAT graph's ranges would stay each process's own."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def shard_of(parameter: torch.Tensor) -> int:
    """Which piece of `parameter` this process holds: 0 for a whole tensor; for an FSDP2 DTensor, a number for its
    coordinates on the sharded mesh dimensions (equal numbers: replicas of one shard, as HSDP keeps them)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(parameter, DTensor):
        return 0
    mesh, piece = parameter.device_mesh, 0
    for dim, placement in enumerate(parameter.placements):
        if placement.is_shard():
            piece = piece * mesh.size(dim) + mesh.get_coordinate()[dim]
    return piece


@contextlib.contextmanager
def whole_weights(wrapped: torch.nn.Module | None) -> Iterator[None]:
    """Within the block, the modules of `wrapped` hold their whole parameters: FSDP2 gathers them only around a call
    of the sharded module, and validation calls a submodule (the task's model)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in wrapped.modules() if isinstance(m, FSDPModule)] if wrapped is not None else []
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


def weight_check(accelerator: Accelerator, model: torch.nn.Module) -> tuple[float, str]:
    """(checksum of the whole model, a line saying what was compared); an error when weights are non-finite or
    processes that should hold the same values do not (under FSDP: those holding one shard)."""
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
