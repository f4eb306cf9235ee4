"""The command line end to end on a tiny VTAB-layout task and a tiny random ViT; its flags and exit codes."""

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from helpers import LEGACY, make_vtab
from safetensors.torch import load_file

from sparseft import cli, cliopts
from sparseft.cli import build_parser, main
from sparseft.errors import InputError
from sparseft.train import TrainConfig, TrainingDiverged

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("task") / "toy", n_train=12, n_val=4, n_test=8, classes=3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gps", "full", "linear", "bitfit", "lora"])
def test_train_eval_info_merge(tmp_path, task, method, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", method, "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and len(summary["history"]) == 2
    task_file = run / "delta.safetensors"
    capsys.readouterr()
    assert main(["info", str(task_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method
    assert info["base"].startswith("test_vit") and "random initialisation (seed" in info["base"]
    assert main(["eval", str(task_file), "--data", str(task), "--json"]) == 0  # the task's own preprocessing and size
    result = json.loads(capsys.readouterr().out)
    assert result["acc"] == pytest.approx(summary["final"]["test_acc"])  # the merged reload reproduces the run
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(task_file), "--out", str(merged)]) == 0
    state = load_file(str(merged))
    assert not any("sparse_delta" in k or "lora" in k for k in state)  # a plain model
    assert "blocks.0.attn.qkv.weight" in state


def test_gps_options_reach_the_selection(tmp_path, task):
    run = tmp_path / "run"
    assert main(["train", "--method", "gps", "--k", "3", "--level", "layer", "--data", str(task), "--out", str(run),
                 *MODEL, *FAST]) == 0
    from sparseft import Selection

    sel = Selection.load(run / "selection.safetensors")
    assert sel.meta["k"] == 3 and sel.meta["level"] == "layer"


@pytest.mark.slow
def test_select_command_and_reuse(tmp_path, task):
    out = tmp_path / "sel.safetensors"
    assert main(["select", "--data", str(task), "--out", str(out), "--k", "2", *MODEL, "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--method", "gps", "--selection", str(out), "--data", str(task), "--out", str(run),
                 *MODEL, *FAST]) == 0
    a, b = load_file(str(out)), load_file(str(run / "selection.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_select_takes_gps_selection_flags_but_not_training_ones(tmp_path, capsys):
    assert main(["select", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--k " in shown and "--score-norm" in shown
    assert "--batchnorm" not in shown and "--selection " not in shown
    for flag, value in (("--batchnorm", "frozen"), ("--selection", "other.safetensors")):
        out = str(tmp_path / "s.safetensors")
        assert main(["select", "--data", "x", "--model", "m", "--out", out, flag, value]) == 2
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.slow
def test_resume_and_refusal_to_overwrite(tmp_path, task, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(task), "--out", str(run), *MODEL, *FAST]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished: returns its summary


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("command", [["eval", "--data", "some-task"], ["info"], ["merge", "--out", "merged.st"]])
def test_a_missing_task_file_is_one_line_and_status_1(tmp_path, command, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main([command[0], str(missing), *command[1:]]) == 1
    captured = capsys.readouterr()
    assert "missing.safetensors" in _one_error_line(captured.err) and not captured.out


def test_bad_data_is_one_line_and_status_1(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *MODEL, *FAST]) == 1
    assert "nowhere" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # a refused run leaves no folder behind
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "afile"), *MODEL, *FAST]) == 1
    assert "afile is a file; name a folder for the run" in _one_error_line(capsys.readouterr().err)


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, task, capsys):
    import os
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / ".sparseft.lock").write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process, not this one
    assert main(["train", "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 1
    assert f"in use by process {os.getppid()}" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == [".sparseft.lock"]


def test_merge_refuses_a_method_that_cannot_merge(tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(LEGACY / "adapter.safetensors"), "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "adapter.safetensors" in line and "merge" in line
    assert not out.exists()


def test_merge_never_overwrites_its_task_file_or_writes_into_a_folder(tmp_path, capsys):
    import shutil

    task_file = shutil.copyfile(LEGACY / "gps.safetensors", tmp_path / "gps.safetensors")
    before = task_file.read_bytes()
    assert main(["merge", str(task_file), "--out", str(task_file)]) == 1
    assert "task file itself" in _one_error_line(capsys.readouterr().err)
    assert main(["merge", str(task_file), "--out", str(tmp_path)]) == 1
    assert "is a folder" in _one_error_line(capsys.readouterr().err)
    assert task_file.read_bytes() == before


@pytest.mark.parametrize("argv", [["info", "x.safetensors", "--bogus"], ["train", "--bogus"], ["nonsense"],
                                  ["data", "fetch", "no-such-suite"], ["weights"]])
def test_usage_errors_are_status_2(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_weights_and_data_subcommands_follow_the_convention(tmp_path, capsys):
    assert main(["weights", "fetch", "no-such-backbone", "--cache", str(tmp_path)]) == 1
    assert "no-such-backbone" in _one_error_line(capsys.readouterr().err)
    assert main(["--help"]) == 0


def test_an_option_of_another_method_is_a_usage_error(tmp_path, task, capsys):
    run = tmp_path / "run"
    argv = ["train", "--method", "lora", "--k", "4", "--data", str(task), "--out", str(run), *MODEL, *FAST]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --k is not an option of method 'lora' (it belongs to gps, rosa, spiel); lora takes "
                           "--lora-targets, --lora-r")
    assert not run.exists()
    assert main([*argv[:3], "--k", "4", "--channels", "3", *argv[5:]]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--k, --channels are not options of method 'lora' (they belong to gps, rosa, sct, spiel)" in line
    assert main(["train", "--method", "linear", "--rank", "4", *argv[5:]]) == 2
    assert "linear takes --batchnorm\n" in capsys.readouterr().err  # the option every method has


def test_a_shared_flag_shows_each_methods_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "gps, rosa, sct, spiel, spt-lora, spt-adapter options:" in out
    text = " ".join(out.split())
    assert ("--select-batches SELECT_BATCHES limit the selection pass to N batches "
            "(default: gps: None, rosa: None, sct: None, spiel: None, spt-lora: 16, spt-adapter: 16)") in text
    assert "--rank RANK LoRA rank / adapter bottleneck width (default: 8)" in text  # spt-lora and spt-adapter agree
    assert "--k K selected input connections per neuron (default: 1)" in text


def test_method_options_reach_the_method(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "--method", "spt-lora", "--data", "d", "--out", "o", "--model", "m",
                              "--select-batches", "4", "--budget-rule", "tau"])
    options = cliopts.owned_options(args, "spt-lora", cli._method_options(), prefix=cli.OPTION_PREFIX)
    assert options == {"select_batches": 4, "budget_rule": "tau"}
    args = parser.parse_args(["train", "--method", "gps", "--data", "d", "--out", "o", "--model", "m",
                              "--no-select-patch-embed", "--train-norm", "--k", "2"])
    options = cliopts.owned_options(args, "gps", cli._method_options(), prefix=cli.OPTION_PREFIX)
    assert options == {"k": 2, "train_norm": True, "select_patch_embed": False}
    from sparseft.methods import get_method

    assert get_method("gps", **options).options.k == 2


def test_train_config_flags_round_trip():
    parser = build_parser()
    base = ["train", "--data", "d", "--out", "o", "--model", "m"]
    assert cli._train_config(parser.parse_args(base)) == TrainConfig()
    args = parser.parse_args([*base, "--epochs", "3", "--lr", "0.01", "--weight-decay", "0", "--optimizer", "adam",
                              "--warmup-epochs", "0.5", "--min-lr", "1e-6", "--label-smoothing", "0.1",
                              "--grad-clip", "2", "--bf16", "--seed", "7", "--eval-every", "2", "--no-progress"])
    assert cli._train_config(args) == TrainConfig(epochs=3, lr=0.01, weight_decay=0.0, optimizer="adam",
                                                  warmup_epochs=0.5, min_lr=1e-6, label_smoothing=0.1, grad_clip=2.0,
                                                  bf16=True, seed=7, eval_every=2, progress=False)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--optimizer", "sgd"])


@pytest.mark.parametrize("raised, status", [(KeyboardInterrupt(), 130), (TrainingDiverged("loss is nan"), 1),
                                            (InputError("bad\nvalue"), 1), (PermissionError("x.st"), 1),
                                            (SystemExit("unknown backbone"), 1), (SystemExit(3), 3),
                                            (cliopts.UsageError("no"), 2)])
def test_exit_status_of_each_kind_of_failure(monkeypatch, capsys, raised, status):
    def fail(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_info", fail)
    assert main(["info", "x"]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == (0 if status == 3 else 1)  # 3: as asked


def test_a_reader_of_stdout_that_went_away_ends_the_command_quietly(monkeypatch, capsys):
    """`sparseft info FILE | head -1`: no "error: [Errno 32] Broken pipe", status 1 (Python's recipe)."""
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no file descriptor")

    monkeypatch.setattr(cli, "cmd_info", lambda args: print("{" + "\n" * 10000 + "}"))
    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["info", "x"]) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a fresh interpreter imports torch and timm
def test_a_closed_pipe_on_stdout_leaves_stderr_empty(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "sparseft", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written (as `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "cmd_info", fail)
    with pytest.raises(KeyError):
        main(["info", "x"])
    monkeypatch.setattr(cli, "cmd_info", lambda args: (_ for _ in ()).throw(RuntimeError("torch says no")))
    with pytest.raises(RuntimeError):
        main(["info", "x"])
    monkeypatch.setattr(cli, "cmd_info", lambda args: (_ for _ in ()).throw(ValueError("an internal bug")))
    with pytest.raises(ValueError):  # a bare ValueError is not sparseft's refusal: a bug, with its traceback
        main(["info", "x"])


def test_eval_preprocessing_defaults_to_the_tasks_own():
    from sparseft.cli import KIND_PREFIX
    from sparseft.kinds.base import get_kind

    options = get_kind("classification").eval_options
    args = build_parser().parse_args(["eval", "t.safetensors", "--data", "d"])
    assert cliopts.from_args(args, options, prefix=KIND_PREFIX).preprocessing is None
    args = build_parser().parse_args(["eval", "t", "--data", "d", "--preprocessing", "fgvc"])
    assert cliopts.from_args(args, options, prefix=KIND_PREFIX).preprocessing == "fgvc"


@dataclasses.dataclass
class Toy:
    count: int = dataclasses.field(default=3, metadata={"help": "how many"})
    rate: float | None = dataclasses.field(default=None, metadata={"help": "a rate"})
    mode: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "the mode"})
    kind: str = dataclasses.field(default="x", metadata={"help": "50% of the kinds", "choices": ["x", "y"]})
    flag: bool = dataclasses.field(default=True, metadata={"help": "a switch"})
    path: Path | None = None


@dataclasses.dataclass
class OtherToy:
    count: int = dataclasses.field(default=5, metadata={"help": "how many of the other"})
    kind: str = dataclasses.field(default="z", metadata={"help": "kind", "choices": ["z"]})
    depth: int = 1


def test_cliopts_reads_dataclasses():
    parser = argparse.ArgumentParser()
    cliopts.add_arguments(parser, Toy)
    args = parser.parse_args([])
    assert cliopts.given(args, Toy) == {} and cliopts.from_args(args, Toy) == Toy()
    args = parser.parse_args(["--count", "4", "--rate", "0.5", "--mode", "b", "--kind", "y", "--no-flag",
                              "--path", "p"])
    assert cliopts.from_args(args, Toy) == Toy(count=4, rate=0.5, mode="b", kind="y", flag=False, path=Path("p"))
    for bad in (["--mode", "c"], ["--kind", "z"], ["--count", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["count"] == "how many (default: 3)" and helps["kind"] == "50%% of the kinds (default: x)"
    parser.format_help()  # a literal % does not break the help


def test_cliopts_shared_fields():
    parser = argparse.ArgumentParser()
    owners = {"toy": Toy, "other": OtherToy}
    assert cliopts.add_shared_arguments(parser, owners, prefix="o_")["count"] == ["toy", "other"]
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["o_count"] == "how many of the other (default: toy: 3, other: 5)"  # the longest help
    args = parser.parse_args(["--kind", "z", "--depth", "2"])  # choices are the union
    assert cliopts.owned_options(args, "other", owners, prefix="o_") == {"kind": "z", "depth": 2}
    args = parser.parse_args(["--count", "1", "--depth", "2"])
    with pytest.raises(cliopts.UsageError, match="--depth is not an option of method 'toy' .it belongs to other."):
        cliopts.owned_options(args, "toy", owners, prefix="o_")


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


def test_eval_of_a_split_the_task_was_trained_on_says_so(tmp_path, task, capsys):
    """The final protocol trains on train800val200: its val200 is training data, and eval says so (test does not)."""
    from sparseft.api import trained_on

    run = tmp_path / "run"
    assert main(["train", "--method", "bitfit", "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 0
    capsys.readouterr()
    task_file = str(run / "delta.safetensors")
    assert main(["eval", task_file, "--data", str(task), "--split", "val200"]) == 0
    assert "trained on train800val200" in capsys.readouterr().err
    assert main(["eval", task_file, "--data", str(task), "--split", "test"]) == 0
    assert "warning" not in capsys.readouterr().err
    record = {"data": "mini-vtab/x", "train_split": "train800"}
    assert trained_on(record, "mini-vtab/x", "val200") is None and trained_on(record, "mini-vtab/x", "train800")
    assert trained_on(record, "mini-vtab/y", "train800") is None  # other data
    assert trained_on({"data": "mini-vtab/x"}, "mini-vtab/x", "val200") is None  # an older file's record
