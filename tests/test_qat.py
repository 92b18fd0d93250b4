"""kd/deploy/qat.py: the QAT phase the loop trains through (torchao PT2E), INT8 from the ranges QAT learned
(checkpointed, converted, exported as a torch.export program), and robust PTQ calibration."""

import functools

import pytest
import timm
import torch
import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
from torch import nn

import export
from kd.config import TrainConfig
from kd.data.dataset import InputSpec
from kd.deploy.formats import torch_export_runner
from kd.deploy.qat import (
    RANGE_PREFIX,
    QatPhase,
    convert_qat,
    fake_quants,
    frozen_observers,
    prepare_qat,
    quantize_int8,
    range_state,
)
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, checkpoint_ranges, load_checkpoint, save_checkpoint
from kd.train.task import Classifier

META = CheckpointMeta(
    {"name": "test_efficientnet", "num_classes": 3}, ["a", "b", "c"], InputSpec(32, [0.5] * 3, [0.25] * 3)
)
QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default


@functools.cache
def qat_trained(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A timm student (with head dropout) and its QAT graph with BN statistics and activation ranges learned as in
    training; the ranges are relearned in eval mode, since four training steps leave BN statistics far from the
    batch statistics. Built once (export and prepare take seconds); tests only read it (`convert_qat` copies)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=3, drop_rate=0.5)
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)  # clear logit gaps
    graph = prepare_qat(model, torch.randn(2, 3, 32, 32))
    for _ in range(4):
        graph(torch.randn(16, 3, 32, 32))
    graph.eval()
    for module in fake_quants(graph):
        module.activation_post_process.reset_min_max_vals()
    with torch.no_grad():
        for _ in range(4):
            graph(torch.randn(16, 3, 32, 32))
    return model.eval(), graph


def activation_quants(ranges: dict[str, torch.Tensor]) -> set[str]:
    """The fake-quant names (keys of `ranges` less ".scale") of activations: one scale, where weights have one per
    output channel."""
    return {k.removesuffix(".scale") for k, v in ranges.items() if k.endswith(".scale") and v.numel() == 1}


def test_convert_qat_gives_the_int8_model_the_fake_quantized_graph_emulates():
    model, graph = qat_trained()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), frozen_observers(graph):
        emulated = graph(x)  # torchao's own fake-quant emulation, independent of the conversion
        assert torch.equal(graph(x), emulated)  # eval: dropout off, ranges fixed
    int8 = convert_qat(model, range_state(graph), x[:1])
    with torch.no_grad():
        got, scale = int8(x), model(x).abs().mean()
        assert torch.equal(int8(x), got)  # no dropout in the INT8 model either
    error = (got - emulated).abs().mean() / scale
    assert error < 0.08  # a weight or activation a rounding step away propagates a little
    assert (got.argmax(1) == emulated.argmax(1)).float().mean() >= 0.9
    assert not any(n.target == torch.ops.aten.batch_norm.default for n in int8.graph.nodes)  # BN folded
    # the learned ranges are what converts: other ranges give another model
    squeezed = {
        k: v / 8
        if k.rsplit(".", 1)[0].removesuffix(".activation_post_process") in activation_quants(range_state(graph))
        and k.endswith(("min_val", "max_val", "scale"))
        else v
        for k, v in range_state(graph).items()
    }
    with torch.no_grad():
        assert (convert_qat(model, squeezed, x[:1])(x) - emulated).abs().mean() / scale > 3 * error


def test_ranges_that_do_not_fit_the_model_are_refused():
    model, graph = qat_trained()
    ranges = range_state(graph)
    del ranges[next(iter(ranges))]
    with pytest.raises(UserError, match="missing"):
        convert_qat(model, ranges, torch.randn(1, 3, 32, 32))


