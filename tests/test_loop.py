"""The training loop's features, in-process on a tiny linear model and synthetic tensors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import reset_accelerate
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kd.config import SCHEDULERS, TrainConfig
from kd.data.dataset import InputSpec
from kd.distill.distiller import Distiller
from kd.distill.losses import KnowledgeDistillationLoss
from kd.distill.teachers import TeacherEnsemble, teacher_sanity_check
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta
from kd.train.accelerator import make_accelerator
from kd.train.loop import fit
from kd.train.schedule import build_scheduler
from kd.train.task import Classifier, TrainingTask


class Blobs(Dataset):
    """Two Gaussian blobs in 3×2×2 'images': a linear model separates them."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.x = torch.randn(n, 3, 2, 2, generator=g) + (self.labels.float() * 2 - 1)[:, None, None, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"rgb": self.x[i], "label": self.labels[i]}


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))


def conv(seed=0):
    """Conv-BN-ReLU-pool: under QAT its pool and flatten share one observer, as real students' do."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)
    )


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def loaders(seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(Blobs(), batch_size=8, shuffle=True, generator=g), DataLoader(Blobs(32, seed=1), batch_size=16)


def train(tmp_path, task, resume=False, **overrides):
    cfg = TrainConfig(**{"max_epochs": 3, "learning_rate": 0.05, "log_every_n_steps": 1, **overrides})
    accelerator = make_accelerator(cfg, tmp_path, seed=0, cpu=True)
    train_loader, val_loader = loaders()
    meta = CheckpointMeta({"name": "linear", "num_classes": 2}, ["a", "b"], InputSpec(2))
    return fit(accelerator, task, train_loader, val_loader, cfg, tmp_path, meta, resume=resume)


def lr_trace(cfg, updates_per_epoch):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    lrs = [optimizer.param_groups[0]["lr"]]
    for update in range(1, cfg.max_epochs * updates_per_epoch + 1):
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_warmup_then_cosine_matches_the_formula():
    cfg = TrainConfig(learning_rate=1.0, max_epochs=10, warmup_epochs=2, min_lr=0.01)
    lrs = lr_trace(cfg, updates_per_epoch=5)
    warmup, total, start = 10, 50, 1e-3
    for t in (0, 3, 7):
        assert lrs[t] == pytest.approx(start + t * (1.0 - start) / warmup)
    for t in (10, 20, 33, 49):
        expected = 0.01 + 0.5 * (1.0 - 0.01) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        assert lrs[t] == pytest.approx(expected)
    assert lrs[50] == pytest.approx(0.01)


def test_step_schedule_and_warm_restarts():
    step = lr_trace(TrainConfig(learning_rate=1.0, max_epochs=6, lr_scheduler="step", lr_step_size=2, lr_gamma=0.5), 4)
    assert step[0] == 1.0 and step[7] == 1.0 and step[8] == 0.5 and step[16] == 0.25
    cfg = TrainConfig(learning_rate=1.0, max_epochs=4, lr_cycles=2, lr_cycle_decay=0.5)
    restarts = lr_trace(cfg, 5)
    assert restarts[0] == 1.0 and restarts[10] == pytest.approx(0.5)  # second cycle starts at half the peak
    assert restarts[9] < 0.05 and restarts[19] < 0.05


SCHEDULE = dict(learning_rate=1.0, max_epochs=6, warmup_epochs=1, lr_step_size=2, lr_gamma=0.5, min_lr=0.01)
WARMUP = dict(warmup_t=4, warmup_lr_init=1e-3, warmup_prefix=True)  # 1 epoch of 4 updates, from learning_rate/1000
CYCLE = dict(t_initial=20, lr_min=0.01, cycle_limit=1, cycle_decay=0.5, t_in_epochs=False, **WARMUP)  # 5 epochs


def timm_scheduler(name: str, optimizer: torch.optim.Optimizer):
    """timm's own scheduler for SCHEDULE at 4 updates per epoch, built by hand from its class."""
    from timm import scheduler as s

    per_update = dict(t_in_epochs=False, **WARMUP)
    return {
        "cosine": lambda: s.CosineLRScheduler(optimizer, **CYCLE),
        "tanh": lambda: s.TanhLRScheduler(optimizer, **CYCLE),
        "poly": lambda: s.PolyLRScheduler(optimizer, power=0.5, **CYCLE),  # lr_gamma is poly's power, as in timm
        "step": lambda: s.StepLRScheduler(optimizer, decay_t=8, decay_rate=0.5, **per_update),
        "multistep": lambda: s.MultiStepLRScheduler(optimizer, decay_t=[8, 16], decay_rate=0.5, **per_update),
        "constant": lambda: s.StepLRScheduler(optimizer, decay_t=1, decay_rate=1.0, **per_update),
        "plateau": lambda: s.PlateauLRScheduler(
            optimizer, decay_rate=0.5, patience_t=1, warmup_t=1, warmup_lr_init=1e-3, lr_min=0.01, mode="max"
        ),
    }[name]()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_is_timms_own_stepped_the_same_way(name):
    """build_scheduler's LR after every update (plateau: every epoch, on a validation score that stops improving)
    equals that of timm's scheduler class built by hand and stepped by hand."""
    cfg = TrainConfig(lr_scheduler=name, lr_cycle_decay=0.5, **SCHEDULE)
    ours_optimizer, timms_optimizer = (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    ours, timms = build_scheduler(ours_optimizer, cfg, updates_per_epoch=4), timm_scheduler(name, timms_optimizer)
    trace = {"ours": [], "timm": []}
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    for epoch in range(cfg.max_epochs):
        for update in range(epoch * 4 + 1, epoch * 4 + 5):
            ours.step_update(update)
            if name != "plateau":
                timms.step_update(update)
            trace["ours"].append(ours_optimizer.param_groups[0]["lr"])
            trace["timm"].append(timms_optimizer.param_groups[0]["lr"])
        ours.step(epoch + 1, scores[epoch])
        if name == "plateau":
            timms.step(epoch + 1, scores[epoch])
    assert trace["ours"] == trace["timm"]
    assert len(set(trace["ours"])) > (1 if name == "constant" else 2)  # the schedule moved: warmup, then decay


def test_finetune_phase_holds_a_lower_constant_lr(tmp_path):
    task = Classifier(linear())
    train(tmp_path, task, max_epochs=3, finetune_epochs=1, finetune_lr_scale=0.1)
    scalars = read_scalars(tmp_path)
    last_epoch_lrs = [v for step, v in scalars["train/lr"] if step > 16]
    assert last_epoch_lrs and all(v == pytest.approx(0.005) for v in last_epoch_lrs)


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_learns_logs_every_term_and_checkpoints_the_best(tmp_path):
    result = train(tmp_path, Classifier(linear()), save_top_k=2)
    assert result["best"] > 0.9
    scalars = read_scalars(tmp_path)
    assert {"train/loss", "train/hard", "train/lr", "train/grad_norm", "val/acc", "val/loss"} <= set(scalars)
    assert (tmp_path / "best.safetensors").is_file() and len(list(tmp_path.glob("epoch*.safetensors"))) == 2
    assert json.loads((tmp_path / "latest.json").read_text())["epoch"] == 2  # newest weights, whatever the score


def test_logs_and_the_epoch_line_are_means_of_every_term_not_one_batch(tmp_path, capsys):
    """Each logged term is the mean over the steps since the previous log, and the epoch line prints each term's
    mean over the epoch: checked against terms the task makes known (probe = the step's number) and records."""

    class Probed(Classifier):
        losses: list[float] = []

        def forward(self, batch):
            out = super().forward(batch)
            Probed.losses.append(out["loss"].item())
            out["probe"] = torch.tensor(float(len(Probed.losses)))  # 1, 2, 3, ... (one per step)
            return out

    train(tmp_path, Probed(linear()), max_epochs=1, log_every_n_steps=3)  # 8 steps of 8 images, 1 epoch
    probes = read_scalars(tmp_path)["train/probe"]
    assert probes == [(3, 2.0), (6, 5.0)]  # mean(1, 2, 3), mean(4, 5, 6); steps 7 and 8 wait for the next log
    losses = read_scalars(tmp_path)["train/loss"]
    assert [v for _, v in losses] == pytest.approx([sum(Probed.losses[:3]) / 3, sum(Probed.losses[3:6]) / 3])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 0:"))
    mean_loss = sum(Probed.losses) / 8
    assert line.startswith(f"epoch 0: loss {mean_loss:.4f}  hard {mean_loss:.4f}  probe 4.5000  val_acc "), line


def test_ema_weights_follow_the_decay_formula():
    model = linear()
    ema = ModelEmaV3(model, decay=0.9)
    expected = None
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step=step)
        w = model[1].weight.detach().clone()
        expected = w if expected is None else 0.9 * expected + 0.1 * w  # the first update copies
        assert torch.allclose(ema.module[1].weight, expected, atol=1e-6)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    class Flaky(Classifier):
        calls = 0

        def forward(self, batch):
            out = super().forward(batch)
            Flaky.calls += 1
            if Flaky.calls in (2, 3) or Flaky.calls > 12:
                out["loss"] = out["loss"] * float("nan")
            return out

    with pytest.warns(UserWarning, match="step skipped"), pytest.raises(FloatingPointError, match="3 such steps"):
        train(tmp_path, Flaky(linear()), max_nonfinite_steps=3)
    assert Flaky.calls == 15  # two skipped, recovered, then three in a row stopped it


