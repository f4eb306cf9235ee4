"""Two processes (torchrun, gloo on CPU) select and train as one process does.

One torchrun launch (run as a script: this file's `__main__`) runs the CLI's `select` and `train`
(GPS, LoRA, GPS on a segmentation task, and a GPS run interrupted after its first epoch, then
resumed) in two processes; the tests compare its files with the same commands run here in one
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import make_seg_task, make_vtab
from safetensors.torch import load_file

import sparseft
from sparseft import distributed
from sparseft.cli import main
from sparseft.data import DataWarning
from sparseft.selection import Selection

REPO = Path(__file__).resolve().parents[1]
# the launched processes import the sparseft this process tests (an editable install may point elsewhere)
CODE = os.pathsep.join([str(Path(sparseft.__file__).resolve().parents[1]),
                        *filter(None, [os.environ.get("PYTHONPATH")])])
MODEL = ["--model", "test_vit", "--img-size", "32"]
TRAIN = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress"]
EMBED = 64  # test_vit's width: qkv.bias holds the query, key and value biases of this size


def commands(task: Path, out: Path) -> dict[str, list[str]]:
    """The CLI commands both sides run, writing under `out`."""
    train = ["train", "--data", str(task), *MODEL, *TRAIN]
    return {"select": ["select", "--data", str(task), "--out", str(out / "select.safetensors"), "--k", "2",
                       "--batch-size", "4", "--no-progress", *MODEL],
            "gps": [*train, "--method", "gps", "--k", "2", "--out", str(out / "gps")],
            "lora": [*train, "--method", "lora", "--out", str(out / "lora")],
            # masks: the pixel loss is shared by the valid pixels of the whole batch, not of each half
            "seg": ["train", "--data", str(task.parent / "seg"), *MODEL, *TRAIN, "--method", "gps", "--k", "1",
                    "--out", str(out / "seg")],
            "resumed": [*train, "--method", "gps", "--k", "2", "--out", str(out / "resumed")]}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_seg_task(root / "seg", size=36)  # masks at 36 px, the model at 32: scores at the masks' size
    return make_vtab(root / "task", n_train=12, n_val=4, n_test=8, classes=3)


@pytest.fixture(scope="module")
def two(task) -> tuple[Path, str]:
    """The run folders of the two-process launch, and what it printed."""
    out = task.parent / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(task), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": CODE})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def one(task) -> Path:
    out = task.parent / "one"
    for name, argv in commands(task, out).items():
        if name != "resumed":
            assert main(argv) == 0, name
    return out


@pytest.mark.slow
def test_two_process_selection_equals_one_process_selection(one, two):
    out, printed = two
    a, b = Selection.load(one / "select.safetensors"), Selection.load(out / "select.safetensors")
    assert a.indices.keys() == b.indices.keys()
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
    assert (a.meta["world_size"], b.meta["world_size"]) == (1, 2)
    assert {k: v for k, v in a.meta.items() if k != "world_size"} == {k: v for k, v in b.meta.items()
                                                                       if k != "world_size"}
    assert printed.count("selected ") == 1  # rank 0 alone reports (and writes)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gps", "lora", "seg"])
def test_two_process_training_matches_one_process(one, two, method):
    out, printed = two
    a, b = load_file(one / method / "delta.safetensors"), load_file(out / method / "delta.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("qkv.bias"):
            # the loss does not depend on the key biases (softmax is shift-invariant): their gradient is
            # rounding noise, which Adam scales to steps of the learning rate; compare query and value
            x, y = torch.cat([x[:EMBED], x[2 * EMBED:]]), torch.cat([y[:EMBED], y[2 * EMBED:]])
        # Adam divides by the gradient's RMS: where that is tiny, rounding differences (float sums in another
        # order) grow to a fraction of a step; measured: at most 6e-6 (GPS), 9e-7 (LoRA), mostly below 3e-8
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5, msg=name)  # 1 % of the learning rate
    final_a = json.loads((one / method / "summary.json").read_text())["final"]
    summary = json.loads((out / method / "summary.json").read_text())
    final_b = summary["final"]
    assert (final_b["test_acc"], final_b["train_acc"]) == (final_a["test_acc"], final_a["train_acc"])
    assert final_b["train_loss"] == pytest.approx(final_a["train_loss"], rel=1e-5)
    assert final_b["test_loss"] == pytest.approx(final_a["test_loss"], rel=1e-5)
    if method == "seg":  # evaluation sums each rank's intersections and unions
        assert final_b["test_mIoU"] == pytest.approx(final_a["test_mIoU"], abs=1e-6)
        assert final_b["test_mIoU_per_image"] == pytest.approx(final_a["test_mIoU_per_image"], abs=1e-6)
    assert sorted(p.name for p in (out / method).iterdir()) == sorted(p.name for p in (one / method).iterdir())
    assert summary["world_size"] == 2
    assert json.loads((out / method / "config.json").read_text())["world_size"] == 2
    if method == "gps":
        assert Selection.load(out / method / "selection.safetensors").meta["world_size"] == 2
    assert printed.count(f"{out / method / 'delta.safetensors'}") == 1


@pytest.mark.slow
def test_a_resumed_two_process_run_equals_the_uninterrupted_one(two):
    out, _ = two
    whole, resumed = load_file(out / "gps" / "delta.safetensors"), load_file(out / "resumed" / "delta.safetensors")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    lines = (out / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    final = [json.loads((out / r / "summary.json").read_text())["final"] for r in ("gps", "resumed")]
    assert [{k: v for k, v in f.items() if k != "epoch_time_s"} for f in final][0] == \
        {k: v for k, v in final[1].items() if k != "epoch_time_s"}


def test_selection_views_do_not_depend_on_the_loader_workers(task, one):
    argv = commands(task, task.parent / "workers")["select"]
    assert main([*argv, "--workers", "1"]) == 0
    a, b = Selection.load(one / "select.safetensors"), Selection.load(task.parent / "workers" / "select.safetensors")
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)


def test_batches_are_sharded_whole_or_sliced(monkeypatch):
    from torch.utils.data import BatchSampler

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    batches = BatchSampler(range(13), 4, drop_last=False)  # 4, 4, 4, 1
    whole = distributed.ShardedBatchSampler(batches, "batches")
    assert list(whole) == [[4, 5, 6, 7], [12]] and len(whole) == 2
    sliced = distributed.ShardedBatchSampler(batches, "slices")
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("error")  # rank 1 says nothing: the group's one warning is rank 0's
        assert list(sliced) == [[2, 3], [6, 7], [10, 11]]
    assert len(sliced) == 3 and sliced.global_sizes == [4, 4, 4]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    first = distributed.ShardedBatchSampler(batches, "slices")
    with pytest.warns(DataWarning, match="a batch of 1 images for 2 processes is left out"), torch.random.fork_rng():
        assert list(first) == [[0, 1], [4, 5], [8, 9]]


def test_a_batch_that_cannot_be_split_between_the_processes_is_refused(monkeypatch):
    """--batch-size 1 with two processes: every batch would be left out and the run train on nothing."""
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    data = TensorDataset(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"--batch-size 1 is smaller than the number of processes \(2\)"):
        distributed.shard(DataLoader(data, batch_size=1), "slices")
    with pytest.raises(ValueError, match="the training split has 1 image, fewer than the 2 processes"):
        distributed.shard(DataLoader(TensorDataset(torch.zeros(1, 3), torch.zeros(1)), batch_size=4), "slices")
    assert len(distributed.shard(DataLoader(data, batch_size=2), "slices")) == 2  # 2, 2 (the last 1 left out)
    assert len(distributed.shard(DataLoader(data, batch_size=1), "samples")) == 3  # evaluation: samples 0, 2, 4


def test_a_run_refuses_a_batch_smaller_than_the_processes_before_writing(monkeypatch, task, tmp_path, capsys):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), *MODEL, "--batch-size", "1", "--out", str(out), "--no-progress"]) == 1
    assert "--batch-size 1 is smaller than the number of processes (2)" in capsys.readouterr().err
    assert not out.exists()  # nothing written: the same command with a valid batch size can run there


def test_only_train_and_select_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "init_from_env", lambda: False)
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert main(["info", "no-such-file.safetensors"]) == 2
    assert "sparseft info runs in one process" in capsys.readouterr().err


def _worker(task: Path, out: Path) -> None:
    """One rank of the launch: the commands of `commands`, the last one interrupted and resumed."""
    import sparseft.train

    distributed.init_from_env()
    argv = commands(task, out)
    for name in ("select", "gps", "lora", "seg"):
        assert main(argv[name]) == 0, name
    real, calls = sparseft.train._non_finite, []

    def stop_in_second_epoch(*args):  # called on every rank after each epoch, before the checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    sparseft.train._non_finite = stop_in_second_epoch
    assert main(argv["resumed"]) == 130
    sparseft.train._non_finite = real
    assert main([*argv["resumed"], "--resume"]) == 0
    distributed.shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
