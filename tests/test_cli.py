"""The command line end to end on a tiny VTAB-layout task and a tiny random ViT."""

import json

import pytest
import torch
from _data_helpers import make_vtab
from safetensors.torch import load_file

from sparseft.cli import build_parser, main

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("task") / "toy", n_train=12, n_val=4, n_test=8, classes=3)


@pytest.mark.parametrize("method", ["gps", "full", "linear", "bitfit"])
def test_train_eval_info_merge(tmp_path, task, method, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", method, "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and len(summary["history"]) == 2
    task_file = run / "delta.safetensors"
    capsys.readouterr()
    assert main(["eval", str(task_file), "--data", str(task)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acc"] == pytest.approx(summary["final"]["test_acc"])  # the merged reload reproduces the run
    assert main(["info", str(task_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(task_file), "--out", str(merged)]) == 0
    state = load_file(str(merged))
    assert not any("sparse_delta" in k for k in state)
    assert "blocks.0.attn.qkv.weight" in state


def test_gps_options_reach_the_selection(tmp_path, task):
    run = tmp_path / "run"
    assert main(["train", "--method", "gps", "--k", "3", "--level", "layer", "--data", str(task), "--out", str(run),
                 *MODEL, *FAST]) == 0
    from sparseft import Selection

    sel = Selection.load(run / "selection.safetensors")
    assert sel.meta["k"] == 3 and sel.meta["level"] == "layer"


def test_select_command_and_reuse(tmp_path, task):
    out = tmp_path / "sel.safetensors"
    assert main(["select", "--data", str(task), "--out", str(out), "--k", "2", *MODEL, "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--method", "gps", "--selection", str(out), "--data", str(task), "--out", str(run),
                 *MODEL, *FAST]) == 0
    a, b = load_file(str(out)), load_file(str(run / "selection.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_and_refusal_to_overwrite(tmp_path, task, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(task), "--out", str(run), *MODEL, *FAST]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished: returns its summary


def test_bad_input_gets_a_clear_error(tmp_path, task, capsys):
    assert main(["eval", str(tmp_path / "missing.safetensors"), "--data", str(task)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *MODEL, *FAST]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            if action.dest != "help" and action.option_strings:
                assert action.help, f"sparseft {name} {action.option_strings} has no help"


def test_methods_lists_counts(capsys):
    assert main(["methods", *MODEL[:2], "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    for method in ("gps", "full", "linear", "bitfit"):
        assert method in out