def test_qat_checkpoint_carries_the_ranges_and_still_loads_as_a_float_model(tmp_path):
    model, graph = qat_trained()
    path = save_checkpoint(tmp_path / "latest", model, META, range_state(graph))
    ranges = checkpoint_ranges(path)
    assert ranges and all(k.startswith(RANGE_PREFIX) for k in ranges)
    scales = {k: v for k, v in graph.state_dict().items() if k.endswith(".scale")}
    assert len(scales) == len(fake_quants(graph)) and {f"{RANGE_PREFIX}{k}" for k in scales} <= set(ranges)
    assert all(torch.equal(ranges[f"{RANGE_PREFIX}{k}"], v) for k, v in scales.items())
    loaded, _ = load_checkpoint(path)  # strict load of the float weights; the ranges are set aside
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert checkpoint_ranges(save_checkpoint(tmp_path / "plain", model, META)) == {}


def test_pt2e_export_parity_of_the_learned_ranges(tmp_path):
    """torch-int8-qat: a torch.export program whose activation scales are the ones QAT learned, that runs as the
    fake-quantized graph emulates, and that export.py checks against the float model like every format."""
    model, graph = qat_trained()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), frozen_observers(graph):
        emulated = graph(x)
    checkpoint = save_checkpoint(tmp_path / "latest", model, META, range_state(graph))
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.onnx"), "--latency-runs", "2"]
    report = export.main([*args, "--formats", "torch-int8-qat"])
    row = report["formats"]["torch-int8-qat"]
    assert row["file"].endswith("s_int8_qat.pt2") and row["status"] != "rejected"
    assert row["samples"] == 16 and row["top1_agreement"] >= 0.8  # the parity verdict against the float model
    program = torch.export.load(row["file"])
    learned = checkpoint_ranges(checkpoint)
    quantized = [n for n in program.graph.nodes if n.target == QUANTIZE]  # each activation's quantize op
    assert sorted({float(n.args[1]) for n in quantized}) == pytest.approx(
        sorted({float(learned[f"{name}.scale"]) for name in activation_quants(learned)}), rel=1e-6
    )
    int8 = torch_export_runner(row["file"])(x)  # the file, as evaluate.py runs it
    scale = model(x).abs().mean().item()
    assert abs(int8 - emulated.numpy()).mean() / scale < 0.08
    assert (int8.argmax(1) == emulated.argmax(1).numpy()).mean() >= 0.9


def test_export_of_torch_int8_qat_without_ranges_says_what_to_export(tmp_path, capsys):
    model, _ = qat_trained()
    checkpoint = save_checkpoint(tmp_path / "best", model, META)
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.onnx"), "--formats", "torch-int8-qat"])
    message = capsys.readouterr().err
    assert "holds no QAT ranges" in message and "latest.safetensors" in message and "torch-int8-static" in message


