"""Quantization-aware training and INT8 conversion of RGB students, through torchao's PT2E flow (torch.export, the
X86InductorQuantizer recipe: per-channel symmetric INT8 weights, UINT8 activations).

QAT exports the student (torch.export, train mode), folds conv + BN the QAT way and inserts fake quantization, so
the last epochs train against INT8 rounding. The prepared graph shares its parameters and BN statistics with the
float model, so the float model (what checkpoints store) keeps every update; checkpoints of the QAT phase also carry
the ranges it learned (`range_state`, under "qat."), and `convert_qat` turns weights and ranges into the INT8 model
QAT trained for; `QatPhase` is all the training loop knows of it. `quantize_int8` turns any float student into an
INT8 model by calibrating ranges instead (post-training quantization). Both return a converted PT2E graph:
quantize/dequantize ops around fp32 kernels, INT8 weights stored as int8; `save_int8` writes it as a torch.export
program (.pt2) that `torch.export.load` runs once torchao is imported (it registers the quantize ops).
"""

import contextlib
import copy
import dataclasses
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import TrainConfig
from kd.errors import UserError
from kd.models.checkpoint import RANGE_PREFIX
from kd.models.zoo import input_keys


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export and torchao warn about internals (deprecated pytree registrations, graph breaks they handle)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`model` exported for any batch size (the example is doubled: export specializes a batch of 1)."""
    pair = torch.cat([example[:1], example[:1]])
    with _quiet():
        return torch.export.export(model, (pair,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def _quantizer(is_qat: bool):
    """x86's PT2E recipe; post-training, activation ranges are a running average of per-image min/max.

    The recipe's HistogramObserver spreads 2048 bins over the widest value any calibration image reaches. On the
    demo student a few images (9 of 256) push deep activations 50-250x past the typical range, so the typical
    values share a handful of bins and INT8 accuracy collapsed (42% -> 25%, measured with torch.ao's FX flow, the
    same observer). Averaging each image's range (what QAT's observers do during training) keeps the range where
    almost every image lives: 43% on the same student.
    """
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    if not is_qat:
        observer = MovingAverageMinMaxObserver.with_args(averaging_constant=0.1, eps=2**-12)
        activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer)
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    return X86InductorQuantizer().set_global(config)


def _fold_conv2d_bn(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's `_fold_conv_bn_qat`, for the one kind of convolution kd's students have (conv2d, on the CPU).

    convert_pt2e matches every QAT conv+BN variant it knows (conv1d/2d/transposed, CPU and CUDA): 96 pattern
    exports, about a minute on a 2-core machine whatever the model. Only the 24 of conv2d can match here (export
    runs on the CPU). Also drops BN's num_batches_tracked increments, which torchao removes only for modules whose
    class is exactly BatchNorm2d (timm's BatchNormAct2d is a subclass).
    """
    from torchao.quantization.pt2e.qat_utils import _fold_conv_bn_qat_helper

    example = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), *(torch.randn(1) for _ in range(4)))
    graph = _fold_conv_bn_qat_helper(graph, F.conv2d, example, is_cuda=False)
    _drop_batch_counters(graph)
    return graph


def _drop_batch_counters(graph: torch.fx.GraphModule) -> None:
    """Remove BN's `num_batches_tracked += 1`: an exported graph runs it in train and eval mode alike (the
    counter only matters for momentum=None, which timm does not use), so eval would change the model's state."""
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


def _train_eval(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`graph.train()` / `.eval()` switch its dropout and batch norm ops (torchao's move_exported_model_to_train /
    _eval): an exported graph has the ops of export time, and nn.Module.train would change nothing. Both return
    the graph, as nn.Module's do (torchao's own `allow_exported_model_train_eval` returns None)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    def train(self, mode: bool = True):
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        self.training = mode
        return self

    graph.train = types.MethodType(train, graph)
    graph.eval = types.MethodType(lambda self: self.train(False), graph)
    return graph


def prepare_qat(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """A fake-quantized training graph of `model` (train mode, any batch size) that shares its parameters and
    buffers (the optimizer keeps working, BN statistics update the float model's)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    was_training = model.training
    with _quiet():
        graph = prepare_qat_pt2e(_export(model.train(), example).module(), _quantizer(is_qat=True))
    model.train(was_training)
    _drop_batch_counters(graph)
    graph = _train_eval(graph)
    graph.training = True
    return graph


def fake_quants(graph: nn.Module) -> list[nn.Module]:
    from torchao.quantization.pt2e import FakeQuantizeBase

    return [m for m in graph.modules() if isinstance(m, FakeQuantizeBase)]


def range_state(qat_graph: nn.Module) -> dict[str, torch.Tensor]:
    """The learned quantization state of a QAT graph (fake-quant scales, zero points, flags, observer ranges):
    what its state dict holds beyond the float model's weights, which it shares."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    # remove_duplicate=False: a graph may share one fake-quant between several names; the state dict lists all
    modules = qat_graph.named_modules(remove_duplicate=False)
    prefixes = tuple(f"{name}." for name, m in modules if isinstance(m, FakeQuantizeBase))
    state = qat_graph.state_dict()
    return {RANGE_PREFIX + k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefixes)}


