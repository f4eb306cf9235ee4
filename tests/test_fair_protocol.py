"""What makes comparisons fair: one BatchNorm policy for every method, tuning once per cell,
results folders that keep protocols apart, no selection on test data, the official bias rule,
and the column-normalised GPS variant."""

import copy
import json

import pytest
import torch
from helpers import make_vtab, tiny_model, toy_batches, train_steps

import sparseft
from sparseft.bench import load_suite, plan, run_suite, shipped_suites
from sparseft.bench.runner import beyond_edge, runs_in_cell
from sparseft.bench.suite import SuiteError
from sparseft.cli import main
from sparseft.methods import METHODS, MethodContext, get_method
from sparseft.selection import parameter_roles
from sparseft.selection.gps import normalize_columns, top_k_per_neuron

BN_METHODS = {"linear": {}, "bitfit": {}, "full": {}, "gps": {"k": 1}, "ssf": {},
              "lora": {"lora_targets": "conv1,conv2", "lora_conv": True}}


def _stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running_" in n}


@pytest.mark.parametrize("method", sorted(BN_METHODS))
@pytest.mark.parametrize("policy", ["update", "frozen"])
def test_every_method_follows_the_batchnorm_policy(method, policy, tmp_path):
    base = tiny_model("resnet")
    model = copy.deepcopy(base)
    batches = toy_batches(2, batch=8)
    views = [([x, x.flip(-1)], y) for x, y in batches]
    m = get_method(method, batchnorm=policy, **BN_METHODS[method])
    m.prepare(model, MethodContext(loader={"select": views, "train": batches}.__getitem__, progress=False))
    train_steps(model, steps=2, weight_decay=0.0)
    before, after = _stats(base), _stats(model)
    if policy == "frozen":
        assert all(torch.equal(before[n], after[n]) for n in before), "frozen statistics moved"
    else:
        assert any(not torch.equal(before[n], after[n]) for n in before), "statistics did not update"
    path = m.save(model, tmp_path / "task.safetensors")
    fresh = METHODS[method]().load(copy.deepcopy(base), path)
    reloaded = _stats(fresh)
    assert all(torch.equal(after[n], reloaded[n]) for n in after), "the task file lost the statistics"


def test_batchnorm_defaults_are_each_methods_own_and_bad_values_are_refused():
    assert get_method("full").batchnorm_mode() == "update"
    assert get_method("gps").batchnorm_mode() == "frozen"  # changed on evidence (docs/results.md)
    assert get_method("gps", batchnorm="update").batchnorm_mode() == "update"
    assert get_method("lora").batchnorm_mode() == "frozen"
    assert get_method("lora", batchnorm="update").batchnorm_mode() == "update"
    with pytest.raises(ValueError, match="batchnorm"):
        get_method("linear", batchnorm="sometimes")


def test_a_resumed_run_keeps_the_batchnorm_policy_it_trained_with(tmp_path):
    from sparseft.run import RunSpec, run
    from sparseft.train import TrainConfig

    spec = RunSpec(model="test_resnet", data=str(make_vtab(tmp_path / "task")), method="gps", options={"k": 1},
                   img_size=32, batch_size=8, train=TrainConfig(epochs=1, lr=1e-3, progress=False))
    run(spec, tmp_path / "run")
    config = tmp_path / "run" / "config.json"
    assert json.loads(config.read_text())["batchnorm"] == "frozen"  # GPS's default, recorded

    def interrupted_before_the_policy_was_recorded():  # a run of the old default, its last files lost
        stored = json.loads(config.read_text())
        del stored["batchnorm"]
        config.write_text(json.dumps(stored))
        for name in ("summary.json", "delta.safetensors"):
            (tmp_path / "run" / name).unlink()

    interrupted_before_the_policy_was_recorded()
    run(spec, tmp_path / "run", resume=True)
    assert json.loads(config.read_text())["batchnorm"] == "update"  # GPS's default when that run started
    header, _ = sparseft.read_delta(tmp_path / "run" / "delta.safetensors")
    assert header["batchnorm"] == "update"
    interrupted_before_the_policy_was_recorded()
    frozen = RunSpec(**{**spec.__dict__, "options": {"k": 1, "batchnorm": "frozen"}})
    with pytest.raises(ValueError, match="changed settings.*batchnorm"):
        run(frozen, tmp_path / "run", resume=True)


