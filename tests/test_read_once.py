"""Each command reads and verifies a task file once (a counting wrapper around the file read and the hash)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_vtab, toy_base, toy_batches, trained_model

import sparseft
import sparseft.deltafile
from sparseft.cli import main
from sparseft.methods import get_method


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return get_method("gps").save(trained_model("gps"), tmp_path_factory.mktemp("task") / "task.safetensors",
                                  extra={"model": "test_vit", "num_classes": 3, "img_size": 32, "init_seed": 0})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("data") / "toy", n_train=4, n_val=2, n_test=4, classes=3)


@pytest.fixture
def reads(monkeypatch):
    """How often a task file was read from disk and its tensors hashed, since the test began."""
    counts = {"read": 0, "hash": 0}
    read, checksum = sparseft.deltafile.read_tagged_safetensors, sparseft.deltafile._tensor_checksum

    def counted_read(*args, **kwargs):
        counts["read"] += 1
        return read(*args, **kwargs)

    def counted_checksum(*args, **kwargs):
        counts["hash"] += 1
        return checksum(*args, **kwargs)

    monkeypatch.setattr(sparseft.deltafile, "read_tagged_safetensors", counted_read)
    monkeypatch.setattr(sparseft.deltafile, "_tensor_checksum", counted_checksum)
    return counts


@pytest.mark.parametrize("command", ["eval", "predict", "merge", "info"])
def test_each_command_reads_the_task_file_once(command, task_file, data, tmp_path, reads, capsys):
    argv = {"eval": ["eval", str(task_file), "--data", str(data)],
            "predict": ["predict", str(task_file), str(data / "images"), "--no-progress"],
            "merge": ["merge", str(task_file), "--out", str(tmp_path / "merged.safetensors")],
            "info": ["info", str(task_file)]}[command]
    assert main(argv) == 0, capsys.readouterr().err
    # merge hashes a second time: the checksum of the merged file it writes, not the task file again
    assert reads == {"read": 1, "hash": 2 if command == "merge" else 1}


def test_a_task_bank_reads_each_added_file_once(task_file, reads):
    bank = sparseft.TaskBank(toy_base())
    bank.add("task", task_file)
    assert reads == {"read": 1, "hash": 1}


def test_a_task_file_read_once_is_what_load_takes(task_file, reads):
    task = sparseft.read_delta(task_file)
    header, tensors = task  # still the (header, tensors) pair
    assert header is task.header and tensors is task.tensors and task.path == task_file
    x = toy_batches(1, batch=2, classes=3)[0][0]
    with torch.no_grad():
        assert torch.equal(sparseft.load(task).eval()(x), sparseft.load(task_file).eval()(x))
    assert reads == {"read": 2, "hash": 2}  # read_delta once, the second load once
