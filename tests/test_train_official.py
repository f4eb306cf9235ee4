"""The official scripts' training extras as options: model EMA, mixup/cutmix, drop-last, drop-path, view scale."""

import copy
import dataclasses

import pytest
import torch
from helpers import make_vtab, random_selection, tiny_model, toy_loader
from safetensors.torch import load_file

import sparseft
from sparseft.errors import InputError
from sparseft.loaders import DataSpec, TaskData
from sparseft.methods import get_method
from sparseft.run import RunSpec, run
from sparseft.train import TrainConfig, evaluate, fit

CFG = dict(epochs=2, lr=3e-3, warmup_epochs=0, progress=False)


class Recorder:
    """A training hook that keeps a copy of every trainable tensor after each optimizer step."""

    def __init__(self, model):
        self.model, self.after = model, []

    def before_step(self, step, total):
        pass

    def after_step(self, step, total, optimizer):
        self.after.append({n: p.detach().clone() for n, p in self.model.named_parameters()})

    def state_tensors(self):
        return {}

    def load_state_tensors(self, tensors):
        pass


def gps_vit():
    model = tiny_model("vit")
    return sparseft.apply(model, random_selection(model, k=2))


def test_defaults_are_unchanged():
    c = TrainConfig()
    assert (c.ema_decay, c.mixup, c.cutmix, c.drop_last, c.drop_path) == (None, 0.0, 0.0, False, 0.0)
    assert c.label_smoothing == 0.0
    # the optimiser is left open (`sparseft.run.with_optimizer_defaults` fills it per method); filled without a
    # method's defaults it is what it always was
    assert (c.optimizer, c.weight_decay) == (None, None)
    assert (c.with_defaults().optimizer, c.with_defaults().weight_decay) == ("adamw", 1e-4)
    assert DataSpec("x").drop_last is False and DataSpec("x").view_scale == 0.2
    assert get_method("gps").options.view_scale == 0.2


def test_ema_follows_timms_update_rule_step_by_step(tmp_path):
    model = tiny_model("mlp")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook = Recorder(model)
    decay = 0.9
    fit(model, toy_loader(n=24), TrainConfig(**CFG, ema_decay=decay), run_dir=tmp_path, hook=hook)
    assert len(hook.after) == 6  # 3 steps x 2 epochs
    expected = dict(start)
    for weights in hook.after:  # ema <- decay * ema + (1 - decay) * weights, after every optimizer step
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in expected}
    saved = load_file(str(next(tmp_path.glob("checkpoint-e*.safetensors"))))
    for name, value in expected.items():
        assert torch.allclose(saved[f"hook/ema/{name}"], value, atol=1e-6), name
    assert not torch.allclose(expected["1.weight"], hook.after[-1]["1.weight"])  # it averages, not copies


def test_ema_is_evaluated_and_its_extremes_are_the_model_and_its_start():
    loader = toy_loader(shuffle=False)
    same = fit(gps_vit(), toy_loader(), TrainConfig(**CFG, ema_decay=0.0), eval_loaders={"test": loader})
    assert same["final"]["ema_test_acc"] == same["final"]["test_acc"]  # decay 0: the average is the model
    assert same["best_ema_test_acc"] == max(h["ema_test_acc"] for h in same["history"])
    frozen = fit(gps_vit(), toy_loader(), TrainConfig(**CFG, ema_decay=1.0), eval_loaders={"test": loader})
    start = evaluate(gps_vit(), loader)
    assert frozen["final"]["ema_test_loss"] == pytest.approx(start["loss"], abs=1e-5)  # decay 1: the start
    assert frozen["final"]["test_loss"] != pytest.approx(start["loss"], abs=1e-5)
    plain = fit(gps_vit(), toy_loader(), TrainConfig(**CFG), eval_loaders={"test": loader})
    assert not any(k.startswith("ema_") for k in plain["final"]) and "best_ema_test_acc" not in plain


def test_ema_resumes_with_the_run(tmp_path):
    whole = fit(gps_vit(), toy_loader(), TrainConfig(**{**CFG, "epochs": 3}, ema_decay=0.5),
                eval_loaders={"test": toy_loader(shuffle=False)}, run_dir=tmp_path / "a")
    fit(gps_vit(), toy_loader(), TrainConfig(**{**CFG, "epochs": 3}, ema_decay=0.5),
        eval_loaders={"test": toy_loader(shuffle=False)}, run_dir=tmp_path / "b")
    ema_a = load_file(str(next((tmp_path / "a").glob("checkpoint-e*.safetensors"))))
    ema_b = load_file(str(next((tmp_path / "b").glob("checkpoint-e*.safetensors"))))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a if k.startswith("hook/ema/"))
    assert whole["final"]["ema_test_acc"] is not None


