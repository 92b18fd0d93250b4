"""The speed benchmarks run and report what README's Performance section quotes (speed itself is measured there,
not here): benchmarks/gpu.py on a CPU in quick mode, and benchmarks/vs_torchdistill.py's kd side, its generated
configs and its summary, without torchdistill installed. Also the loader's uint8 path that the figures rest on."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data_loader, gpu, vs_torchdistill  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.data.dataset import LeafDataset, load_image  # noqa: E402
from kd.data.transforms import PairedTransform  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_the_gpu_benchmark_runs_on_a_cpu_in_quick_mode_and_writes_its_fields(tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["device"] == "cpu" and report["quick"] is True
    steps = report["steps"]
    for name in ("student_step", "teacher_forward", "distill_step", "distill_step_features", "cached_step", "loader"):
        assert _positive(steps["images_per_s"][name]), name
    assert "cached / student_step" in steps["ratios"] and all(_positive(v) for v in steps["ratios"].values())
    assert "student_step channels_last" in steps["option_speedups"]
    assert {"fp32", "channels_last"} <= set(report["student_combined"])
    assert all(_positive(v) for v in report["student_combined"].values())
    loader = report["loader"]
    assert set(loader["per_worker_samples_per_s"]) == {"kd", "kd_float", "torchvision", "torchvision_v2"}
    assert set(loader["all_workers_samples_per_s"]) == {"kd", "torchvision", "torchvision_v2"}
    assert all(_positive(v) for v in [*loader["per_worker_samples_per_s"].values()])
    verdict = report["verdict"]
    assert verdict["fastest_student_step"] in report["student_combined"]
    assert _positive(verdict["loader_over_fastest_student_step"])
    rates = loader["per_worker_samples_per_s"]
    assert verdict["kd_over_torchvision_v2_per_worker"] == round(rates["kd"] / rates["torchvision_v2"], 3)
    assert (
        isinstance(verdict["workers_needed_for_fastest_step"], int) and verdict["workers_needed_for_fastest_step"] >= 1
    )


class _AnyTag(yaml.SafeLoader):
    """Reads torchdistill's !import_call / !import_get / !join tags as plain data (torchdistill is not needed)."""


_AnyTag.add_multi_constructor(
    "!",
    lambda loader, suffix, node: (
        loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)
    ),
)


def test_the_race_runs_one_recipe_on_both_sides(tmp_path):
    args = vs_torchdistill.parse_args(["--work", str(tmp_path)])
    assert args.contenders == ["torchdistill", "kd_cached"] and args.train_images == 1200 and args.seeds == [0, 1]
    data, teacher = tmp_path / "data", tmp_path / "teacher" / "best.safetensors"
    setup = vs_torchdistill.SETUP

    # kd's side: a config kd itself accepts, with the teacher cache and channels_last on, features off
    cfg = load_config(vs_torchdistill.kd_config(args, tmp_path, data, teacher, seed=1, cached=True), [])
    d = cfg.distillation
    assert cfg.seed == 1 and d.teacher_cache and d.channels_last and not d.feature_matching
    assert (d.temperature, d.alpha, d.batch_size, d.max_epochs) == (4.0, 0.3, 64, args.epochs)
    assert (d.learning_rate, d.weight_decay, d.precision) == (setup["learning_rate"], setup["weight_decay"], "no")
    assert cfg.data.image_size == 64 and cfg.data.num_workers == setup["workers"] and not cfg.data.demo
    online = load_config(vs_torchdistill.kd_config(args, tmp_path, data, teacher, seed=1, cached=False), [])
    assert online.distillation.teacher_cache == "" and online.distillation.channels_last

    # torchdistill's side: its YAML format, the same loss, optimizer, batch, workers and augmentation
    td = yaml.load(vs_torchdistill.torchdistill_yaml(args, data, seed=1), Loader=_AnyTag)
    train = td["train"]
    kd_loss = train["criterion"]["kwargs"]["sub_terms"]["kd"]["criterion"]
    assert kd_loss["key"] == "KDLoss" and kd_loss["kwargs"]["temperature"] == 4.0 and kd_loss["kwargs"]["alpha"] == 0.3
    assert train["optimizer"]["kwargs"] == {"lr": setup["learning_rate"], "weight_decay": setup["weight_decay"]}
    assert train["optimizer"]["max_grad_norm"] == setup["gradient_clip"] and train["num_epochs"] == args.epochs
    loader = train["train_data_loader"]["kwargs"]
    assert loader["batch_size"] == 64 and loader["num_workers"] == setup["workers"] and loader["drop_last"]
    transforms = td["datasets"]["demo/train"]["init"]["kwargs"]["transform"]["init"]["kwargs"]["transforms"]
    keys = [t["key"].rsplit(".", 1)[1] for t in transforms]
    assert keys == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "ToTensor", "Normalize"]
    assert transforms[0]["init"]["kwargs"]["scale"] == [setup["scale_min"], 1.0]


