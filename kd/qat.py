"""Quantization-aware training and INT8 conversion of RGB students (PyTorch FX graph mode, x86/fbgemm or qnnpack).

QAT fuses conv + BN and inserts fake quantization, so the last epochs train against INT8 rounding. The prepared
graph shares its parameters and BN statistics with the float model, so the float model (what checkpoints store)
keeps every update; checkpoints of the QAT phase also carry the ranges it learned (`range_state`, under "qat."),
and `convert_qat` turns weights and ranges into the INT8 model QAT trained for; `QatPhase` is all the training loop
knows of it. `quantize_int8` turns any float student into an INT8 model by calibrating ranges instead (post-training
quantization).
"""

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import TrainConfig
from kd.errors import UserError
from kd.models import input_keys
from kd.task import TrainingTask

BACKEND = "x86"  # fbgemm kernels for x86 servers and laptops; "qnnpack" for ARM phones


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns on every call that it moves to torchao; say it once in README instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torchao.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")
        yield


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

    with _quiet():
        graph = prepare_qat_fx(plain_norm_act(model).train(), get_default_qat_qconfig_mapping(backend), (example,))
    return runtime_dropout(graph)


def runtime_dropout(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each `F.dropout` call of `graph` becomes an nn.Dropout module, which asks `self.training` at run time.

    timm heads call F.dropout(x, p, training=self.training) inline, and FX bakes the flag of trace time into the
    call: a QAT graph, traced in train mode, would keep dropping activations in eval (validation) and in the INT8
    model converted from it.
    """
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target is not F.dropout:
            continue
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        graph.add_submodule(f"{node.name}_module", nn.Dropout(p))
        with graph.graph.inserting_after(node):
            module_call = graph.graph.call_module(f"{node.name}_module", (node.args[0],))
        node.replace_all_uses_with(module_call)
        graph.graph.erase_node(node)
    graph.recompile()
    return graph


RANGE_PREFIX = "qat."  # checkpoint keys of the QAT graph's quantization state, beside the float weights


def range_state(qat_graph: nn.Module) -> dict[str, torch.Tensor]:
    """The learned quantization state of a QAT graph (fake-quant scales, zero points, flags, observer ranges):
    what its state dict holds beyond the float model's weights, which it shares."""
    from torch.ao.quantization import FakeQuantizeBase

    # remove_duplicate=False: FX shares one observer between several names, and the state dict lists all of them
    modules = qat_graph.named_modules(remove_duplicate=False)
    prefixes = tuple(f"{name}." for name, m in modules if isinstance(m, FakeQuantizeBase))
    state = qat_graph.state_dict()
    return {RANGE_PREFIX + k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefixes)}


@torch.no_grad()
def convert_qat(
    model: nn.Module, ranges: dict[str, torch.Tensor], example: torch.Tensor, backend: str = BACKEND
) -> nn.Module:
    """The INT8 model QAT trained for: `model`'s float weights with the ranges the QAT graph learned (`range_state`
    of a checkpoint), not ranges calibrated afresh. Rebuilds the same graph as training, so the names match."""
    from torch.ao.quantization.quantize_fx import convert_fx

    graph = prepare_qat(copy.deepcopy(model), example, backend)
    own = range_state(graph)
    if set(own) != set(ranges):
        missing, extra = sorted(set(own) - set(ranges)), sorted(set(ranges) - set(own))
        raise UserError(
            f"the checkpoint's QAT ranges do not fit this model's QAT graph (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): it was written by another version of kd or timm; export torch-int8-static instead"
        )
    graph.load_state_dict({k[len(RANGE_PREFIX) :]: v for k, v in ranges.items()}, strict=False)
    with _quiet():
        torch.backends.quantized.engine = backend
        return convert_fx(graph.eval())


def _calibration_qconfig(backend: str):
    """The backend's default qconfig, but activation ranges are a running average of per-image min/max.

    The default HistogramObserver spreads 2048 bins over the widest value any calibration image reaches. On the
    demo student a few images (9 of 256) push deep activations 50-250x past the typical range, so the typical
    values share a handful of bins and INT8 accuracy collapsed (42% -> 25%). Averaging each image's range (what QAT's
    observers do during training) keeps the range where almost every image lives: 43% on the same student.
    """
    from torch.ao.quantization import MovingAverageMinMaxObserver, QConfig, get_default_qconfig

    default = get_default_qconfig(backend)
    reduce_range = default.activation().reduce_range
    activation = MovingAverageMinMaxObserver.with_args(reduce_range=reduce_range, averaging_constant=0.1)
    return QConfig(activation=activation, weight=default.weight)


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: list[torch.Tensor], backend: str = BACKEND) -> nn.Module:
    """Post-training static INT8: per-channel weights, activation ranges averaged over the calibration images."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with _quiet():
        torch.backends.quantized.engine = backend
        float_model = plain_norm_act(copy.deepcopy(model)).eval()  # fusion must not touch `model`
        mapping = get_default_qconfig_mapping(backend).set_global(_calibration_qconfig(backend))
        prepared = prepare_fx(float_model, mapping, (calibration[0],))
        for image in torch.cat(calibration).split(1):  # one image per observer update: see _calibration_qconfig
            prepared(image)
        return convert_fx(prepared)


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


class QatPhase:
    """Quantization-aware training from epoch round(qat_start_fraction × max_epochs) on (never when the fraction is
    null): the loop enters it, validates and saves through it, and holds no QAT conditionals of its own."""

    def __init__(
        self,
        cfg: TrainConfig,
        task: TrainingTask,
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
        """A QAT graph is measured with the ranges it trained with (`frozen_observers`); a float model as it is."""
        return frozen_observers(model)

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
