"""Quantization-aware training and INT8 conversion of RGB students (PyTorch FX graph mode, x86/fbgemm or qnnpack).

QAT fuses conv + BN and inserts fake quantization, so the last epochs train against INT8 rounding. The prepared
graph shares its parameters and BN statistics with the float model, so the float model (what checkpoints store)
keeps every update; `quantize_int8` later turns any float student, QAT-trained or not, into an INT8 model.
"""

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

BACKEND = "x86"  # fbgemm kernels for x86 servers and laptops; "qnnpack" for ARM phones


def _quiet():
    """torch.ao.quantization warns on every call that it moves to torchao; say it once in README instead."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message=".*torchao.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")
    return context


def plain_norm_act(model: nn.Module) -> nn.Module:
    """A copy of `model` that shares every parameter and buffer, with timm's BatchNormAct2d split into BN → act.

    FX traces through timm's fused norm+act module: the trace bakes in the `self.training` of trace time (a QAT
    graph would normalize with batch statistics, and update them, even in eval mode) and hides conv → BN from
    fusion (no folding; INT8 models dequantize around every BN). Plain BatchNorm2d modules fold as they should.
    """
    from timm.layers import BatchNormAct2d

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    plain = copy.deepcopy(model, shared)  # the memo maps each tensor to itself: the copy reuses them
    for name, module in list(plain.named_modules()):
        if isinstance(module, BatchNormAct2d):
            bn = nn.BatchNorm2d(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(bn, key, getattr(module, key))
            bn.train(module.training)
            plain.set_submodule(name, nn.Sequential(bn, module.drop, module.act))
    return plain


def prepare_qat(model: nn.Module, example: torch.Tensor, backend: str = BACKEND) -> nn.Module:
    """A fake-quantized training graph of `model` that shares its parameters (the optimizer keeps working)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    context = _quiet()
    try:
        return prepare_qat_fx(plain_norm_act(model).train(), get_default_qat_qconfig_mapping(backend), (example,))
    finally:
        context.__exit__(None, None, None)


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: list[torch.Tensor], backend: str = BACKEND) -> nn.Module:
    """Post-training static INT8: per-channel weights, activation ranges calibrated on `calibration` batches."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    context = _quiet()
    try:
        torch.backends.quantized.engine = backend
        float_model = plain_norm_act(copy.deepcopy(model)).eval()  # fusion must not touch `model`
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(backend), (calibration[0],))
        for batch in calibration:
            prepared(batch)
        return convert_fx(prepared)
    finally:
        context.__exit__(None, None, None)


@contextlib.contextmanager
def frozen_observers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, fake-quantized modules keep their ranges. A QAT graph's observers otherwise keep
    updating in eval mode, so validation would depend on the batches it sees and move the ranges it trains with."""
    from torch.ao.quantization import FakeQuantizeBase

    fake_quants = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    enabled = [m.observer_enabled.clone() for m in fake_quants]
    for module in fake_quants:
        module.disable_observer()
    try:
        yield model
    finally:
        for module, flag in zip(fake_quants, enabled):
            module.observer_enabled.copy_(flag)
