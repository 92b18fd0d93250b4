"""Quantization-aware training and INT8 conversion of RGB students, through torchao's PT2E flow (the x86 recipe).

The QAT graph shares its parameters and BN statistics with the float model, which checkpoints store with the
ranges QAT learned (`range_state`); `convert_qat` turns both into the INT8 model QAT trained for, `quantize_int8`
calibrates ranges instead (post-training), and `save_int8` writes either as a torch.export program (.pt2)."""

import contextlib
import copy
import dataclasses
import types
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import TrainConfig
from kd.errors import UserError
from kd.models.checkpoint import RANGE_PREFIX
from kd.models.zoo import input_keys


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`model` exported for any batch size (the example is doubled: export specializes a batch of 1)."""
    pair = torch.cat([example[:1], example[:1]])
    with warnings.catch_warnings(action="ignore"):  # torch.export and torchao warn about their internals
        return torch.export.export(model, (pair,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def _quantizer(is_qat: bool):
    """x86's PT2E recipe; post-training, activation ranges are a running average of per-image min/max: the recipe's
    HistogramObserver spreads its bins over the widest value any image reaches, and on the demo student a few
    outlier images (9 of 256) made INT8 accuracy collapse (42% -> 25%; averaged: 43%)."""
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config(is_qat=is_qat)
    if not is_qat:
        observer = MovingAverageMinMaxObserver.with_args(averaging_constant=0.1, eps=2**-12)
        activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer)
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    return x86.X86InductorQuantizer().set_global(config)


def _fold_conv2d_bn(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's `_fold_conv_bn_qat` for conv2d on the CPU only: its 96 pattern exports (every conv variant, CPU
    and CUDA) take about a minute on 2 cores, and only these 24 can match here. Also drops the BN counters torchao
    leaves in timm's BatchNormAct2d (it removes them only for exactly BatchNorm2d)."""
    from torchao.quantization.pt2e.qat_utils import _fold_conv_bn_qat_helper

    example = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), *(torch.randn(1) for _ in range(4)))
    graph = _fold_conv_bn_qat_helper(graph, F.conv2d, example, is_cuda=False)
    _drop_batch_counters(graph)
    return graph


def _drop_batch_counters(graph: torch.fx.GraphModule) -> None:
    """Remove BN's `num_batches_tracked += 1`: an exported graph runs it in eval mode too (it only matters for
    momentum=None, which timm does not use)."""
    for node in list(graph.graph.nodes):
        source = node.args[0] if node.args else None
        if (
            node.op == "call_function"
            and node.target == torch.ops.aten.add_.Tensor
            and getattr(source, "op", None) == "get_attr"
            and str(source.target).endswith("num_batches_tracked")
        ):
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()


def prepare_qat(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """A fake-quantized training graph of `model` (any batch size) that shares its parameters and buffers. Its
    train() / eval() switch its dropout and batch norm ops (nn.Module.train would change nothing in an exported
    graph) and return the graph, as nn.Module's do (torchao's `allow_exported_model_train_eval` does not)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    was_training = model.training
    with warnings.catch_warnings(action="ignore"):
        graph = prepare_qat_pt2e(_export(model.train(), example).module(), _quantizer(is_qat=True))
    model.train(was_training)
    _drop_batch_counters(graph)

    def train(self, mode: bool = True):
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        self.training = mode
        return self

    graph.train = types.MethodType(train, graph)
    graph.eval = types.MethodType(lambda self: self.train(False), graph)
    graph.training = True
    return graph


def fake_quants(graph: nn.Module) -> list[nn.Module]:
    from torchao.quantization.pt2e import FakeQuantizeBase

    return [m for m in graph.modules() if isinstance(m, FakeQuantizeBase)]


def range_state(qat_graph: nn.Module) -> dict[str, torch.Tensor]:
    """What a QAT graph's state dict holds beyond the float model's weights: fake-quant scales, ranges, flags."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    # remove_duplicate=False: a graph may share one fake-quant between several names; the state dict lists all
    modules = qat_graph.named_modules(remove_duplicate=False)
    prefixes = tuple(f"{name}." for name, m in modules if isinstance(m, FakeQuantizeBase))
    state = qat_graph.state_dict()
    return {RANGE_PREFIX + k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefixes)}


