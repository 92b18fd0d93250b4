"""Issue 21: a teacher cache build deletes only what a build wrote, sizes claimed by small files are checked before
anything is allocated, damaged caches, odd files and overflowing weights get one clear message, never a traceback
(or a wiped folder, a bus error, a hang)."""

import errno
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from torch.utils.data import Dataset

import distill
import evaluate
import kd.distill.cache
import kd.distill.cache_build
from kd.config import ConfigError, load_config
from kd.data.dataset import InputSpec
from kd.deploy.inference import _arch_parameters, load_model, read_json_object
from kd.distill.cache import TeacherCache
from kd.distill.cache_build import build_teacher_cache
from kd.distill.teachers import normalize_weights
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, load_checkpoint, meta_problems, save_checkpoint
from kd.models.timm_models import create_timm
from kd.models.zoo import build_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CLASSES, SAMPLES, K, REBUILD = 5, 6, 3, "python distill.py --config c.yaml --cache-teacher"
KEY = {"format": 1, "samples": {"count": SAMPLES}, "top_k": K, "num_classes": CLASSES}


class Views(Dataset):
    """SAMPLES views per epoch, keyed as kd.data.dataset's loader keys them (epoch * N + sample)."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, key: int) -> dict:
        return {"key": torch.tensor(key)}


def logits_of(batch: dict) -> torch.Tensor:
    return torch.stack([torch.arange(CLASSES, dtype=torch.float32) * (1 + k) for k in batch["key"].tolist()])


def build(path: Path, epochs: int = 2) -> Path:
    return build_teacher_cache(Accelerator(cpu=True), path, KEY, logits_of, Views(), epochs, batch_size=4)


# ------------------------------------------------------------------------------ --cache-teacher wipes the folder


def teacher_run_folder(path: Path) -> list[str]:
    """A teacher's run folder as train_teacher.py leaves it, and a file of the user's."""
    for name in ("best.safetensors", "best.json", "latest.safetensors", "latest.json", "config.yaml", "notes.txt"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(name)
    for folder in ("last", "tb"):
        (path / folder).mkdir()
        (path / folder / "x").write_text("x")
    return sorted(p.name for p in path.iterdir())


def test_cache_teacher_refuses_a_folder_holding_other_files_and_deletes_nothing(tmp_path):
    before = teacher_run_folder(tmp_path / "teacher")
    with pytest.raises(UserError) as error:
        build(tmp_path / "teacher")
    message = str(error.value)
    assert f"{tmp_path / 'teacher'} holds files a teacher cache build did not write" in message
    assert "'best.json'" in message and "'notes.txt'" in message and "pick an empty or new folder" in message
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == before
    assert (tmp_path / "teacher/last/x").read_text() == "x"


def test_distill_cache_teacher_into_the_teachers_run_folder_exits_2_and_keeps_it(tiny_demo, tmp_path, capsys):
    """Issue 21 as reported: distillation.teacher_cache=<the teacher's run folder> --cache-teacher."""
    teacher = tmp_path / "teacher"
    before = teacher_run_folder(teacher)
    classes = sorted(p.name for p in (tiny_demo / "train").iterdir())
    hybrid_checkpoint(teacher / "best", classes)  # a real teacher of this data: the run gets as far as the build
    args = ["--config", str(Path(distill.__file__).parent / "configs/b0.yaml"), f"data.root={tiny_demo}"]
    args += ["data.demo=false", "data.image_size=32", "data.num_workers=0", "distillation.feature_matching=false"]
    args += ["distillation.student_backbone=test_efficientnet", "distillation.student_pretrained=null"]
    args += [f"distillation.teacher_checkpoint={teacher / 'best.safetensors'}", "distillation.precision=null"]
    args += [f"distillation.teacher_cache={teacher}", "distillation.max_epochs=1", "distillation.warmup_epochs=0"]
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:
        distill.main([*args, "--cache-teacher"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: distillation.teacher_cache: {teacher} holds files" in err
    assert "'notes.txt'" in err and "Traceback" not in err
    assert sorted(p.name for p in teacher.iterdir()) == before
    assert (teacher / "best.json").is_file() and (teacher / "tb/x").is_file()


def test_cache_teacher_refuses_a_staging_folder_or_a_meta_less_folder_of_others(tmp_path):
    (tmp_path / "cache.tmp").mkdir()
    (tmp_path / "cache.tmp/notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"cache\.tmp holds files a teacher cache build did not write \(\['notes"):
        build(tmp_path / "cache")
    assert (tmp_path / "cache.tmp/notes.txt").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other/values.npy").write_text("not a cache's")  # a cache's name, but no meta.json proves it
    with pytest.raises(UserError, match=r"holds no valid teacher cache meta.json \(there is none\), so its files"):
        build(tmp_path / "other")
    assert (tmp_path / "other/values.npy").read_text() == "not a cache's"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder: pick an empty or new folder"):
        build(tmp_path / "file")


def test_a_stale_cache_is_rebuilt_in_place_and_an_empty_folder_is_used(tmp_path):
    build(tmp_path / "cache", epochs=1)
    build(tmp_path / "cache", epochs=2)  # stale: fewer epochs, so rebuilt
    assert json.loads((tmp_path / "cache/meta.json").read_text())["epochs"] == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(kd.distill.cache_build.CACHE_FILES)
    assert not (tmp_path / "cache.tmp").exists()
    (tmp_path / "empty").mkdir()
    build(tmp_path / "empty")
    cache = TeacherCache.open(tmp_path / "empty", KEY, 2, REBUILD)
    assert cache.logits(torch.tensor([7]))[0, 2:].tolist() == [16.0, 24.0, 32.0]  # key 7's top 3: 8 x (2, 3, 4)


# ------------------------------------------------------------------------------------------------- full disk


class Usage:
    free = 10  # bytes


def test_a_disk_without_room_for_the_cache_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(kd.distill.cache_build.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(UserError) as error:
        build(tmp_path / "cache")
    needed = 2 * SAMPLES * kd.distill.cache.bytes_per_row(K, CLASSES)
    message = str(error.value)
    assert f"not enough free disk space for the teacher cache in {tmp_path}: it needs {needed:,} bytes" in message
    assert not (tmp_path / "cache.tmp").exists()


def test_a_write_error_during_the_build_names_the_folder_and_the_bytes(tmp_path, monkeypatch):
    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kd.distill.cache_build, "open_memmap", full)
    with pytest.raises(UserError) as error:
        build(tmp_path / "cache")
    needed = 2 * SAMPLES * kd.distill.cache.bytes_per_row(K, CLASSES)
    message = str(error.value)
    assert f"could not write the teacher cache in {tmp_path / 'cache.tmp'} (No space left on device)" in message
    assert f"it needs {needed:,} bytes there" in message


# ------------------------------------------------------------------------------------------ a damaged cache


@pytest.fixture
def cache(tmp_path) -> Path:
    return build(tmp_path / "cache")


def npy_header_only(path: Path, shape: tuple) -> None:
    """A .npy file of a header alone that claims an array of `shape` (93 GiB for the one below)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": shape})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "meta.json").write_text("{not json"), "meta.json is damaged (not valid JSON"),
        (lambda c: (c / "meta.json").write_text("[]"), "meta.json is damaged (it holds no cache key)"),
        (
            lambda c: np.save(c / "values.npy", np.array([{}] * 12 * K, dtype=object).reshape(12, K)),
            "values.npy is damaged: it holds object values, not float16",
        ),
        (
            lambda c: np.save(c / "indices.npy", np.zeros((5, K), np.int16)),
            "indices.npy is damaged: its shape is (5, 3), not (12, 3) (meta.json: 6 samples x 2 epochs, top-3)",
        ),
        (
            lambda c: npy_header_only(c / "log_rest.npy", (50_000_000_000,)),
            "log_rest.npy is damaged: its header claims 100,000,000,128 bytes, but the file holds 128",
        ),
        (lambda c: (c / "values.npy").write_bytes(b"\x93NUMPY garbage"), "values.npy is damaged: it is not a readable"),
    ],
)
def test_a_damaged_cache_is_refused_when_opened_with_the_file_and_the_rebuild(cache, damage, message):
    damage(cache)
    with pytest.raises(UserError) as error:
        TeacherCache.open(cache, KEY, 2, REBUILD)
    assert message in str(error.value) and REBUILD in str(error.value)


def test_a_cache_array_that_is_a_fifo_is_refused_without_opening_it(cache):
    (cache / "values.npy").unlink()
    os.mkfifo(cache / "values.npy")
    with pytest.raises(UserError, match=r"values.npy is damaged: it is a FIFO \(named pipe\), not a regular file"):
        TeacherCache.open(cache, KEY, 2, REBUILD)


# ------------------------------------------------------------------------------ sizes claimed by a small file

HYBRID = {"name": "hybrid", "num_classes": 5, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
SPEC = InputSpec(32, [0.5] * 3, [0.25] * 3, [0.0] * 5, [1.0] * 5)


def hybrid_checkpoint(path: Path, classes: tuple[str, ...] = tuple("abcde"), **json_changes) -> Path:
    save_checkpoint(path, build_model(HYBRID), CheckpointMeta(HYBRID, list(classes), SPEC))
    meta = json.loads(path.with_suffix(".json").read_text())
    for dotted, value in json_changes.items():
        *parents, last = dotted.split("__")
        node = meta
        for parent in parents:
            node = node[parent]
        node[last] = value
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path.with_suffix(".safetensors")


def test_an_arch_claiming_more_than_the_weights_hold_is_refused_before_allocating(tmp_path):
    # 10^15 bands: a band adapter of 12 PB, more than any address space: building it for real fails (or, at 10^8,
    # takes 1.9 GB) before the weights are compared; the safetensors header says 5 bands
    path = hybrid_checkpoint(tmp_path / "best", arch__ms_channels=10**15)
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    assert "size mismatch for band_adapter.0.weight: copying a param with shape torch.Size([3, 5, 1, 1])" in str(
        error.value
    )


def test_evaluate_refuses_such_a_checkpoint_in_one_line(tmp_path, capsys):
    path = hybrid_checkpoint(tmp_path / "best", arch__ms_channels=10**15)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--demo", "--models", f"t={path}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: weights in") and "Traceback" not in err


def test_a_valid_checkpoint_loads_as_before(tmp_path):
    path = hybrid_checkpoint(tmp_path / "best")
    model, meta = load_checkpoint(path)
    assert meta.arch == HYBRID and model.band_adapter[0].weight.shape == (3, 5, 1, 1)


def test_an_exported_files_arch_is_counted_without_allocating():
    meta = CheckpointMeta({**HYBRID, "ms_channels": 10**15}, list("abcde"), SPEC)
    assert _arch_parameters(meta) > 3 * 10**15


def test_image_size_is_bounded_in_the_config_and_in_checkpoints():
    with pytest.raises(ConfigError, match=r"data.image_size must be in \[8, 4096\] \(pixels a side\) or null, got 1"):
        load_config(None, ["data.image_size=100000"])
    assert load_config(None, ["data.image_size=4096"]).data.image_size == 4096
    meta = {"arch": HYBRID, "classes": list("abcde"), "inputs": ["rgb", "ms"], "image_size": 100000}
    meta |= {"mean": [0.5] * 3, "std": [0.2] * 3, "ms_mean": [0.0] * 5, "ms_std": [1.0] * 5}
    assert "image_size must be a positive integer (pixels), at most 4096, got 100000" in meta_problems(meta)


# ------------------------------------------------------------------------------------------- teacher weights


def test_teacher_weights_that_overflow_when_normalized_are_refused():
    teachers = "distillation.teachers=[{checkpoint: a, weight: 1e308}, {checkpoint: b, weight: 1e308}]"
    with pytest.raises(ConfigError) as error:
        load_config(None, [teachers])
    assert str(error.value).startswith("distillation.teachers[*].weight must normalize to finite weights that sum")
    with pytest.raises(ValueError, match="do not normalize to finite weights"):
        normalize_weights([1e308, 1e308], 2)
    assert normalize_weights([1e300, 3e300], 2) == pytest.approx([0.25, 0.75])


def test_an_ema_teacher_weight_that_overflows_the_sum_is_refused():
    overrides = [
        "distillation.teachers=[{checkpoint: a, weight: 1.7e308}]",
        "distillation.ema_decay=0.9",
        "distillation.ema_teacher_weight=1.7e308",
    ]
    with pytest.raises(ConfigError, match=r"teachers\[\*\].weight and distillation.ema_teacher_weight must normalize"):
        load_config(None, overrides)


# ------------------------------------------------------------------------------------------- odd files


@pytest.mark.parametrize("kind, make", [("a FIFO (named pipe)", os.mkfifo), ("a directory", os.mkdir)])
def test_a_checkpoint_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, kind, make):
    hybrid_checkpoint(tmp_path / "best")
    (tmp_path / "best.safetensors").unlink()
    make(tmp_path / "best.safetensors")
    with pytest.raises(UserError) as error:
        load_checkpoint(tmp_path / "best.safetensors")
    assert f"checkpoint file {tmp_path / 'best.safetensors'} is {kind}, not a regular file" in str(error.value)
    (tmp_path / "best.json").unlink()
    make(tmp_path / "best.json")
    with pytest.raises(UserError, match=rf"best\.(json|safetensors) is {re.escape(kind)}"):
        load_checkpoint(tmp_path / "best")


def test_an_exported_model_or_meta_file_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "m.onnx")
    with pytest.raises(UserError, match=r"m.onnx' is a FIFO \(named pipe\), not a regular file"):
        load_model(tmp_path / "m.onnx")
    (tmp_path / "meta.json").mkdir()
    with pytest.raises(UserError, match="--meta file .* is a directory, not a regular file: pass a JSON file"):
        read_json_object(tmp_path / "meta.json", "--meta file")


class Payload:
    """Anything a pickle rebuilds that is not a tensor: torch.load(weights_only=True) refuses it."""


def test_a_timm_folder_with_pickled_weights_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch):
    from timm.models import save_for_hf

    save_for_hf(create_timm("test_efficientnet", 4), str(tmp_path / "saved"))  # pytorch_model.bin, no safetensors
    with open(tmp_path / "saved/pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_stem.weight": Payload()}, f, protocol=2)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(UserError) as error:
        create_timm(f"local-dir:{tmp_path / 'saved'}", 4, pretrained="imagenet")
    message = str(error.value)
    assert f"refused to load {tmp_path / 'saved/pytorch_model.bin'}: kd reads a timm folder's weights from" in message
    assert "model.safetensors only, never a pickle" in message and "\n" not in message
