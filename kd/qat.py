"""Quantization-aware training and INT8 conversion of RGB students (PyTorch FX graph mode, x86/fbgemm or qnnpack).

QAT fuses conv + BN and inserts fake quantization, so the last epochs train against INT8 rounding. The prepared
graph shares its parameters and BN statistics with the float model, so the float model (what checkpoints store)
keeps every update; `quantize_int8` later turns any float student, QAT-trained or not, into an INT8 model.
"""

import warnings

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


def prepare_qat(model: nn.Module, example: torch.Tensor, backend: str = BACKEND) -> nn.Module:
    """A fake-quantized training graph of `model` that shares its parameters (the optimizer keeps working)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    context = _quiet()
    try:
        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping(backend), (example,))
    finally:
        context.__exit__(None, None, None)


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: list[torch.Tensor], backend: str = BACKEND) -> nn.Module:
    """Post-training static INT8: per-channel weights, activation ranges calibrated on `calibration` batches."""
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    context = _quiet()
    try:
        torch.backends.quantized.engine = backend
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (calibration[0],))
        for batch in calibration:
            prepared(batch)
        return convert_fx(prepared)
    finally:
        context.__exit__(None, None, None)