def test_the_race_reads_kds_epoch_lines_and_summarizes_per_repeat():
    line = "epoch 3: loss 0.4123  val_acc 0.6133  val_loss 1.0021  lr 0.00e+00  123 img/s  *best*"
    assert vs_torchdistill.EPOCH_LINE.findall(line) == [("3", "0.6133", "123")]

    def row(rate, accs, wall, cache=0.0, seed=0):
        return {"images_per_s": rate, "val_acc": accs, "wall_s": wall, "cache_build_s": cache, "seed": seed}

    runs = {
        "torchdistill": [row(50.0, [0.3, 0.5], 100.0), row(40.0, [0.3, 0.4], 120.0, seed=1)],
        "kd_cached": [row(75.0, [0.4, 0.5], 60.0, 20.0), row(80.0, [0.4, 0.45], 70.0, 20.0, seed=1)],
    }
    summary = vs_torchdistill.summarize(runs, 1200, 2)
    assert summary["kd_cached"]["speed_vs_torchdistill"]["values"] == [1.5, 2.0]
    assert summary["kd_cached"]["wall_vs_torchdistill (cache build included)"]["values"] == [1.25, 1.3333]
    assert (
        summary["torchdistill"]["val_acc_last"]["mean"] == 0.45
        and summary["kd_cached"]["val_acc_best"]["mean"] == 0.475
    )
    assert "| kd_cached | 77.5 ± 3.5 | 1.75 ± 0.35 |" in vs_torchdistill.table(summary)


def test_the_race_refuses_a_timed_epoch_past_the_last():
    with pytest.raises(SystemExit):
        vs_torchdistill.parse_args(["--epochs", "2", "--timed-from", "2"])


def test_the_loader_race_runs_on_a_photo_folder_against_both_torchvision_pipelines(tmp_path):
    photos = tmp_path / "my_photos"
    for cls, count in (("a", 3), ("b", 1)):
        (photos / "train" / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (48, 40), (40 * i, 100, 200)).save(photos / "train" / cls / f"{i}.jpg")
    picked = data_loader.copy_photos(photos, tmp_path / "picked", 3)
    assert sorted(p.relative_to(picked).as_posix() for p in picked.rglob("*.jpg")) == [
        "train/a/0.jpg",
        "train/a/1.jpg",
        "train/b/0.jpg",
    ]  # round-robin over the classes
    argv = ["--vs-torchvision", "--photos", str(photos), "--image-size", "32", "--images", "3"]
    report = data_loader.main([*argv, "--rounds", "1", "--workers", "0", "--batch-size", "2"])
    case = report["cases"]["photos_my_photos_to_32px"]
    per_worker = case["per_worker_samples_per_s"]
    assert case["images"] == 3 and set(per_worker) == {"kd", "kd_float", "torchvision", "torchvision_v2"}
    assert all(_positive(rate) for rate in per_worker.values())
    assert set(case["loaders_samples_per_s"]["0"]) == {"kd", "torchvision", "torchvision_v2"}
    assert all(_positive(rate) for rate in case["loaders_samples_per_s"]["0"].values())
    assert case["kd_vs_torchvision_v2_per_worker"] == round(per_worker["kd"] / per_worker["torchvision_v2"], 3)
    assert case["kd_vs_torchvision_per_worker"] == round(per_worker["kd"] / per_worker["torchvision"], 3)


def test_the_torchvision_v2_baseline_decodes_to_rgb_crops_and_normalizes(tmp_path):
    colour, size = (200, 100, 50), 24
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (60, 40), colour).save(tmp_path / "train" / "a" / "flat.png")  # lossless: exact values
    Image.new("L", (30, 30), 90).save(tmp_path / "train" / "a" / "grey.png")  # one channel, made RGB
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    v2_set = data_loader.torchvision_sets(tmp_path, size, 0.6, mean, std)["torchvision_v2"]
    for (image, label), rgb in zip((v2_set[0], v2_set[1]), (colour, (90, 90, 90)), strict=True):
        assert image.dtype == torch.float32 and image.shape == (3, size, size) and label == 0
        expected = (torch.tensor(rgb) / 255 - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(image, expected[:, None, None].expand_as(image), atol=1e-5)


# ------------------------------------------------------------------- the loader's uint8 path the figures rest on


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_uint8_views_are_the_float_views_up_to_rounding(tmp_path, suffix):
    rng = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 8, 8, generator=rng) * 255).byte()
    image = torch.nn.functional.interpolate(image[None].float(), size=(90, 120), mode="bilinear")[0].byte()
    path = tmp_path / "train" / "a" / f"leaf{suffix}"
    path.parent.mkdir(parents=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=95)
    as_uint8, as_float = load_image(path, uint8=True), load_image(path)
    assert as_uint8.dtype == torch.uint8 and as_float.dtype == torch.float32
    assert (as_uint8.float() / 255 - as_float).abs().max() <= (1 / 255 if suffix == ".jpg" else 1e-6)  # decoders agree
    transform = PairedTransform(32, train=True, hflip=0.5, vflip=0.5, scale_min=0.5)
    for seed in range(4):
        fast = transform(as_uint8, generator=torch.Generator().manual_seed(seed))["rgb"]
        slow = transform(as_float, generator=torch.Generator().manual_seed(seed))["rgb"]
        assert fast.shape == slow.shape == (3, 32, 32) and (fast - slow).abs().max() <= 2 / 255
    (tmp_path / "train" / "b").mkdir()
    Image.open(path).save(tmp_path / "train" / "b" / path.name, quality=95)
    dataset = LeafDataset(tmp_path, "train", transform=transform)
    assert torch.equal(dataset[0]["rgb"], dataset[0]["rgb"])  # deterministic per (seed, epoch, sample)
