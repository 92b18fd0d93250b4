"""Deployment formats of an RGB student: a writer and a runner per file type, and FORMATS, the table of them. Every
runner takes a normalized N×3×H×W torch batch and returns float32 numpy logits, so export.py checks each format
against PyTorch the same way. TFLite needs the optional litert-torch (requirements-export.txt)."""

import copy
import json
import tempfile
import types
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
from torch import nn

from kd.deploy.qat import convert_qat, quantize_int8, save_int8
from kd.deploy.timm_folder import TimmCard, save_timm_folder
from kd.errors import UserError, quote
from kd.models.checkpoint import EXPORT_KEYS, CheckpointMeta

Runner = Callable[[torch.Tensor], np.ndarray]
TFLITE_MISSING = (
    "TFLite export needs litert-torch, which is not installed: run `make export-deps` "
    "(or `pip install -r requirements-export.txt`, about 1 GB: litert-torch pulls in jax, transformers and torchao)"
)


@dataclass
class ExportInputs:
    model: nn.Module  # the checkpoint's RGB model
    meta: CheckpointMeta
    calibration: list[torch.Tensor]  # normalized RGB batches: the INT8 ranges, and the example input
    onnx_path: Path  # the fp32 ONNX file, written first: the ONNX Runtime quantizers start from it
    ranges: dict  # the INT8 ranges a QAT run learned; {} without QAT
    opset: int = 18
    timm_card: TimmCard | None = None

    @property
    def example(self) -> torch.Tensor:
        return self.calibration[0][:1]


@dataclass(frozen=True)
class Format:
    ending: str  # the file (the timm format: folder) is <stem><ending>, beside <stem>.onnx and the sidecar <stem>.json
    write: Callable[[ExportInputs, Path], Path]
    runner: Callable[[Path], Runner]
    kind: str  # what runs the file, as results.json and export_report.json name it
    runtime: str  # the kind as the results table writes it
    fp32: str | None = None  # INT8 formats: the fp32 row of export.py's report their speed-up is measured against

    @property
    def suffix(self) -> str:
        return Path(f"x{self.ending}").suffix


def export_path(out: Path, name: str) -> Path:
    """exports/student.onnx -> exports/student_int8_qat.pt2"""
    return out.with_name(out.with_suffix("").name + FORMATS[name].ending)


def sidecar_path(path: Path) -> Path:
    """exports/student_int8_static.pt2 -> exports/student.json"""
    for ending in sorted((f.ending for f in FORMATS.values()), key=len, reverse=True):
        if path.name.endswith(ending):
            return path.with_name(path.name[: -len(ending)] + ".json")
    return path.with_suffix(".json")


def _traced(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings(action="ignore"):  # torch.jit is deprecated upstream; still the no-code format
        torch.jit.save(torch.jit.trace(module, example), str(path))
    return path


def _set_metadata(path: Path, meta: CheckpointMeta) -> None:
    """Classes, input size and normalization in the ONNX file itself (the quantizers drop them)."""
    proto, flat = onnx.load(str(path)), meta.to_json(exported=True)
    onnx.helper.set_model_props(proto, {key: json.dumps(flat[key]) for key in EXPORT_KEYS})
    onnx.save(proto, str(path))


def write_onnx(src: ExportInputs, path: Path) -> Path:
    size = src.meta.input_spec.image_size
    with warnings.catch_warnings(action="ignore"):
        torch.onnx.export(
            src.model.eval(),
            (torch.randn(2, 3, size, size),),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=src.opset,
            input_names=["rgb"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    _set_metadata(path, src.meta)
    return path


def write_torchscript(src: ExportInputs, path: Path) -> Path:
    return _traced(src.model.eval(), src.example, path)


def write_torch_int8_static(src: ExportInputs, path: Path) -> Path:
    return save_int8(quantize_int8(src.model, src.calibration), src.example, path)


def write_torch_int8_qat(src: ExportInputs, path: Path) -> Path:
    return save_int8(convert_qat(src.model, src.ranges, src.example), src.example, path)


def write_torch_int8_dynamic(src: ExportInputs, path: Path) -> Path:
    """INT8 weights for nn.Linear only (no Conv kernel exists). torch.ao's eager quantize_dynamic: its fbgemm kernel
    is the point (1.3x eager's speed), and PT2E's dynamic recipe gives a reference graph without it."""
    model = copy.deepcopy(src.model).eval()
    return _traced(torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), src.example, path)


def _prepared(onnx_path: Path, folder: str) -> str:
    """Shapes inferred and the graph folded, as ORT's quantizers want (they fail on the raw dynamo graph)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = str(Path(folder) / "prepared.onnx")
    quant_pre_process(str(onnx_path), prepared)
    return prepared


def write_onnx_int8_dynamic(src: ExportInputs, path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(_prepared(src.onnx_path, tmp), str(path), weight_type=QuantType.QInt8)
    _set_metadata(path, src.meta)
    return path


def write_onnx_int8_static(src: ExportInputs, path: Path) -> Path:
    """QDQ, per-channel INT8 weights, UINT8 activations: the settings that measured fastest (per-tensor weights,
    reduce_range, INT8 activations, QOperator or Conv only were slower). Ranges are a moving average of per-image
    min/max, as in qat.py's PTQ: on the demo student top-1 agreement 0.93, 0.86 with ORT's overall min/max."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    batches = iter([{"rgb": image.numpy()} for image in torch.cat(src.calibration).split(1)])
    reader = types.SimpleNamespace(get_next=lambda: next(batches, None))  # ORT's CalibrationDataReader protocol
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(
            _prepared(src.onnx_path, tmp),
            str(path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"CalibMovingAverage": True, "CalibMovingAverageConstant": 0.1},
        )
    _set_metadata(path, src.meta)
    return path


def require_litert() -> types.ModuleType:
    try:
        import litert_torch
    except ImportError:
        raise UserError(TFLITE_MISSING) from None
    litert_torch.config.show_progress = False  # dozens of progress lines per conversion
    return litert_torch


def write_tflite(src: ExportInputs, path: Path) -> Path:
    """Batch size fixed at 1."""
    litert_torch = require_litert()
    litert_torch.convert(src.model.eval(), (src.example,)).export(str(path))
    return path


def write_tflite_int8(src: ExportInputs, path: Path) -> Path:
    """PT2E static quantization with litert-torch's quantizer, then converted; inputs and outputs are INT8 too."""
    litert_torch = require_litert()
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(config)
    batch = torch.export.Dim("batch", min=1)  # calibrate whole batches; the file itself gets batch 1
    with warnings.catch_warnings(action="ignore"):
        graph = torch.export.export(
            copy.deepcopy(src.model).eval(), (src.calibration[0],), dynamic_shapes=({0: batch},)
        )
        prepared = prepare_pt2e(graph.module(), quantizer)
        with torch.no_grad():
            for images in src.calibration:
                prepared(images)
        quantized = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=False))
        converted = litert_torch.convert(quantized, (src.example,), quant_config=QuantConfig(quantizer))
        converted.export(str(path))
    return path


