import shutil
import socket
import time
import types
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch

from kd.errors import UserError
from kd.models.hybrid import HybridFusion
from kd.models.timm_models import create_timm
from kd.models.zoo import build_model


@pytest.mark.parametrize("fusion", ["concat", "add", "attention"])
def test_hybrid_fusion_modes_give_logits_and_use_both_modalities(fusion):
    torch.manual_seed(0)
    model = HybridFusion(
        4, backbone="test_efficientnet", ms_backbone="test_resnet", ms_channels=5, fusion=fusion
    ).eval()
    rgb, ms = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 32, 32)
    out = model(rgb, ms)
    assert out.shape == (2, 4)
    assert not torch.allclose(out, model(rgb, ms * 3 + 1))  # the MS branch matters


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_efficientnet", num_classes=10)
    safetensors.torch.save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = build_model({"name": "test_efficientnet", "num_classes": 10}, pretrained=str(tmp_path / "w.safetensors"))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(UserError, match="does not exist"):
        build_model({"name": "test_efficientnet", "num_classes": 10}, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="not a timm model"):
        build_model({"name": "efficientnet_b99", "num_classes": 10})


def test_an_argument_the_timm_model_does_not_take_is_named():
    with pytest.raises(UserError, match="^timm model test_efficientnet takes no argument 'wings': remove it$"):
        build_model({"name": "test_efficientnet", "num_classes": 5, "wings": 2})


# ------------------------------------------------------------------------------ ImageNet weights, online or not


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No name resolves (as on a machine without network), HF_HUB_OFFLINE unset, and empty weight caches."""

    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    return tmp_path / "hf"


def test_imagenet_weights_offline_and_not_cached_fail_at_once(no_network):
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        create_timm("resnet18", 5, pretrained="imagenet")
    assert time.monotonic() - start < 15  # the hub client's own retries took 49 s
    message = str(error.value)
    assert message.startswith("could not load pretrained weights 'imagenet' for resnet18: they are not in the local")
    assert "Offline? Put timm's weights in the Hugging Face cache (HF_HOME) while online" in message


def test_hf_hub_offline_fails_without_trying_the_network(no_network, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("tried to connect"))
    with pytest.raises(UserError, match="not in the local cache .*HF_HUB_OFFLINE=1"):
        create_timm("resnet18", 5, pretrained="imagenet")


def hub_weights(tmp_path) -> tuple[dict, Path]:
    """ImageNet-shaped weights of test_efficientnet (seeded), saved as a plain safetensors file."""
    torch.manual_seed(7)
    state = timm.create_model("test_efficientnet").state_dict()  # 1000 classes, as timm's pretrained ones
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    return state, tmp_path / "model.safetensors"


def test_imagenet_weights_in_the_cache_load_offline(no_network, tmp_path):
    state, weights = hub_weights(tmp_path)
    repo = no_network / "models--timm--test_efficientnet.r160_in1k"  # the Hugging Face cache's layout, by hand
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0123abcd")
    (repo / "snapshots/0123abcd").mkdir(parents=True)
    shutil.copy(weights, repo / "snapshots/0123abcd/model.safetensors")
    start = time.monotonic()
    model = create_timm("test_efficientnet", 5, pretrained="imagenet")
    assert time.monotonic() - start < 15
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])
    assert model.get_classifier().out_features == 5  # a fresh head for the 5 classes


def test_imagenet_weights_come_from_the_hub_when_it_is_reachable(no_network, tmp_path, monkeypatch):
    state, weights = hub_weights(tmp_path)
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(weights)

    asked_first = []  # kd's one HEAD request, answered as the Hub would
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, timeout: asked_first.append(url))
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    model = create_timm("test_efficientnet", 5, pretrained="imagenet")
    assert asked_first == [
        f"{huggingface_hub.constants.ENDPOINT}/timm/test_efficientnet.r160_in1k/resolve/main/model.safetensors"
    ]
    assert asked == [("timm/test_efficientnet.r160_in1k", "model.safetensors")]
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_the_hub_check_asks_once_without_retries_and_tells_an_answer_from_none(monkeypatch):
    """What the socket probe did, through the hub client: one HEAD with a 2 s timeout; any HTTP answer (404
    included) is a reachable Hub, a network error or offline mode is not."""
    from kd.models.timm_models import _hub_answers

    not_found = huggingface_hub.errors.HfHubHTTPError("404", response=types.SimpleNamespace(headers={}, request=None))
    offline = huggingface_hub.errors.OfflineModeIsEnabled("offline")
    for outcome, answers in ((None, True), (not_found, True), (ConnectionError("no route"), False), (offline, False)):
        calls = []

        def head(url: str, timeout: float, error: Exception | None = outcome, calls: list = calls) -> None:
            calls.append(timeout)
            if error:
                raise error

        monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", head)
        assert _hub_answers("https://huggingface.co/x") is answers and calls == [2]