def _suite(tmp_path, data, extra=""):
    text = f"""
name: tiny
protocol: honest
tasks: {{natural: ["{data}"]}}
backbones: [{{name: vit_tiny_patch16_224, img_size: 32}}]
train: {{epochs: 1, batch_size: 4, warmup_epochs: 0}}
methods:
  - {{label: linear, method: linear, grid: {{lr: [1.0e-3, 1.0e-2]}}}}
seeds: [0, 1]
{extra}
"""
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_first_seed_tuning_runs_the_grid_once_and_every_seed_uses_its_choice(tmp_path):
    data = make_vtab(tmp_path / "task")
    suite = load_suite(_suite(tmp_path, data, "batchnorm: frozen\nextend_edges: 0"))
    cells = plan(suite)
    assert [c.seed for c in cells] == [0, 1]  # seed by seed
    assert [runs_in_cell(suite, c) for c in cells] == [3, 1]
    records = run_suite(suite, tmp_path / "res", progress=False)
    first, second = records
    assert len(first["tuning"]) == 2 and second["tuning"] == []
    assert second["chosen"] == first["chosen"] and second["tuned_on_seed"] == 0
    assert first["grid"] == {"lr": [1.0e-3, 1.0e-2]}
    assert first["train"]["optimizer"] == "adamw" and first["options"]["batchnorm"] == "frozen"
    assert not (tmp_path / "res" / "vit_tiny_patch16_224@32" / "task" / "linear" / "seed1" / "tune").exists()
    assert json.loads((tmp_path / "res" / "suite.json").read_text())["tuning"] == "first_seed"


def test_each_seed_tuning_and_bad_values(tmp_path):
    data = make_vtab(tmp_path / "task")
    suite = load_suite(_suite(tmp_path, data, "tuning: each_seed"))
    assert [runs_in_cell(suite, c) for c in plan(suite)] == [3, 3]
    with pytest.raises(SuiteError, match="tuning"):
        load_suite(_suite(tmp_path, data, "tuning: sometimes"))
    with pytest.raises(SuiteError, match="batchnorm"):
        load_suite(_suite(tmp_path, data, "batchnorm: maybe"))


def test_a_results_folder_never_mixes_protocols(tmp_path):
    data = make_vtab(tmp_path / "task")
    out = tmp_path / "res"
    out.mkdir()
    (out / "suite.json").write_text(json.dumps({"name": "tiny", "protocol": "honest"}))
    with pytest.raises(ValueError, match="protocol 'honest', not 'paper'"):
        run_suite(load_suite(_suite(tmp_path, data), protocol="paper"), out, progress=False)
    (out / "suite.json").write_text(json.dumps({"name": "other", "protocol": "honest"}))
    with pytest.raises(ValueError, match="name 'other'"):
        run_suite(load_suite(_suite(tmp_path, data)), out, progress=False)