def format_of(path: Path) -> Format:
    """The row that reads `path`, by its file type (a folder: timm). Rows that share a suffix share their kind and
    runner (tests/test_export.py checks it)."""
    suffix = "" if path.is_dir() else path.suffix
    found = next((f for f in FORMATS.values() if f.suffix == suffix), None)
    return found or FORMATS["torchscript"]  # kd's TorchScript files of any name: torch.jit.load says if not one


def kind(path: Path) -> str:
    return format_of(path).kind


def runner(path: Path) -> Runner:
    return format_of(path).runner(path)


def torch_runner(module: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).float().numpy()

    return run


def torchscript_runner(path: Path) -> Runner:
    """A torch.save file (a pickle) is refused before anything reads it: unpickling it could run code."""
    try:
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        scripted = False
    if not scripted:
        raise UserError(
            f"{quote(str(path))} is not a TorchScript file (no code/ inside: e.g. a torch.save'd state dict or "
            "model). Pass the kd checkpoint (.safetensors + .json) instead, or the .pt that export.py writes"
        )
    with warnings.catch_warnings(action="ignore"):
        return torch_runner(torch.jit.load(str(path), map_location="cpu").eval())


def torch_export_runner(path: Path) -> Runner:
    import torchao.quantization.pt2e  # noqa: F401 (registers the quantize ops of PT2E INT8 graphs)

    with warnings.catch_warnings(action="ignore"):
        return torch_runner(torch.export.load(str(path)).module())


def write_timm(src: ExportInputs, path: Path) -> Path:
    return save_timm_folder(src.model, src.meta, path, src.timm_card)


def timm_runner(path: Path) -> Runner:
    """The folder loaded by timm alone, as a user would."""
    return torch_runner(timm.create_model(f"local-dir:{path}", pretrained=True).eval())


def onnx_runner(path: Path) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as PyTorch
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name  # "rgb" in export.py's files; anything in other ONNX classifiers
    return lambda x: session.run(None, {name: x.numpy()})[0]


def tflite_runner(path: Path) -> Runner:
    """One image at a time (the file has batch 1); INT8 inputs and outputs (de)quantized as the file says."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise UserError(TFLITE_MISSING) from None
    interpreter = Interpreter(model_path=str(path), num_threads=torch.get_num_threads())
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()

    def one(image: np.ndarray) -> np.ndarray:
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            image = np.clip(np.round(image / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], image)
        interpreter.invoke()
        logits = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            logits = (logits.astype(np.float32) - zero) * scale
        return logits

    return lambda x: np.concatenate([one(image[None]) for image in x.numpy()])


FORMATS = {
    "onnx": Format(".onnx", write_onnx, onnx_runner, "onnx", "ONNX"),
    "torchscript": Format(".pt", write_torchscript, torchscript_runner, "torchscript", "TorchScript"),
    "tflite": Format(".tflite", write_tflite, tflite_runner, "tflite", "TFLite"),
    "timm": Format("_timm", write_timm, timm_runner, "timm", "timm"),  # a folder: config.json, weights, README.md
    "onnx-int8-static": Format("_int8_static.onnx", write_onnx_int8_static, onnx_runner, "onnx", "ONNX", "onnx"),
    "onnx-int8-dynamic": Format("_int8_dynamic.onnx", write_onnx_int8_dynamic, onnx_runner, "onnx", "ONNX", "onnx"),
    "torch-int8-static": Format(
        "_int8_static.pt2", write_torch_int8_static, torch_export_runner, "torch.export", "torch.export", "pytorch"
    ),
    "torch-int8-dynamic": Format(
        "_int8_dynamic.pt", write_torch_int8_dynamic, torchscript_runner, "torchscript", "TorchScript", "pytorch"
    ),
    "torch-int8-qat": Format(
        "_int8_qat.pt2", write_torch_int8_qat, torch_export_runner, "torch.export", "torch.export", "pytorch"
    ),
    "tflite-int8": Format("_int8.tflite", write_tflite_int8, tflite_runner, "tflite", "TFLite", "tflite"),
}