def test_too_many_nonfinite_steps_and_nan_weights_are_user_errors(tmp_path):
    """The scripts print a UserError as one line: a diverging run must not end in a traceback."""
    from kd.errors import UserError
    from kd.train.nonfinite import NonFiniteLoss
    from kd.train.weights import weight_check

    assert issubclass(NonFiniteLoss, UserError) and issubclass(NonFiniteLoss, FloatingPointError)
    model = linear()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="the weights became non-finite"):
        weight_check(make_accelerator(TrainConfig(), tmp_path, cpu=True), model)


def test_early_stopping_respects_min_delta(tmp_path):
    result = train(tmp_path, Classifier(linear()), max_epochs=6, early_stopping_patience=2, min_delta=0.5)
    assert result["best"] is not None
    assert sorted(p.name for p in tmp_path.glob("epoch*.safetensors")) == ["epoch000.safetensors"]


@pytest.mark.parametrize("extra", [{}, {"qat_start_fraction": 0.5}], ids=["float", "qat"])
def test_resume_mid_epoch_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, extra, caplog):
    whole = Classifier(conv())
    train(tmp_path / "whole", whole, max_epochs=2, **extra)

    class Killed(Exception):
        pass

    class DiesAtStep(Classifier):
        steps = 0

        def forward(self, batch):
            DiesAtStep.steps += 1
            if DiesAtStep.steps == 12:  # epoch 1, batch 4: after the state saved at update 10
                raise Killed
            return super().forward(batch)

    with pytest.raises(Killed):
        train(tmp_path / "killed", DiesAtStep(conv()), max_epochs=2, save_every_n_steps=5, **extra)
    reset_accelerate()
    resumed = Classifier(conv(seed=123))  # different init: everything must come from the saved state
    train(tmp_path / "killed", resumed, max_epochs=2, resume=True, **extra)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # bitwise: same batches, same optimizer state, same schedule
    assert "Removed shared tensor" not in caplog.text  # QAT's aliased observers are saved quietly


