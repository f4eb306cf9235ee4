"""`sparseft.base_model(task_file)` builds the base a task was trained on; a task offered to another base
(a TaskBank's, or a model given to `sparseft.load`) is refused naming what differs."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import toy_base, toy_batches, write_task

import sparseft
from sparseft.deltafile import DeltaFileError
from sparseft.hub import cached_weights
from sparseft.methods import MethodContext, get_method


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {"gps": write_task("gps", root / "gps.safetensors"),
            "gps-5": write_task("gps", root / "gps-5.safetensors", classes=5, seed=3)}


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return list(state) == list(expected) and all(torch.equal(v, expected[k]) for k, v in state.items())


def bitfit_task(path, model_name: str, classes: int, img_size: int) -> object:
    """A task file for `model_name` at `img_size` (BitFit plans without data), its values perturbed."""
    torch.manual_seed(0)
    model = sparseft.create_model(model_name, num_classes=classes, img_size=img_size)
    model = get_method("bitfit").prepare(model, MethodContext(loader=lambda kind: [], progress=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return get_method("bitfit").save(model, path, extra={"model": model_name, "num_classes": classes,
                                                        "img_size": img_size, "init_seed": 0})


def test_base_model_builds_the_base_the_task_was_trained_on(files):
    base = sparseft.base_model(files["gps"])
    assert not sparseft.delta.is_applied(base)
    assert same_state(base, state_of(toy_base()))  # the weights, image size and head of helpers.write_task's base
    bank = sparseft.TaskBank(base)
    bank.add("gps", files["gps"])  # what a bank needs: the head the task was trained with (its names)
    bank.add("gps-5", files["gps-5"])  # a task of another class count swaps its head in
    x = toy_batches(1, batch=2, classes=3)[0][0]
    with torch.no_grad():
        with bank.use("gps"):
            torch.testing.assert_close(base(x), sparseft.merge(sparseft.load(files["gps"]))(x), atol=0, rtol=0)
        with bank.use("gps-5"):
            assert base(x).shape == (2, 5)


def test_a_bank_on_a_base_without_a_head_says_so(files):
    base = sparseft.create_model("test_vit", num_classes=0, img_size=32)
    before = state_of(base)
    bank = sparseft.TaskBank(base)
    with pytest.raises(DeltaFileError) as err:
        bank.add("gps", files["gps"])
    assert str(err.value) == (
        f"task 'gps' ({files['gps']}) is for test_vit at 32 px with 3 classes; this bank's base is test_vit at 32 px "
        f"without a head (num_classes=0); sparseft.base_model('{files['gps']}') builds the base it was trained on")
    assert bank.tasks == [] and same_state(base, before)


def test_a_bank_on_another_image_size_names_both_sizes(files):
    for base in (sparseft.create_model("test_vit", num_classes=3, img_size=64),
                 timm.create_model("test_vit", num_classes=3, img_size=64)):  # built by timm itself: read from it
        before = state_of(base)
        bank = sparseft.TaskBank(base)
        with pytest.raises(DeltaFileError, match=r"task 'gps' \(.*gps.safetensors\) is for test_vit at 32 px; this "
                                                 r"bank's base is test_vit at 64 px; sparseft.base_model\("):
            bank.add("gps", files["gps"])
        assert bank.tasks == [] and same_state(base, before)


def test_a_bank_of_another_architecture_names_both_models(files, tmp_path):
    task = bitfit_task(tmp_path / "effnet.safetensors", "test_efficientnet", 3, 56)
    base = toy_base()
    before = state_of(base)
    bank = sparseft.TaskBank(base)
    bank.add("gps", files["gps"])
    with pytest.raises(DeltaFileError, match=r"task 'icons' \(.*effnet.safetensors\) is for test_efficientnet at 56 "
                                             r"px; this bank's base is test_vit at 32 px;"):
        bank.add("icons", task)
    assert bank.tasks == ["gps"]
    bank.use(None)
    assert same_state(base, before)
    sparseft.TaskBank(sparseft.base_model(task)).add("icons", task)  # its own base takes it


def test_load_onto_a_model_of_another_class_count_names_both(files):
    model = toy_base(classes=5)
    before = state_of(model)
    with pytest.raises(DeltaFileError, match="this task is for test_vit at 32 px with 3 classes; this model is "
                                             "test_vit at 32 px with 5 classes"):
        sparseft.load(files["gps"], model=model)
    assert not sparseft.delta.is_applied(model) and same_state(model, before)


def test_a_base_with_other_weights_but_the_same_build_keeps_the_fingerprint_message(files):
    other = toy_base(seed=1)  # test_vit at 32 px with 3 classes, other random weights
    with pytest.raises(DeltaFileError, match="made for another base model .*load the base weights it was trained from"):
        sparseft.TaskBank(other).add("gps", files["gps"])


@pytest.mark.slow
def test_a_mobilenet_task_on_a_dinov2_bank_names_the_models_and_sizes(tmp_path):
    """The case users met: offline backbones, a MobileNetV2 task at 56 px offered to a DINOv2 bank at 28 px."""
    for name in ("mobilenetv2_100_offline", "dinov2_vits14_offline"):
        if cached_weights(name) is None:
            pytest.skip(f"{name} is not cached; run `sparseft weights fetch {name}`")
    task = bitfit_task(tmp_path / "icons.safetensors", "mobilenetv2_100_offline", 4, 56)
    bank = sparseft.TaskBank(sparseft.create_model("dinov2_vits14_offline", num_classes=4, img_size=28))
    with pytest.raises(DeltaFileError, match=r"task 'icons' \(.*icons.safetensors\) is for mobilenetv2_100_offline at "
                                             r"56 px; this bank's base is dinov2_vits14_offline at 28 px;"):
        bank.add("icons", task)
    assert bank.tasks == []


def test_info_names_where_an_offline_backbones_weights_come_from():
    """A task on an offline backbone records `pretrained: false` (timm's download flag); `info` says the
    weights are the offline pretrained ones, a given file's, timm's, or a seeded random init."""
    from sparseft.api import base_description

    offline = base_description({"model": "dinov2_vits14_offline", "img_size": 56, "num_classes": 5,
                                "pretrained": False, "weights": None})
    assert offline == ("dinov2_vits14_offline at 56 px, 5 classes, from the offline pretrained weights "
                       "(`sparseft weights fetch dinov2_vits14_offline`)")
    assert base_description({"model": "resnet50", "num_classes": 3, "weights": "/w/r50.safetensors"}).endswith(
        "from the weights of /w/r50.safetensors")
    assert base_description({"model": "resnet50", "num_classes": 3, "pretrained": True}).endswith(
        "timm's pretrained weights")
    assert base_description({"model": "resnet50", "num_classes": 3, "init_seed": 4}).endswith(
        "random initialisation (seed 4)")
    assert base_description({}) is None