def test_select_refuses_a_test_split_unless_told_why(tmp_path, capsys):
    data = make_vtab(tmp_path / "task")
    common = ["select", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", str(data), "--batch-size",
              "4", "--no-progress"]
    assert main([*common, "--split", "test", "--out", str(tmp_path / "a.safetensors")]) == 1
    assert "--allow-test-split" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()
    assert main([*common, "--split", "test", "--allow-test-split", "reproduce the official SAM script",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    meta = sparseft.Selection.load(tmp_path / "b.safetensors").meta
    assert meta["split"] == "test" and meta["test_split_reason"] == "reproduce the official SAM script"


def test_swin_bias_tables_train_in_full_like_the_official_code():
    model = tiny_model("swin")
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables
    roles = parameter_roles(model)
    assert all(roles[n] == "full" for n in tables)
    per_row = parameter_roles(model, sparseft.selection.Eligibility(select_bias_tables=True))
    assert all(per_row[n] == "select" for n in tables)
    gps = get_method("gps", select_bias_tables=True)
    assert gps.rules().select_bias_tables


def test_column_normalised_scores_spread_top1_over_inputs():
    # every row's raw scores peak on input 0 (a high-activation channel); relative to each column's
    # mean, row i peaks on input i
    scores = torch.ones(4, 4) + torch.eye(4)
    scores[:, 0] *= 10
    raw = top_k_per_neuron({"w": scores}, 1)["w"] % 4
    normed = top_k_per_neuron(normalize_columns({"w": scores}), 1)["w"] % 4
    assert raw.tolist() == [0, 0, 0, 0]
    assert normed.tolist() == [0, 1, 2, 3]


def test_column_normalised_gps_selects_and_records_it():
    model = tiny_model("vit")
    batches = toy_batches(2, batch=8)
    views = [([x, x.flip(-1)], y) for x, y in batches]
    sel = sparseft.select(model, views, k=1, score_norm="column", progress=False)
    assert sel.meta["score_norm"] == "column"
    plain = sparseft.select(model, views, k=1, progress=False)
    assert any(not torch.equal(sel.indices[n], plain.indices[n]) for n in sel.indices)
    with pytest.raises(ValueError, match="score_norm"):
        sparseft.select(model, views, k=1, score_norm="rows", progress=False)


@pytest.mark.parametrize("name", shipped_suites())
def test_shipped_honest_suites_are_fair(name):
    suite = load_suite(name)
    if suite.protocol == "screen":  # validation only: equal grids, one seed by design
        assert "screen" in name and len({len(m.grid_points(suite.grid)) for m in suite.methods}) == 1
        return
    if suite.protocol != "honest":
        assert name.endswith("-paper"), "paper-protocol suites are labelled as such"
        return
    assert all(not m.per_task for m in suite.methods), "per-task settings come from test-tuned scripts"
    sizes = {m.label: len(m.grid_points(suite.grid)) for m in suite.methods}
    tuned = {n for n in sizes.values() if n > 1}
    assert len(tuned) <= 1, f"unequal grids: {sizes}"
    if tuned:
        assert len(suite.seeds) >= 3


@pytest.mark.slow
def test_a_finished_cell_made_with_other_settings_is_refused(tmp_path):
    data = make_vtab(tmp_path / "task")
    out = tmp_path / "res"
    run_suite(load_suite(_suite(tmp_path, data)), out, progress=False)
    run_suite(load_suite(_suite(tmp_path, data)), out, progress=False)  # the same suite: reused as it is
    changed = _suite(tmp_path, data).read_text().replace("[1.0e-3, 1.0e-2]", "[1.0e-3, 3.0e-2]")
    (tmp_path / "suite.yaml").write_text(changed)
    with pytest.raises(ValueError, match=r"record.json: made with other settings \(grid"):
        run_suite(load_suite(tmp_path / "suite.yaml"), out, progress=False)
    reseeded = _suite(tmp_path, data).read_text().replace("seeds: [0, 1]", "seeds: [1, 0]")
    (tmp_path / "suite.yaml").write_text(reseeded)  # seed 1 would now tune, but its record reused seed 0's choice
    with pytest.raises(ValueError, match="tuned_on_seed"):
        run_suite(load_suite(tmp_path / "suite.yaml"), out, progress=False)
    with pytest.raises(SuiteError, match="repeat"):
        load_suite(_suite(tmp_path, data, "seeds: [0, 0, 1]"))


def test_a_nearly_silent_column_does_not_win_a_row():
    scores = torch.ones(4, 4)
    scores[:, 3] = 0.0
    scores[2, 3] = 1e-30  # column 3 is silent but for a tiny score in row 2
    top = top_k_per_neuron(normalize_columns({"w": scores}), 1)["w"] % 4
    assert top[2].item() != 3


def test_one_step_beyond_the_edge():
    tried = [{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}]
    assert beyond_edge(tried, {"lr": 1e-3}) == {"lr": 3e-4}
    assert beyond_edge(tried, {"lr": 1e-2}) == {"lr": 3e-2}
    assert beyond_edge(tried, {"lr": 3e-3}) is None
    assert beyond_edge([*tried, {"lr": 3e-4}], {"lr": 3e-4}) == {"lr": 1e-4}
    assert beyond_edge([{"lr": 1e-3, "k": 1}, {"lr": 3e-3, "k": 2}], {"lr": 1e-3, "k": 1}) is None  # two keys
    assert beyond_edge([{"lr": 1e-3}], {"lr": 1e-3}) is None


@pytest.mark.slow
def test_a_best_point_on_the_edge_is_extended_and_the_record_reused(tmp_path):
    data = make_vtab(tmp_path / "task")
    suite = load_suite(_suite(tmp_path, data, "extend_edges: 1"))
    first, second = run_suite(suite, tmp_path / "res", progress=False)
    assert len(first["tuning"]) == 3  # a 2-point grid's best is always on an edge: one step beyond was tried
    assert first["grid_planned"] == {"lr": [1.0e-3, 1.0e-2]}
    assert first["grid"]["lr"] == sorted({1.0e-3, 1.0e-2, first["tuning"][2]["point"]["lr"]})
    assert first["tuning"][2]["point"]["lr"] in (1.0e-4, 1.0e-1)
    assert second["chosen"] == first["chosen"] and second["grid"] == first["grid"]
    again = run_suite(load_suite(_suite(tmp_path, data, "extend_edges: 1")), tmp_path / "res", progress=False)
    assert again == [first, second]  # reused as they are


def _lock(folder, pid):
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".sparseft.lock").write_text(f"{socket.gethostname()} {pid}")


@pytest.mark.slow
def test_a_cell_held_by_another_live_process_is_left_to_it(tmp_path, capsys):
    import os
    import subprocess

    from sparseft.fileutil import FolderInUse, folder_lock

    data = make_vtab(tmp_path / "task")
    suite = load_suite(_suite(tmp_path, data, "extend_edges: 0"))
    out = tmp_path / "res"
    first, second = plan(suite)
    _lock(first.folder(out), os.getppid())  # a live process that is not this one
    assert run_suite(suite, out, progress=True) == []  # seed 1 reuses seed 0's choice: both wait
    said = capsys.readouterr().out
    assert f"in use by process {os.getppid()}" in said and "2 cells were in use by another process" in said
    assert not (first.folder(out) / "tune").exists()
    with pytest.raises(FolderInUse, match=str(os.getppid())):
        with folder_lock(first.folder(out)):
            pass
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock(first.folder(out), dead.pid)  # a killed run's lock: taken over
    records = run_suite(suite, out, progress=False)
    assert [r["seed"] for r in records] == [0, 1]
    assert not (first.folder(out) / ".sparseft.lock").exists()


def test_a_lock_file_of_the_earlier_scheme_counts_while_its_process_runs(tmp_path, monkeypatch):
    import os
    import socket
    import time

    from sparseft import fileutil
    from sparseft.fileutil import FolderInUse, folder_lock, process_start

    parent, host = os.getppid(), socket.gethostname()
    if process_start(parent) is None:
        pytest.skip("no /proc here")
    lock = tmp_path / ".sparseft.lock"
    open_fds = len(os.listdir("/proc/self/fd"))
    lock.write_text(f"{host} {process_start(parent)} {parent}")  # the live process that took it
    with pytest.raises(FolderInUse, match=f"process {parent} .*delete .*sparseft.lock"):
        with folder_lock(tmp_path):
            pass
    lock.write_text(f"otherhost 1 {parent}")  # another host's: it cannot be checked from here, so it counts
    with pytest.raises(FolderInUse, match="process .* on otherhost .*delete"):
        with folder_lock(tmp_path):
            pass
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the refusals closed what they opened
    lock.write_text(f"{host} 1 {parent}")  # the pid, reused by a process started later: the taker is gone
    with folder_lock(tmp_path):
        assert lock.read_text().split(" ") == [host + "+flock", process_start(os.getpid()), str(os.getpid())]
        # the earlier scheme's readers see another host's lock: they never take a new lock over
        assert lock.read_text().split(" ")[0] != host and lock.read_text().rsplit(" ", 1)[0] != host
    assert not lock.exists()
    lock.write_text(f"{host} {os.getpid()}")  # an older lock naming this very process (a restarted container)
    with folder_lock(tmp_path):
        pass
    monkeypatch.setattr(fileutil, "LOCK_WRITE_GRACE_S", 0.3)
    lock.write_text("")  # just created by the earlier scheme and not yet written: wait for its writer
    start = time.monotonic()
    with folder_lock(tmp_path):
        assert time.monotonic() - start >= 0.2
    assert len(os.listdir("/proc/self/fd")) == open_fds
    # a lock file this process creates is its own from the start: no wait for an earlier writer
    monkeypatch.setattr(fileutil, "LOCK_WRITE_GRACE_S", 30.0)
    start = time.monotonic()
    with folder_lock(tmp_path / "fresh"):
        assert time.monotonic() - start < 5


def _hold(folder, ready, release):  # a child process: take the lock, say so, wait to be told to let go
    from sparseft.fileutil import folder_lock

    with folder_lock(folder):
        ready.set()
        release.wait(30)


def test_a_lock_ends_with_its_process_and_a_left_file_is_free(tmp_path):
    import multiprocessing
    import os
    import signal

    from sparseft.fileutil import FolderInUse, folder_lock

    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    child.start()
    assert ready.wait(30)
    with pytest.raises(FolderInUse, match=f"in use by process {child.pid} on "):
        with folder_lock(tmp_path):
            pass
    os.kill(child.pid, signal.SIGKILL)  # killed while holding it: the file stays, the kernel's lock goes
    child.join()
    assert (tmp_path / ".sparseft.lock").exists()
    with folder_lock(tmp_path):
        assert (tmp_path / ".sparseft.lock").read_text().endswith(f" {os.getpid()}")
    assert not (tmp_path / ".sparseft.lock").exists()
    (tmp_path / ".sparseft.lock").write_text("")  # empty: no one holds it
    with folder_lock(tmp_path):
        pass


def _race(folder, start, tried, wins):  # a child process: try with the others, hold it until all have tried
    from sparseft.fileutil import FolderInUse, folder_lock

    start.wait(30)
    try:
        with folder_lock(folder):
            with wins.get_lock():
                wins.value += 1
            tried.wait(30)
    except FolderInUse:
        tried.wait(30)


def test_of_processes_taking_a_stale_lock_at_once_exactly_one_gets_it(tmp_path):
    import multiprocessing
    import subprocess

    ctx = multiprocessing.get_context("fork")
    dead = subprocess.Popen(["true"])
    dead.wait()
    for _ in range(3):
        _lock(tmp_path, dead.pid)  # the lock file of a killed sparseft 0.2 run
        start, tried, wins = ctx.Barrier(6), ctx.Barrier(6), ctx.Value("i", 0)
        children = [ctx.Process(target=_race, args=(tmp_path, start, tried, wins)) for _ in range(6)]
        for c in children:
            c.start()
        for c in children:
            c.join(60)
        assert [c.exitcode for c in children] == [0] * 6
        assert wins.value == 1