def test_classifier_and_distiller_have_every_name_of_the_training_task_protocol():
    loss = KnowledgeDistillationLoss(temperature=4.0, alpha=0.5, feature_weight=0.0)
    distiller = Distiller(linear(0), TeacherEnsemble([linear(1)]), loss)
    assert isinstance(Classifier(linear()), TrainingTask) and isinstance(distiller, TrainingTask)


def test_teacher_sanity_check_tells_chance_from_a_real_teacher():
    data = Blobs(64)
    batch = {"rgb": data.x, "label": data.labels}

    class Oracle(nn.Module):
        def forward(self, x):
            return F.one_hot((x.mean(dim=(1, 2, 3)) > 0).long(), 2).float() * 5

    assert teacher_sanity_check(Oracle(), batch, 2)["better_than_chance"]
    constant = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    nn.init.zeros_(constant[1].weight)
    with torch.no_grad():
        constant[1].bias.copy_(torch.tensor([1.0, 0.0]))
    check = teacher_sanity_check(constant, batch, 2)
    assert check["accuracy"] == 0.5 and not check["better_than_chance"]


def test_qat_trains_a_fake_quantized_graph_and_checkpoints_float_weights(tmp_path):
    import safetensors.torch

    task = Classifier(linear())
    float_model = task.model
    result = train(tmp_path, task, max_epochs=2, qat_start_fraction=0.5, save_top_k=2)
    assert result["best"] > 0.9
    assert task.model is not float_model and "GraphModule" in type(task.model).__name__
    assert {id(p) for p in task.model.parameters()} == {id(p) for p in float_model.parameters()}
    meta = json.loads((tmp_path / "epoch001.json").read_text())
    assert meta["qat"] is True and json.loads((tmp_path / "epoch000.json").read_text())["qat"] is False
    saved = safetensors.torch.load_file(str(tmp_path / "epoch001.safetensors"))
    ranges = {k: v for k, v in saved.items() if k.startswith("qat.")}  # what export.py's torch-int8-qat uses
    assert set(saved) - set(ranges) == set(float_model.state_dict())  # float layout, loadable without QAT machinery
    assert torch.equal(saved["1.weight"], float_model[1].weight.detach())
    learned = task.model.state_dict()
    assert ranges and all(torch.equal(v, learned[k.removeprefix("qat.")]) for k, v in ranges.items())
    assert not any(k.startswith("qat.") for k in safetensors.torch.load_file(str(tmp_path / "epoch000.safetensors")))


