"""Learning rates a user gets without tuning (the recommended table) and `--lr auto` (tuned on val200)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import make_vtab, tiny_model, toy_loader
from hypothesis import given
from hypothesis import strategies as st

from sparseft.cli import main
from sparseft.errors import InputError
from sparseft.methods import METHODS
from sparseft.methods.rates import (
    FAMILIES,
    RECOMMENDED_LR,
    backbone_family,
    derive_rates,
    ladder,
    recommended_lr,
    search_grid,
    snap,
)
from sparseft.train import TrainConfig, fit

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("task") / "toy", n_train=12, n_val=6, n_test=6, classes=3)


def test_ladder_rungs():
    assert search_grid(3e-3) == [1e-3, 3e-3, 1e-2]
    assert search_grid(1e-4) == [3e-5, 1e-4, 3e-4]
    assert ladder(3e-5, 2) == 3e-4 and ladder(1e-2, -3) == 3e-4
    assert snap(2e-3) == 3e-3 and snap(1.5e-3) == 1e-3 and snap(7e-4) == 1e-3


@given(st.floats(min_value=1e-8, max_value=10.0))
def test_snap_is_a_rung_within_half_a_step(lr):
    r = snap(lr)
    mantissa = float(f"{r:.0e}".split("e")[0])
    assert mantissa in (1.0, 3.0)
    assert abs(torch.log10(torch.tensor(r / lr, dtype=torch.float64))) <= 0.5 + 1e-9
    assert ladder(ladder(r, 1), -1) == r


def test_every_method_has_a_transformer_rate_and_families_are_known():
    for method in METHODS:
        assert "transformer" in RECOMMENDED_LR.get(method, {}), method
    for rates in RECOMMENDED_LR.values():
        assert set(rates) <= set(FAMILIES)
        assert all(snap(v) == v for v in rates.values())


def test_the_table_is_what_the_committed_evidence_gives():
    docs = Path(__file__).resolve().parents[1] / "docs" / "results-figures"
    assert derive_rates(docs) == RECOMMENDED_LR


def test_backbone_family():
    assert backbone_family(tiny_model("vit")) == "transformer"
    assert backbone_family(tiny_model("swin")) == "transformer"
    assert backbone_family(tiny_model("convnext")) == "transformer"  # LayerNorm, as the ViTs
    assert backbone_family(tiny_model("resnet")) == "cnn"
    assert backbone_family(tiny_model("mobilenetv2")) == "cnn"
    assert backbone_family(tiny_model("tv_mobilenet_v2")) == "cnn"
    assert backbone_family(tiny_model("mlp")) == "transformer"


def test_recommended_lr_falls_back_to_the_transformer_value():
    lr, source = recommended_lr("gps", "cnn")
    assert lr == RECOMMENDED_LR["gps"].get("cnn", RECOMMENDED_LR["gps"]["transformer"])
    _, source = recommended_lr("no-such-method", "transformer")
    assert "fallback" in source


def test_fit_needs_a_learning_rate():
    with pytest.raises(InputError, match="lr"):
        fit(tiny_model("vit"), toy_loader(n=8), TrainConfig(epochs=1, progress=False))


@pytest.mark.parametrize("method", ["full", "gps"])
def test_train_without_lr_uses_the_recommended_rate_and_resumes(tmp_path, task, method, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", method, "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 0
    expected, _ = recommended_lr(method, "transformer")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lr"] == expected and "recommended" in summary["lr_source"]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == expected and config["spec"]["train"]["lr"] is None
    assert f"lr {expected:g}" in capsys.readouterr().out
    assert main(["train", "--method", method, "--data", str(task), "--out", str(run), *MODEL, *FAST,
                 "--resume"]) == 0  # the same (unset) rate: nothing changed


def test_lr_auto_tunes_on_val200_then_trains_on_everything(tmp_path, task, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "full", "--lr", "auto", "--data", str(task), "--out", str(run),
                 *MODEL, *FAST]) == 0
    choice = json.loads((run / "lr-search" / "choice.json").read_text())
    tried = {t["lr"]: t["val_acc"] for t in choice["tried"]}
    assert set(search_grid(choice["center"])) <= set(tried) and len(tried) <= 5
    best = max(choice["tried"], key=lambda t: t["val_acc"])  # ties: the first tried
    assert choice["chosen_lr"] == best["lr"]
    for lr in tried:  # each tuning run trained on train800 and was scored on val200, never on test
        sub = json.loads((run / "lr-search" / f"lr={lr:g}" / "config.json").read_text())["spec"]
        assert (sub["train_split"], sub["eval_splits"], sub["train"]["lr"]) == ("train800", ["val200"], lr)
        assert "test_acc" not in json.loads((run / "lr-search" / f"lr={lr:g}" / "summary.json").read_text())["final"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lr"] == choice["chosen_lr"] and summary["lr_search"]["chosen_lr"] == choice["chosen_lr"]
    config = json.loads((run / "config.json").read_text())["spec"]
    assert config["train_split"] == "train800val200" and "test_acc" in summary["final"]
    captured = capsys.readouterr()
    assert f"lr {choice['chosen_lr']:g} (--lr auto" in captured.out
    if choice["chosen_lr"] != choice["center"]:  # 6 validation images: a one-image margin is within the noise
        assert choice["val_images"] == 6
        assert choice["within_noise"] == (choice["margin_points"] <= choice["se_points"])
        assert ("within the split's noise" in captured.err) == choice["within_noise"]
    # resumed (nothing left to do): the same choice and summary, nothing retrained
    mtime = (run / "delta.safetensors").stat().st_mtime_ns
    assert main(["train", "--method", "full", "--lr", "auto", "--data", str(task), "--out", str(run),
                 *MODEL, *FAST, "--resume"]) == 0
    assert (run / "delta.safetensors").stat().st_mtime_ns == mtime
    # a second --lr auto run into the same folder without --resume/--overwrite is refused
    assert main(["train", "--method", "full", "--lr", "auto", "--data", str(task), "--out", str(run),
                 *MODEL, *FAST]) == 1
    assert "not empty" in capsys.readouterr().err


def test_lr_auto_labels_its_runs_and_advises_what_fits_when_a_run_learns_nothing(tmp_path, task, capsys, monkeypatch):
    """Each tuning run's epoch lines say its rate, and a run that learns nothing is not told to try `--lr auto`."""
    from sparseft.kinds.base import NEXT_STEP, TaskKind

    monkeypatch.setattr(TaskKind, "not_learning", lambda self, result, split, step=None:
                        f"the model predicts one class for every image of {split}; {step or NEXT_STEP}")
    run = tmp_path / "run"
    assert main(["train", "--method", "linear", "--lr", "auto", "--data", str(task), "--out", str(run), *MODEL,
                 *[f for f in FAST if f != "--no-progress"]]) == 0
    out, err = capsys.readouterr()
    choice = json.loads((run / "lr-search" / "choice.json").read_text())
    epochs = [line for line in out.splitlines() if "epoch=1 " in line]
    assert [line.split("]")[0] + "]" for line in epochs] == [
        *(f"[--lr auto: lr {t['lr']:g}]" for t in choice["tried"]), f"[--lr auto: chosen lr {choice['chosen_lr']:g}]"]
    warned = [line for line in err.splitlines() if line.startswith("warning: the model predicts one class")]
    assert len(warned) == len(choice["tried"]) + 1 and not any("try `--lr auto`" in line for line in warned)
    for t in choice["tried"]:  # one warning each (the same text twice would be shown once)
        assert sum(f"--lr auto's tuning run at lr {t['lr']:g} scores this rate" in line for line in warned) == 1
    assert "--lr auto chose this rate on val200 already: try more epochs (a longer schedule), another method" in err
    assert f"[sparseft] --lr auto chose lr {choice['chosen_lr']:g}" in err  # shown with the epoch lines