def test_mixup_is_applied_only_when_asked(monkeypatch):
    import timm.data

    calls = []
    real = timm.data.Mixup.__call__

    def spy(self, x, target):
        calls.append((self.mixup_alpha, self.cutmix_alpha))
        return real(self, x, target)

    monkeypatch.setattr(timm.data.Mixup, "__call__", spy)
    fit(gps_vit(), toy_loader(), TrainConfig(**CFG))
    assert calls == []
    out = fit(gps_vit(), toy_loader(), TrainConfig(**CFG, mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    assert calls and set(calls) == {(0.8, 1.0)} and len(calls) == 2 * 6  # every batch of both epochs
    assert 0 <= out["final"]["train_acc"] <= 1


def test_mixup_targets_are_soft_and_an_odd_batch_is_refused():
    with pytest.raises(InputError, match="even --batch-size"):
        fit(gps_vit(), toy_loader(n=9, batch=9), TrainConfig(**CFG, mixup=0.8))


def test_drop_last_drops_the_partial_batch(tmp_path):
    root = make_vtab(tmp_path / "task", n_train=5, n_val=2, classes=3)
    model = tiny_model("vit", num_classes=3)
    spec = DataSpec(str(root), img_size=32, batch_size=3, train_split="train800")
    sizes = [len(y) for _, y in TaskData(spec, model).loader("train")]
    assert sorted(sizes) == [2, 3]
    dropped = TaskData(dataclasses.replace(spec, drop_last=True), model)
    assert [len(y) for _, y in dropped.loader("train")] == [3]
    assert [len(y) for _, y in dropped.loader("select")] == [3]  # the selection pass drops it too
    assert sum(len(y) for _, y in dropped.loader("eval", "test")) == 4  # evaluation never drops


def test_view_scale_reaches_the_selection_views(tmp_path):
    root = make_vtab(tmp_path / "task", classes=3)
    spec = RunSpec(model="vit_tiny_patch16_224", data=str(root), options={"view_scale": 0.08},
                   train=TrainConfig(drop_last=True, drop_path=0.1))
    data = spec.data_spec()
    assert data.view_scale == 0.08 and data.drop_last is True
    views = TaskData(data, tiny_model("vit", num_classes=3)).views
    assert views.transform.transforms[0].scale == (0.08, 1.0)
    with pytest.raises(InputError, match="view_scale"):
        get_method("gps", view_scale=0.0)


def test_drop_path_reaches_the_backbone(tmp_path):
    root = make_vtab(tmp_path / "task", classes=3)
    seen = {}
    from sparseft.kinds import classification

    real = classification.create_model

    def spy(name, num_classes, **kwargs):
        seen.update(kwargs)
        return real(name, num_classes, **{k: v for k, v in kwargs.items() if k != "drop_path_rate"})

    import unittest.mock as mock

    with mock.patch.object(classification, "create_model", spy):
        run(RunSpec(model="mobilenetv2_100_offline", data=str(root), method="linear", img_size=32,
                    train=TrainConfig(epochs=1, lr=1e-3, drop_path=0.1, progress=False)))
    assert seen["drop_path_rate"] == 0.1
    seen.clear()
    with mock.patch.object(classification, "create_model", spy):
        run(RunSpec(model="mobilenetv2_100_offline", data=str(root), method="linear", img_size=32,
                    train=TrainConfig(epochs=1, lr=1e-3, progress=False)))
    assert "drop_path_rate" not in seen  # default: the architecture's own


def test_ema_copies_do_not_share_storage():
    model = gps_vit()
    from sparseft.regularize import WeightAverage

    avg = WeightAverage(model, 0.5)
    before = copy.deepcopy(avg.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in avg.module.state_dict().items())


def test_gps_trains_with_the_papers_optimizer_unless_told_otherwise():
    from sparseft.run import with_optimizer_defaults

    def resolved(method, **train):
        spec, source = with_optimizer_defaults(RunSpec(model="m", data="d", method=method, train=TrainConfig(**train)))
        return spec.train.optimizer, spec.train.weight_decay, source

    assert resolved("gps") == ("adam", 0.0, "gps's paper's (Method.train_defaults)")
    assert resolved("gps", optimizer="adamw", weight_decay=0.05) == ("adamw", 0.05, "given")  # the user's win
    assert resolved("gps", weight_decay=0.1)[:2] == ("adam", 0.1)
    assert "weight_decay: given" in resolved("gps", weight_decay=0.1)[2]
    assert resolved("lora") == ("adamw", 1e-4, "sparseft's default")  # other methods: sparseft's defaults
    spec, source = with_optimizer_defaults(RunSpec(model="m", data="d", method="gps"),
                                           resumed={"optimizer": "adamw", "weight_decay": 1e-4})
    assert (spec.train.optimizer, spec.train.weight_decay, source) == ("adamw", 1e-4, "the resumed run's")


TOY = dict(model="test_vit", img_size=32, batch_size=4)
FAST = ["--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--lr", "1e-3", "--no-progress"]


@pytest.mark.parametrize("method, expected", [("gps", ("adam", 0.0)), ("linear", ("adamw", 1e-4))])
def test_cli_and_python_api_train_with_the_same_optimizer(tmp_path, method, expected, capsys):
    """`sparseft train --method gps` and `run(RunSpec(method="gps"))` take the same defaults (GPS: the paper's
    Adam without weight decay), record where they come from, and build that optimiser."""
    import json

    from sparseft import train as train_module
    from sparseft.cli import main

    task = make_vtab(tmp_path / "task", n_train=4, n_val=2, n_test=2, classes=2)
    built = []
    real = train_module.make_optimizer

    def spy(params, config):
        optimizer = real(params, config)
        built.append((type(optimizer).__name__, optimizer.defaults["weight_decay"]))
        return optimizer

    import unittest.mock as mock

    with mock.patch.object(train_module, "make_optimizer", spy):
        assert main(["train", "--method", method, "--model", "test_vit", "--img-size", "32", "--data", str(task),
                     "--out", str(tmp_path / "cli"), *FAST]) == 0
        api = run(RunSpec(data=str(task), method=method, train=TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0,
                                                                           progress=False), **TOY),
                  tmp_path / "api")
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for summary in (cli, api):
        assert (summary["optimizer"], summary["weight_decay"]) == expected
        assert summary["optimizer_source"] == ("gps's paper's (Method.train_defaults)" if method == "gps"
                                               else "sparseft's default")
    assert built == [({"adam": "Adam", "adamw": "AdamW"}[expected[0]], expected[1])] * 2
    assert f"optimizer {expected[0]}" in capsys.readouterr().out
    config = json.loads((tmp_path / "api" / "config.json").read_text())
    assert config["spec"]["train"]["optimizer"] == expected[0]  # the run folder names what it trained with
    assert config["optimizer_source"] == api["optimizer_source"]


def test_explicit_optimizer_wins_and_an_older_run_resumes_with_its_own(tmp_path):
    import json

    task = make_vtab(tmp_path / "task", n_train=4, n_val=2, n_test=2, classes=2)
    cfg = dict(lr=1e-3, warmup_epochs=0, progress=False)
    given = run(RunSpec(data=str(task), method="gps", train=TrainConfig(epochs=1, optimizer="adamw", weight_decay=0.05,
                                                                        **cfg), **TOY), tmp_path / "given")
    assert (given["optimizer"], given["weight_decay"], given["optimizer_source"]) == ("adamw", 0.05, "given")
    # a GPS run started when the default was AdamW 1e-4 (its config.json says so) resumes with AdamW
    old = tmp_path / "old"
    run(RunSpec(data=str(task), method="gps", train=TrainConfig(epochs=1, optimizer="adamw", weight_decay=1e-4,
                                                                **cfg), **TOY), old)
    (old / "summary.json").unlink()  # as if it stopped before writing its summary
    config = json.loads((old / "config.json").read_text())
    assert config["spec"]["train"]["optimizer"] == "adamw"
    resumed = run(RunSpec(data=str(task), method="gps", train=TrainConfig(epochs=1, **cfg), **TOY), old, resume=True)
    assert (resumed["optimizer"], resumed["weight_decay"], resumed["optimizer_source"]) == ("adamw", 1e-4,
                                                                                          "the resumed run's")
    with pytest.raises(InputError, match="optimizer"):  # a value given now must still match the run's
        run(RunSpec(data=str(task), method="gps", train=TrainConfig(epochs=1, optimizer="adam", **cfg), **TOY), old,
            resume=True)