def test_grad_checkpointing_is_switched_on_or_refused(tmp_path):
    import timm

    model = timm.create_model("test_efficientnet", num_classes=2)
    calls = []
    model.set_grad_checkpointing = lambda enable=True: calls.append(enable)
    cfg = TrainConfig(max_epochs=1, grad_checkpointing=True)
    accelerator = make_accelerator(cfg, tmp_path, cpu=True)
    images = [{"rgb": torch.randn(3, 32, 32), "label": torch.tensor(i % 2)} for i in range(8)]
    fit(
        accelerator,
        Classifier(model),
        DataLoader(images, batch_size=4),
        DataLoader(images, batch_size=4),
        cfg,
        tmp_path,
        CheckpointMeta({"name": "test_efficientnet", "num_classes": 2}, ["a", "b"], InputSpec(32)),
    )
    assert calls == [True]
    with pytest.raises(UserError, match="set_grad_checkpointing"):
        train(tmp_path / "linear", Classifier(linear()), grad_checkpointing=True)


def test_optimizer_skips_weight_decay_on_norms_and_biases(tmp_path, monkeypatch):
    import kd.train.loop

    seen = {}
    real = kd.train.loop.create_optimizer_v2

    def spy(*args, **kwargs):
        seen["optimizer"] = real(*args, **kwargs)
        return seen["optimizer"]

    monkeypatch.setattr(kd.train.loop, "create_optimizer_v2", spy)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    train(tmp_path, Classifier(model), max_epochs=1, weight_decay=0.05)
    decay = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in seen["optimizer"].param_groups}
    assert decay == {0.0: {1}, 0.05: {2}}  # biases and norm weights are 1-D


def test_accumulation_and_clipping(tmp_path, monkeypatch):
    from accelerate import Accelerator

    norms_after_clip = []
    real = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(self, parameters, max_norm, *args, **kwargs)
        norms_after_clip.append(torch.norm(torch.stack([p.grad.norm() for p in parameters])).item())
        return total

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    train(tmp_path, Classifier(linear()), max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.01)
    progress = json.loads((tmp_path / "last/progress.json").read_text())
    assert progress["updates"] == 4  # 8 batches, one optimizer step per 2
    assert len(norms_after_clip) == 4 and max(norms_after_clip) <= 0.01 + 1e-6


def test_channels_last_and_compile_train_the_model_in_place(tmp_path):
    import safetensors.torch

    task = Classifier(conv())
    model = task.model
    result = train(tmp_path, task, max_epochs=2, channels_last=True, compile=True)
    assert result["best"] > 0.9 and task.model is model  # compiled in place, not wrapped
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model._compiled_call_impl is not None
    saved = safetensors.torch.load_file(str(tmp_path / "best.safetensors"))
    assert set(saved) == set(conv().state_dict())  # no "_orig_mod." prefixes: loads into a plain model
