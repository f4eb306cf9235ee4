"""Task kinds are registered objects: a third kind, defined here and nowhere else, runs end to end.

The toy kind regresses one number per image (the mean of its red channel) with a mean-squared
error: its own data ("toyreg:<n>"), model (test_vit with one output), loss, metrics and GPS
objective. `sparseft.run` trains it with GPS, the task file names it, and `sparseft.load` rebuilds
the same model from the file alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import sparseft
from sparseft.kinds import KINDS, Meter, TaskKind, get_kind, kind_for_data, kind_of, register, unregister
from sparseft.run import RunSpec, evaluate_task, run
from sparseft.train import TrainConfig, evaluate, fit


class ToyImages(Dataset):
    """n images whose target is the mean of their first channel (seeded by the split's name)."""

    def __init__(self, n: int, split: str, views: bool = False) -> None:
        g = torch.Generator().manual_seed(sum(map(ord, split)))
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.x[:, 0] += torch.linspace(-1, 1, n)[:, None, None]
        self.y = self.x[:, 0].mean((1, 2))
        self.views = views

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        x = self.x[i]
        return ([x, x.flip(-1)] if self.views else x), self.y[i]


class MSEObjective:
    """GPS's objective for regression: the mean-squared error of the model's output (for either loss name)."""

    def features(self, model: nn.Module, head: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return model

    def targets(self, labels: Any, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return labels.float().repeat(len(views)), torch.tensor(True)

    def loss(self, model: nn.Module, out: torch.Tensor, y: torch.Tensor, loss: str,
             temperature: float) -> torch.Tensor:
        return F.mse_loss(out.float().squeeze(1), y)


class MSEMeter(Meter):
    def result(self) -> dict[str, float]:
        result = super().result()
        result["mse"] = result["loss"]
        return result


class RegressionKind(TaskKind):
    name = "toy-regression"
    primary_metric = "mse"
    metric_key = "mse"
    best_keys = ("mse",)
    prediction = None

    def claims(self, data: str) -> bool:
        return data.startswith("toyreg:")

    def class_names(self, data: str) -> list[str]:
        return ["red"]  # one output

    def verify_split(self, data: str, split: str) -> None:
        assert len(self.dataset(data, split, None)) > 0

    def dataset(self, data: str, split: str, transform: Any, *, seed: int = 0) -> Any:
        return ToyImages(int(data.split(":")[1]), split)

    def transforms(self, config: Mapping[str, Any], spec: Any) -> tuple[Any, Any, Any]:
        return None, None, None  # the toy images are tensors already

    def selection_dataset(self, task_data: Any) -> Any:
        return ToyImages(int(task_data.spec.data.split(":")[1]), task_data.spec.train_split, views=True)

    def build_model(self, name: str, num_classes: int, *, img_size: int | None = None, weights: Any = None,
                    pretrained: bool = False, class_names: list[str] | None = None) -> nn.Module:
        model = sparseft.create_model(name, num_classes, img_size=img_size, weights=weights, pretrained=pretrained)
        model.task = self.name
        return model

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        return F.mse_loss(logits.float().squeeze(1), y.float(), reduction="sum"), len(y)

    def meter(self, model: nn.Module) -> Meter:
        return MSEMeter(self, model)

    def eval_dataset(self, model: nn.Module, data: str, split: str, extra: Mapping[str, Any],
                     preprocessing: str | None) -> Any:
        return self.dataset(data, split, None)

    def selection_objective(self, model: nn.Module, head: str | None) -> MSEObjective:
        return MSEObjective()


@pytest.fixture
def toy_kind():
    register(RegressionKind)
    yield KINDS[RegressionKind.name]
    unregister(RegressionKind.name)


def test_the_builtin_kinds_are_registered_and_name_their_metrics():
    assert get_kind("classification").primary_metric == "top1" and get_kind("classification").metric_key == "acc"
    assert get_kind("segmentation").primary_metric == "miou" and get_kind("segmentation").metric_key == "mIoU"
    assert kind_of(nn.Linear(2, 2)).name == "classification"  # a model naming no kind is a classifier
    with pytest.raises(sparseft.errors.InputError, match="unknown task kind 'nope'"):
        get_kind("nope")


def test_a_toy_third_kind_runs_end_to_end(tmp_path, toy_kind):
    assert kind_for_data("toyreg:16") is toy_kind
    spec = RunSpec(model="test_vit", data="toyreg:16", method="gps", img_size=32, batch_size=8, eval_batch_size=8,
                   options={"k": 1}, train=TrainConfig(epochs=2, lr=1e-3, progress=False))
    summary = run(spec, tmp_path / "run")
    assert summary["task"] == "toy-regression" and summary["metric"] == "mse"
    assert summary["num_classes"] == 1 and summary["params"]["trainable_backbone"] > 0
    assert "best_test_mse" in summary and summary["final"]["test_mse"] >= 0
    task_file = tmp_path / "run" / "delta.safetensors"
    assert sparseft.read_delta(task_file).header["extra"]["task"] == "toy-regression"

    # the task file alone rebuilds the model of its kind, with the run's numbers
    model = sparseft.load(task_file).eval()
    assert kind_of(model) is toy_kind
    again = evaluate_task(task_file, "toyreg:16", "test", batch_size=8)
    assert again["mse"] == pytest.approx(summary["final"]["test_mse"], rel=1e-5)
    x = ToyImages(16, "test").x[:4]
    merged = sparseft.api.load_for_inference(task_file)
    with torch.no_grad():
        assert torch.allclose(model(x), merged(x), atol=1e-5)

    # classification's predict refuses it, naming the kind
    with pytest.raises(sparseft.errors.InputError, match="this task is toy-regression"):
        sparseft.predict(model, x)


def test_fit_trains_a_toy_kind_model_with_its_loss(toy_kind):
    torch.manual_seed(0)
    model = toy_kind.build_model("test_vit", 1, img_size=32)
    loader = torch.utils.data.DataLoader(ToyImages(16, "train"), batch_size=8)
    before = evaluate(model, loader)["mse"]
    summary = fit(model, loader, TrainConfig(epochs=3, lr=1e-3, progress=False), eval_loaders={"val": loader})
    assert summary["best_val_mse"] <= before
    assert summary["final"]["train_acc"] == 0.0  # the toy kind counts nothing as correct