def _synced(graph: nn.Module) -> None:
    """Each fake-quant's scale and zero point set from its observer's range. QAT's fused fake-quant computes them
    before the step's range update, so they trail the range by one step; convert_pt2e uses the range, and so do
    validation and the checkpoint, so all three are the same INT8 model."""
    with torch.no_grad():
        for module in fake_quants(graph):
            scale, zero_point = module.calculate_qparams()
            module.scale.resize_(scale.shape).copy_(scale)
            module.zero_point.resize_(zero_point.shape).copy_(zero_point)


@torch.no_grad()
def convert_qat(model: nn.Module, ranges: dict[str, torch.Tensor], example: torch.Tensor) -> torch.fx.GraphModule:
    """The INT8 model QAT trained for: `model`'s float weights with the ranges the QAT graph learned (`range_state`
    of a checkpoint), not ranges calibrated afresh. Rebuilds the same graph as training, so the names match."""
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
    with _quiet(), mock.patch.object(quantize_pt2e, "_fold_conv_bn_qat", _fold_conv2d_bn):
        return quantize_pt2e.convert_pt2e(graph)


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: list[torch.Tensor]) -> torch.fx.GraphModule:
    """Post-training static INT8: per-channel weights, activation ranges averaged over the calibration images."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    float_model = copy.deepcopy(model).cpu().eval()  # BN folding must not touch `model`
    with _quiet():
        prepared = prepare_pt2e(_export(float_model, calibration[0]).module(), _quantizer(is_qat=False))
        for image in torch.cat(calibration).split(1):  # one image per observer update: see _quantizer
            prepared(image)
        return convert_pt2e(prepared)


def save_int8(graph: torch.fx.GraphModule, example: torch.Tensor, path: Path) -> Path:
    """A converted graph (changed: its unused float weights are dropped) as a torch.export program, dynamic batch:
    `torch.export.load(path).module()` runs it without kd or timm (after `import torchao.quantization.pt2e`, which
    registers its quantize ops)."""
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
    """Within the block, fake-quantized modules keep their ranges (and use them: `_synced`). A QAT graph's observers
    otherwise keep updating in eval mode, so validation would depend on the batches it sees and move the ranges it
    trains with."""
    modules = fake_quants(model)
    enabled = [m.observer_enabled.clone() for m in modules]
    for module in modules:
        module.disable_observer()
    _synced(model)
    try:
        yield model
    finally:
        for module, flag in zip(modules, enabled):
            module.observer_enabled.copy_(flag)


class SwapsModel(Protocol):
    """What QatPhase needs of the task it trains (kd/train/task.py TrainingTask is one): its model, and a way to
    swap the QAT graph in."""

    @property
    def model(self) -> nn.Module: ...

    def set_model(self, module: nn.Module) -> None: ...


class QatPhase:
    """Quantization-aware training from epoch round(qat_start_fraction × max_epochs) on (never when the fraction is
    null): the loop enters it, validates and saves through it, and holds no QAT conditionals of its own."""

    def __init__(
        self,
        cfg: TrainConfig,
        task: SwapsModel,
        examples: Iterable[dict],
        precision: str,
        say: Callable[[str], None] = print,
    ):
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
        """Enter the phase when `epoch` is in it: its steps train the fake-quantized graph."""
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
        """A QAT graph is measured with the ranges it trained with (`frozen_observers`); a float model as it is
        (without importing torchao: seconds, and a torch warning, in every run that never quantizes)."""
        return frozen_observers(model) if self.active else contextlib.nullcontext(model)

    def ranges(self) -> dict[str, torch.Tensor] | None:
        """What checkpoints carry beside the float weights inside the phase: the ranges export.py's torch-int8-qat
        converts with (`range_state`)."""
        return range_state(self.task.model) if self.active else None

    @property
    def safe_serialization(self) -> bool:
        """Whether the resumable state can be safetensors. A QAT graph reuses observers under several names, and
        safetensors keeps one name per shared tensor by a rule that differs between Accelerate's save and
        safetensors' load."""
        return not self.active