def test_qat_graph_drops_out_in_training_only():
    """timm's head calls F.dropout(training=self.training); export bakes in the train mode of export time, and
    graph.train() / .eval() switch it (the INT8 model never drops: the conversion test)."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3, drop_rate=0.5)
    graph = prepare_qat(model, torch.randn(2, 3, 32, 32))
    x = torch.randn(8, 3, 32, 32)
    graph(x)  # one training step's ranges
    assert not torch.equal(graph(x), graph(x))  # training: dropout on
    assert graph.eval() is graph and not graph.training
    with torch.no_grad(), frozen_observers(graph):
        assert torch.equal(graph(x), graph(x))  # eval: dropout off
    assert graph.train() is graph and graph.training
    assert not torch.equal(graph(x), graph(x))


def test_int8_conversion_stays_close_to_float():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    calibration = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    int8 = quantize_int8(model, calibration)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        assert (int8(x) - reference).abs().max() < 0.05 * reference.abs().max() + 0.02
    # INT8 weights stored as int8, activations quantized: not a float model
    buffers = dict(int8.named_buffers())
    weights = [buffers[n.target] for n in int8.graph.nodes if n.op == "get_attr" and n.target in buffers]
    assert sum(w.dtype == torch.int8 for w in weights) == 2  # the conv's and the linear's
    assert any(n.target == QUANTIZE for n in int8.graph.nodes)


def test_qat_graph_of_a_timm_student_folds_bn_and_is_batch_independent_in_eval():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)  # timm's BatchNormAct2d, as in real students
    graph = prepare_qat(model, torch.randn(2, 3, 32, 32))
    # conv + BN folded for QAT: the weight is scaled by gamma / running std before its fake quantization
    assert sum(n.target == torch.ops.aten.sqrt.default for n in graph.graph.nodes) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )
    assert {id(p) for p in graph.parameters()} == {id(p) for p in model.parameters()}
    assert {id(b) for b in model.buffers()} <= {id(b) for b in graph.buffers()}
    for _ in range(3):
        graph(torch.randn(8, 3, 32, 32))  # training steps set the BN statistics and the ranges
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert sum(m.scale.numel() > 1 for m in fake_quants(graph)) == convs  # each conv's weights, per channel
    graph.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad(), frozen_observers(graph):
        graph(x)
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    with torch.no_grad(), frozen_observers(graph):
        together, alone = graph(x)[:1], graph(x[:1])
    assert torch.allclose(together, alone, atol=1e-5)  # running statistics and fixed ranges, not the batch's
    assert all(torch.equal(v, graph.state_dict()[k]) for k, v in before.items())  # eval changed nothing
    assert all(m.observer_enabled.item() == 1 for m in fake_quants(graph))


def test_int8_conversion_of_a_timm_student_folds_every_batchnorm():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    int8 = quantize_int8(model, [torch.randn(8, 3, 32, 32) for _ in range(4)])
    assert not any("batch_norm" in str(n.target) for n in int8.graph.nodes)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the float model is left as it was


def test_qat_phase_enters_at_its_epoch_or_on_resuming_from_a_state_saved_inside_it():
    """qat_start_fraction 0.5 of 4 epochs: epoch 2 trains the QAT graph; a state saved at its very start (after
    epoch 1) is still the float model's, and loads before the phase is entered."""
    task = Classifier(timm.create_model("test_efficientnet", num_classes=3))
    float_model, said = task.model, []
    examples = [{"rgb": torch.randn(4, 3, 32, 32)}]
    qat = QatPhase(TrainConfig(max_epochs=4, qat_start_fraction=0.5), task, examples, "no", said.append)
    qat.start_epoch(1)
    qat.resume({"epoch": 2, "batches_done": 0})
    assert task.model is float_model and not qat.active and qat.ranges() is None and qat.safe_serialization
    qat.resume({"epoch": 2, "batches_done": 1})
    graph = task.model
    assert graph is not float_model and qat.active and not qat.safe_serialization and len(said) == 1
    assert {id(p) for p in graph.parameters()} == {id(p) for p in float_model.parameters()}
    assert qat.ranges().keys() == range_state(graph).keys()
    qat.start_epoch(3)
    assert task.model is graph and len(said) == 1  # entered once

    started = Classifier(timm.create_model("test_efficientnet", num_classes=3))
    QatPhase(TrainConfig(max_epochs=4, qat_start_fraction=0.5), started, examples, "no").start_epoch(2)
    assert "GraphModule" in type(started.model).__name__


def test_qat_phase_refuses_fp16_and_ms_students_and_is_inert_when_off():
    on, off = TrainConfig(max_epochs=4, qat_start_fraction=0.5), TrainConfig(max_epochs=4)
    task = Classifier(timm.create_model("test_efficientnet", num_classes=3))
    with pytest.raises(UserError, match="cannot train under fp16 autocast"):
        QatPhase(on, task, [], "fp16")
    hybrid = Classifier(nn.Identity())
    hybrid.model.input_keys = ("rgb", "ms")
    with pytest.raises(UserError, match="applies to RGB students"):
        QatPhase(on, hybrid, [], "no")
    qat = QatPhase(off, task, [], "fp16")
    float_model = task.model
    qat.resume({"epoch": 3, "batches_done": 1})
    qat.start_epoch(3)
    assert task.model is float_model and qat.ranges() is None and qat.safe_serialization