@torch.no_grad()
def convert_qat(model: nn.Module, ranges: dict[str, torch.Tensor], example: torch.Tensor) -> torch.fx.GraphModule:
    """The INT8 model QAT trained for: `model`'s float weights with the ranges it learned (`range_state`), in the
    same graph as training, so the names match."""
    from torchao.quantization.pt2e import quantize_pt2e

    graph = prepare_qat(copy.deepcopy(model).cpu(), example.cpu())
    own = range_state(graph)
    if set(own) != set(ranges):
        missing, extra = sorted(set(own) - set(ranges)), sorted(set(ranges) - set(own))
        raise UserError(
            f"the checkpoint's QAT ranges do not fit this model's QAT graph (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): it was written by another version of kd, torchao or timm (kd before PT2E wrote FX "
            "ranges); export torch-int8-static instead"
        )
    graph.load_state_dict({k[len(RANGE_PREFIX) :]: v for k, v in ranges.items()}, strict=False)
    graph.eval()
    fold = mock.patch.object(quantize_pt2e, "_fold_conv_bn_qat", _fold_conv2d_bn)
    with warnings.catch_warnings(action="ignore"), fold:
        return quantize_pt2e.convert_pt2e(graph)


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: list[torch.Tensor]) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    float_model = copy.deepcopy(model).cpu().eval()  # BN folding must not touch `model`
    with warnings.catch_warnings(action="ignore"):
        prepared = prepare_pt2e(_export(float_model, calibration[0]).module(), _quantizer(is_qat=False))
        for image in torch.cat(calibration).split(1):  # one image per observer update: see _quantizer
            prepared(image)
        return convert_pt2e(prepared)


def save_int8(graph: torch.fx.GraphModule, example: torch.Tensor, path: Path) -> Path:
    """A converted graph (its unused float weights dropped) as a torch.export program with a dynamic batch."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:  # the float weights convert_pt2e replaced by int8 ones: export would store them too
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner), attr)
    graph.delete_all_unused_submodules()
    torch.export.save(_export(graph, example), str(path))
    return path


@contextlib.contextmanager
def frozen_observers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, fake-quantized modules keep (and use) their ranges: a QAT graph's observers otherwise keep
    updating in eval mode, and validation would move the ranges it trains with."""
    modules = fake_quants(model)
    enabled = [m.observer_enabled.clone() for m in modules]
    for module in modules:
        module.disable_observer()
        # scale and zero point from the observer's range (QAT's fused fake-quant trails it by one step), so that
        # validation, the checkpoint and convert_pt2e are the same INT8 model
        with torch.no_grad():
            scale, zero_point = module.calculate_qparams()
            module.scale.resize_(scale.shape).copy_(scale)
            module.zero_point.resize_(zero_point.shape).copy_(zero_point)
    try:
        yield model
    finally:
        for module, flag in zip(modules, enabled):
            module.observer_enabled.copy_(flag)


class QatPhase:
    """QAT from epoch round(qat_start_fraction × max_epochs) on: the loop enters it, validates and saves through it,
    and holds no QAT conditionals of its own. `task`: a TrainingTask (its `model`, and `set_model`)."""

    def __init__(self, cfg: TrainConfig, task: nn.Module, examples: Iterable[dict], precision: str, say=print):
        self.start = None if cfg.qat_start_fraction is None else round(cfg.qat_start_fraction * cfg.max_epochs)
        self.task, self.float_model, self.examples, self.say = task, task.model, examples, say
        self.active = False
        if self.start is not None and precision in ("fp16", "bf16"):  # bf16 too: from Accelerate's own setting
            raise UserError(
                f"qat_start_fraction cannot train under {precision} autocast: PyTorch's fake quantization takes "
                "float32 only. Set precision=no for a QAT run (null takes Accelerate's setting)."
            )
        if self.start is not None and input_keys(self.float_model) != ("rgb",):
            raise UserError("qat_start_fraction applies to RGB students; this model also takes MS input")

    def start_epoch(self, epoch: int) -> None:
        if self.start is not None and epoch >= self.start:
            self._enter()

    def resume(self, progress: dict) -> None:
        """Enter before a saved state loads when a step of the phase preceded it: the state is the QAT graph's."""
        if self.start is not None and (progress["epoch"], progress["batches_done"]) > (self.start, 0):
            self._enter()

    def _enter(self) -> None:
        if self.active:
            return
        example = next(iter(self.examples))["rgb"][:2]
        self.task.set_model(prepare_qat(self.float_model, example))
        self.active = True
        self.say("quantization-aware training from here on (fake-quantized INT8 weights and activations)")

    def validating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A float model as it is, without importing torchao (seconds, and a warning, in runs that never quantize)."""
        return frozen_observers(model) if self.active else contextlib.nullcontext(model)

    def ranges(self) -> dict[str, torch.Tensor] | None:
        return range_state(self.task.model) if self.active else None

    @property
    def safe_serialization(self) -> bool:
        """Not inside the phase: a QAT graph shares observers under several names, and safetensors keeps one name per
        shared tensor by a rule that differs between Accelerate's save and safetensors' load."""
        return not self.active