def test_lr_auto_refuses_to_tune_on_the_split_it_reports(tmp_path, task, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "full", "--lr", "auto", "--protocol", "tune", "--data", str(task),
                 "--out", str(run), *MODEL, *FAST]) == 1
    assert "--protocol final" in capsys.readouterr().err
    assert not run.exists()


def test_bad_lr_flag_is_a_usage_error(tmp_path, task, capsys):
    assert main(["train", "--method", "full", "--lr", "fast", "--data", str(task), "--out", str(tmp_path / "r"),
                 *MODEL]) == 2
    assert "--lr" in capsys.readouterr().err


# -- a run that notices it is not learning --------------------------------------------------------

def _result(kind_name: str, logits: torch.Tensor, y: torch.Tensor) -> dict:
    import sparseft  # noqa: F401 - registers the built-in kinds
    from sparseft.kinds.base import get_kind

    kind = get_kind(kind_name)
    meter = kind.meter(torch.nn.Linear(1, 1))
    meter.keep_confusion()
    meter.update(logits, y, torch.device("cpu"))
    return kind, {**meter.result(), **meter.details()}


def test_not_learning_names_one_class_and_chance():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    kind, r = _result("classification", torch.eye(3)[[1, 1, 1, 1, 1, 1]], y)
    assert "one class for every image of test" in kind.not_learning(r, "test")
    kind, r = _result("classification", torch.eye(3)[[1, 2, 0, 0, 0, 2]], y)  # 2/6 right; always "0" gets 3/6
    assert "no better than always answering its most common class (0.500)" in kind.not_learning(r, "val")
    kind, r = _result("classification", torch.eye(3)[[0, 0, 0, 1, 2, 0]], y)  # 5/6
    assert kind.not_learning(r, "val") is None


def test_not_learning_on_masks_counts_pixels_and_skips_the_chance_rule():
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[:, :2] = 1
    masks[0, 0, 0] = 255  # ignored pixels are not counted
    kind, r = _result("segmentation", torch.zeros(2, 3, 4, 4), masks)  # argmax: background everywhere
    assert "one class for every pixel" in kind.not_learning(r, "test")
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 1, :1] = 1  # a quarter of the pixels predicted class 1 (half of them are): no warning
    kind, r = _result("segmentation", logits, masks)
    assert kind.not_learning(r, "test") is None


def test_fit_warns_when_the_model_predicts_one_class(tmp_path):
    from sparseft.errors import TrainingWarning

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    model[1].weight.requires_grad_(False)
    with pytest.warns(TrainingWarning, match="one class for every image of val; try `--lr auto`"):  # not in lr auto
        summary = fit(model, toy_loader(n=16), TrainConfig(epochs=1, lr=1e-12, min_lr=0, warmup_lr=0, warmup_epochs=0,
                                                                  progress=False),
                      eval_loaders={"val": toy_loader(n=16, shuffle=False)})
    assert "val_confusion" not in summary["final"] and "val_acc" in summary["final"]


def test_resume_lr_auto_of_a_run_without_it_or_of_nothing_is_refused_before_any_tuning_run(tmp_path, task, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "linear", "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["train", "--method", "linear", "--lr", "auto", "--data", str(task), "--out", str(run), *MODEL, *FAST,
                 "--resume"]) == 1
    err = capsys.readouterr().err
    assert str(run) in err and "started without --lr auto" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no lr-search/ written into it
    nothing = tmp_path / "typo"
    assert main(["train", "--method", "linear", "--lr", "auto", "--data", str(task), "--out", str(nothing), *MODEL,
                 *FAST, "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err and not nothing.exists()


def test_the_one_se_candidate_keeps_the_recommended_rate_unless_clearly_beaten():
    from sparseft.autolr import one_se_choice

    # 200 images at about 40 %: one standard error of a difference is about 4.9 points
    assert one_se_choice({1e-3: 0.44, 3e-3: 0.40, 1e-2: 0.30}, 3e-3, 200) == 3e-3  # +4 points: within noise
    assert one_se_choice({1e-3: 0.46, 3e-3: 0.40, 1e-2: 0.30}, 3e-3, 200) == 1e-3  # +6 points: beaten
    assert one_se_choice({1e-3: 0.405, 3e-3: 0.40}, 3e-3, 200_000) == 1e-3  # a large split resolves +0.5 points
    assert one_se_choice({1e-3: 0.40, 3e-3: 0.40}, 3e-3, 10**9) == 3e-3  # a tie keeps it
    with pytest.raises(ValueError, match="not among the rates tried"):
        one_se_choice({1e-3: 0.4}, 3e-3, 200)


def test_a_choice_within_the_validation_splits_noise_is_flagged(monkeypatch):
    """The one-standard-error reading of `--lr auto`'s choice (200 images: about 4.9 points near 40 %)."""
    from sparseft import autolr
    from sparseft.run import RunSpec

    monkeypatch.setattr(autolr, "load_split", lambda data, split: [None] * 200)
    spec = RunSpec(model="test_vit", data="mini-vtab/x", method="gps")
    tried = [{"lr": 1e-3, "val_acc": 0.42}, {"lr": 3e-3, "val_acc": 0.45}, {"lr": 1e-2, "val_acc": 0.30}]
    near = autolr._within_noise(spec, tried, "val_acc", 3e-3, 1e-3)
    assert near["within_noise"] and near["val_images"] == 200 and near["margin_points"] == 3.0
    tried[1]["val_acc"] = 0.55
    assert not autolr._within_noise(spec, tried, "val_acc", 3e-3, 1e-3)["within_noise"]
    assert autolr._within_noise(spec, tried, "val_acc", 1e-3, 1e-3) == {}  # the recommended rate itself
    assert autolr._within_noise(spec, tried, "val_miou", 3e-3, 1e-3) == {}  # not an accuracy
