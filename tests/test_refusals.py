"""What sparseft refuses: run folders, resumes, settings, diverged checkpoints, changed weights, bad files.

Each test checks that the error names the offending file/option/tensor and that nothing was overwritten.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LEGACY, make_vtab, random_selection, tiny_model, toy_loader, train_steps

import sparseft
from sparseft.cli import main
from sparseft.train import TrainConfig, TrainingDiverged, fit

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress",
        "--method", "linear"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("task") / "toy", n_train=8, n_val=4, n_test=6, classes=3)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_fresh_run_refuses_a_folder_that_is_not_empty(tmp_path, task, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "delta.safetensors").write_bytes(b"another task's file")
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 1
    assert f"{out} is not empty" in one_line(capsys.readouterr().err)
    assert snapshot(out) == {"delta.safetensors": b"another task's file", "notes.txt": b"mine"}
    assert main(["train", "--data", str(task), "--out", str(out), "--overwrite", *MODEL, *FAST]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").exists()


def test_resume_refuses_changed_settings_and_a_missing_run(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--data", str(task), "--out", str(out), "--resume", *MODEL, *FAST, "--lr", "0.01"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "config.json" in line and "changed settings" in line and "lr: 0.001 -> 0.01" in line
    assert main(["train", "--data", str(task), "--out", str(tmp_path / "none"), "--resume", *MODEL, *FAST]) == 1
    assert "nothing to resume" in one_line(capsys.readouterr().err)
    (out / "checkpoint.json").unlink()  # a finished run whose checkpoint is gone is not trained again
    assert main(["train", "--data", str(task), "--out", str(out), "--resume", *MODEL, *FAST]) == 0
    assert {k: v for k, v in snapshot(out).items() if k != "checkpoint.json"} == {
        k: v for k, v in before.items() if k != "checkpoint.json"}


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--lr", "-1", "lr (--lr) must be > 0"), ("--epochs", "0", "epochs (--epochs) must be >= 1"),
    ("--label-smoothing", "2", "label_smoothing (--label-smoothing) must be in [0, 1)"),
    ("--img-size", "7", "img_size (--img-size) 7 is not a positive multiple"),
])
def test_bad_settings_fail_before_any_work_naming_the_flag(tmp_path, task, capsys, flag, value, named):
    out = tmp_path / "run"
    argv = ["train", "--data", str(task), "--out", str(out), *MODEL, *FAST, flag, value]
    assert main(argv) == 1
    assert named in one_line(capsys.readouterr().err)
    assert not out.exists() or not any(out.iterdir())


def test_gps_k_zero_fails_before_the_selection_pass(tmp_path, task, capsys):
    argv = ["train", "--data", str(task), "--out", str(tmp_path / "r"), *MODEL, *FAST[:-2], "--method", "gps",
            "--k", "0"]
    assert main(argv) == 1
    assert "--k" in one_line(capsys.readouterr().err)


class _BlowsUpAfter:
    """A loader that, after its last batch of epoch `epoch`, writes inf into a weight (a step gone wrong)."""

    def __init__(self, loader, model, epoch):
        self.loader, self.model, self.epoch, self.seen = loader, model, epoch, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from self.loader
        self.seen += 1
        if self.seen == self.epoch:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).fill_(float("inf"))


def test_a_non_finite_model_is_never_checkpointed_and_the_named_checkpoint_resumes(tmp_path):
    model = tiny_model("vit")
    sparseft.apply(model, random_selection(model, k=1))
    config = TrainConfig(epochs=3, lr=1e-3, warmup_epochs=0, progress=False)
    with pytest.raises(TrainingDiverged, match=r"non-finite values in .* after epoch 2; .*the last finite "
                                               r"checkpoint is .*checkpoint.json \(epoch 1\)"):
        fit(model, _BlowsUpAfter(toy_loader(n=16), model, 2), config, run_dir=tmp_path)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["epoch"] == 0  # epochs are counted from 0 in the record: epoch 1 finished
    fresh = tiny_model("vit")
    sparseft.apply(fresh, random_selection(fresh, k=1))
    summary = fit(fresh, toy_loader(n=16), config, run_dir=tmp_path, resume=True)
    assert len(summary["history"]) == 3


def test_a_merged_model_trained_further_cannot_be_saved_or_unmerged(tmp_path):
    model = tiny_model("vit")
    sparseft.apply(model, random_selection(model, k=1))
    train_steps(model, steps=1)
    sparseft.merge(model)
    assert all(p.requires_grad for p in model.parameters())  # merge gives back a plain model, as it was
    train_steps(model, steps=1)
    with pytest.raises(sparseft.DeltaError, match=r"cannot save the task: the model.s task is merged and \d+ "
                                                  r"weight\(s\) changed since the merge"):
        sparseft.save_delta(model, tmp_path / "t.safetensors")
    with pytest.raises(sparseft.DeltaError, match=r"cannot unmerge: .*(blocks|patch_embed|cls_token|pos_embed)"):
        sparseft.unmerge(model)
    assert not (tmp_path / "t.safetensors").exists()


def test_frozen_weights_written_behind_the_engines_back_are_named(tmp_path):
    model = tiny_model("vit")
    sparseft.apply(model, random_selection(model, k=1))
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    with pytest.raises(sparseft.DeltaError, match="pos_embed"):
        sparseft.save_delta(model, tmp_path / "t.safetensors")


def test_a_header_without_its_checksum_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(LEGACY / "gps.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["header"])
    header.pop("header_sha256")
    header["extra"]["method"] = "full"  # a forged method, checksum removed to hide it
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata={**meta, "header": json.dumps(header)})
    with pytest.raises(sparseft.DeltaFileError, match="forged.safetensors: header checksum missing"):
        sparseft.read_delta(tmp_path / "forged.safetensors")


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        model = tiny_model("vit")
        sparseft.apply(model, random_selection(model, k=1))
        path = sparseft.save_delta(model, tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_atomic_write_honours_the_umask_whoever_writes_the_file(tmp_path, umask):
    """safetensors' `save_file` makes its files 0600 and mkdtemp its folders 0700: an atomic write (a file, or a
    folder such as a peft export's) gives them what open() and mkdir() give under the umask."""
    from safetensors.torch import save_file

    from sparseft.data.tasks import building
    from sparseft.export.common import atomic_folder
    from sparseft.fileutil import atomic_path

    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        with atomic_folder(tmp_path / "export") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "notes.txt").write_text("x")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
        with building(tmp_path / "task") as tmp:  # a fetched data set's task folder
            (tmp / "info.json").write_text("{}")
    finally:
        os.umask(old)
    written = [tmp_path / "a.safetensors", tmp_path / "export", *(tmp_path / "export").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in written}
    assert modes == {"a.safetensors": 0o666 & ~umask, "export": 0o777 & ~umask,
                     "export/adapter_model.safetensors": 0o666 & ~umask, "export/sub": 0o777 & ~umask,
                     "export/sub/notes.txt": 0o666 & ~umask, "export/run.sh": 0o777 & ~umask}
    assert (tmp_path / "task").stat().st_mode & 0o777 == 0o777 & ~umask


def test_eval_refuses_data_with_another_class_count(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    other = make_vtab(tmp_path / "other", n_train=8, n_val=4, n_test=6, classes=4)
    capsys.readouterr()
    assert main(["eval", str(out / "delta.safetensors"), "--data", str(other)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "delta.safetensors: the task has 3 classes" in line and "has 4" in line


def test_a_corrupt_test_image_fails_before_training(tmp_path, task, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(task, broken)
    test_image = broken / (broken / "test.txt").read_text().split()[0]
    test_image.write_bytes(b"not a png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(broken), "--out", str(out), *MODEL, *FAST]) == 1
    assert test_image.name in one_line(capsys.readouterr().err)
    assert not (out / "selection.safetensors").exists() and not (out / "config.json").exists()


def test_weights_for_an_offline_backbone_name_load_onto_its_architecture(tmp_path):
    from sparseft.hub import cached_weights

    if cached_weights("mobilenetv2_100_offline") is None:
        pytest.skip("mobilenetv2_100_offline is not cached (make test fetches it)")
    from safetensors.torch import save_file

    model = sparseft.create_model("mobilenetv2_100_offline", num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "mine.safetensors"))
    again = sparseft.create_model("mobilenetv2_100_offline", num_classes=3, weights=tmp_path / "mine.safetensors")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path, task, capsys, monkeypatch):
    from safetensors import SafetensorError

    import sparseft.deltafile

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(sparseft.deltafile, "save_file", full_disk)
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 1
    assert "StorageFull" in one_line(capsys.readouterr().err)
    assert not (out / "delta.safetensors").exists() and not list(out.glob(".delta.safetensors.*"))


def test_overwrite_removes_nothing_when_the_new_run_is_refused(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    before = snapshot(out)
    capsys.readouterr()
    for bad in (["--model", "no_such_net"], ["--data", str(tmp_path / "missing")], ["--batch-size", "0"]):
        argv = ["train", "--data", str(task), "--out", str(out), "--overwrite", *MODEL, *FAST, *bad]
        assert main(argv) == 1
        one_line(capsys.readouterr().err)
        assert snapshot(out) == before


@pytest.mark.parametrize(("argv", "named"), [
    (["--method", "lora", "--lora-alpha", "nan"], "lora_alpha (--lora-alpha) must be a finite number"),
    (["--method", "lora", "--lora-dropout", "1.5"], "lora_dropout (--lora-dropout) must be in [0, 1)"),
    (["--method", "sct", "--channels", "0"], "channels (--channels) must be >= 1"),
    (["--method", "sct", "--channels", "100000"], "channels (--channels) must be at most the narrowest block"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be >= 1"),
    (["--workers", "-1"], "workers (--workers) must be >= 0"),
    (["--lr", "1e39"], "lr (--lr) must be > 0"),
    (["--data", "folder:"], "names no folder"),
])
def test_method_and_run_options_are_checked_before_any_file_is_written(tmp_path, task, capsys, argv, named):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST, *argv]) == 1
    assert named in one_line(capsys.readouterr().err)
    assert not out.exists() or not any(out.iterdir())


def test_merge_and_select_never_replace_an_existing_file_unasked(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    victim = tmp_path / "base.safetensors"
    victim.write_bytes(b"the base weights")
    capsys.readouterr()
    assert main(["merge", str(out / "delta.safetensors"), "--out", str(victim)]) == 1
    assert "exists; pass --overwrite" in one_line(capsys.readouterr().err)
    assert main(["select", "--data", str(task), "--out", str(victim), *MODEL, "--batch-size", "4"]) == 1
    assert "exists; pass --overwrite" in one_line(capsys.readouterr().err)
    assert victim.read_bytes() == b"the base weights"
    assert main(["merge", str(out / "delta.safetensors"), "--out", str(tmp_path / "new") + "/"]) == 1
    assert "is a folder" in one_line(capsys.readouterr().err) and not (tmp_path / "new").exists()
    assert main(["merge", str(out / "delta.safetensors"), "--out", str(victim), "--overwrite"]) == 0


def test_writes_into_unselected_entries_of_a_selected_weight_are_named(tmp_path):
    model = tiny_model("vit")
    selection = random_selection(model, k=1)
    sparseft.apply(model, selection)
    name = next(iter(selection.indices))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)  # every entry, the unselected ones too
    with pytest.raises(sparseft.DeltaError, match=name.replace(".", r"\.")):
        sparseft.save_delta(model, tmp_path / "t.safetensors")
    with pytest.raises(sparseft.DeltaError, match="cannot unmerge"):
        sparseft.unmerge(model)


def test_eval_refuses_data_with_other_class_names(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    other = tmp_path / "other"
    shutil.copytree(task, other)
    (other / "classes.txt").write_text("cat\ndog\nbird\n")
    capsys.readouterr()
    assert main(["eval", str(out / "delta.safetensors"), "--data", str(other)]) == 1
    assert "trained on classes" in one_line(capsys.readouterr().err)


def test_a_finished_run_whose_task_file_is_gone_is_rebuilt_from_its_checkpoint(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    expected = (out / "delta.safetensors").read_bytes()
    (out / "delta.safetensors").unlink()
    assert main(["train", "--data", str(task), "--out", str(out), "--resume", *MODEL, *FAST]) == 0
    rebuilt = sparseft.read_delta(out / "delta.safetensors")[1]
    (tmp_path / "expected.safetensors").write_bytes(expected)
    for key, value in sparseft.read_delta(tmp_path / "expected.safetensors")[1].items():
        assert torch.equal(value, rebuilt[key]), key


def test_resume_with_a_damaged_run_record_is_one_line(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(task), "--out", str(out), *MODEL, *FAST]) == 0
    (out / "config.json").write_text("[1, 2]")
    capsys.readouterr()
    assert main(["train", "--data", str(task), "--out", str(out), "--resume", *MODEL, *FAST]) == 1
    assert "config.json: not a sparseft run record" in one_line(capsys.readouterr().err)


def test_a_saved_selection_fixes_its_settings(tmp_path, task, capsys):
    from helpers import toy_batches

    from sparseft.methods import MethodContext, get_method

    model = tiny_model("vit")
    path = sparseft.select(model, toy_batches(1), k=2, progress=False).save(tmp_path / "sel.safetensors")
    method = get_method("gps", selection=str(path))  # k defaults to 1: the file's k=2 is what trains
    method.prepare(model, MethodContext(loader=lambda kind: [], progress=False))
    assert method.options.k == 2
    argv = ["train", "--data", str(task), "--out", str(tmp_path / "r"), *MODEL, *FAST[:-2], "--method", "gps",
            "--selection", str(path), "--k", "3"]
    assert main(argv) == 1
    assert "--k: fixed by the saved --selection" in one_line(capsys.readouterr().err)


def test_a_task_header_that_is_not_an_object_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "list.safetensors"),
              metadata={"format": "sparseft.delta/1", "header": "[1, 2]"})
    with pytest.raises(sparseft.DeltaFileError, match="list.safetensors: delta header is not a JSON object"):
        sparseft.read_delta(tmp_path / "list.safetensors")


def test_an_internal_value_error_inside_training_keeps_its_traceback(tmp_path, task, capsys, monkeypatch):
    """A bug is not a user error: a bare ValueError raised inside training leaves `main` with its traceback."""
    import sparseft.train

    def broken_loss(*args, **kwargs):
        raise ValueError("an internal bug in the loss")

    monkeypatch.setattr(sparseft.train, "_loss_sum", broken_loss)
    with pytest.raises(ValueError, match="an internal bug in the loss") as caught:
        main(["train", "--data", str(task), "--out", str(tmp_path / "run"), *MODEL, *FAST])
    assert any(entry.name == "broken_loss" for entry in caught.traceback)  # raised where it happened
    assert "error:" not in capsys.readouterr().err


def test_user_errors_are_sparseft_errors_and_keep_their_old_bases():
    from sparseft.checkpoint import CheckpointError
    from sparseft.cli import is_user_error
    from sparseft.data import DataError
    from sparseft.errors import InputError, SparseftError, UsageError
    from sparseft.methods import NotApplicable
    from sparseft.weights import WeightsError

    value_errors = (sparseft.DeltaFileError, sparseft.SelectionError, DataError, WeightsError, CheckpointError,
                    NotApplicable, InputError)
    for cls in value_errors:
        assert issubclass(cls, SparseftError) and issubclass(cls, ValueError), cls
    for cls in (sparseft.DeltaError, TrainingDiverged):
        assert issubclass(cls, SparseftError) and issubclass(cls, RuntimeError), cls
    assert issubclass(UsageError, SparseftError)
    assert is_user_error(DataError("x")) and is_user_error(FileNotFoundError("x"))
    assert not is_user_error(ValueError("x")) and not is_user_error(RuntimeError("x"))


def test_after_merge_changed_weights_the_task_trains_are_described_as_such(tmp_path):
    """The head and a bias are trained by the task: after merge, a change to them makes another model, and the
    refusal says so (not "outside what the task trains")."""
    model = tiny_model("vit")
    sparseft.apply(model, random_selection(model, k=1))
    sparseft.merge(model)
    with torch.no_grad():
        model.head.weight.add_(0.1)
        model.blocks[0].attn.qkv.bias.add_(0.1)
    with pytest.raises(sparseft.DeltaError) as err:
        sparseft.save_delta(model, tmp_path / "t.safetensors")
    message = str(err.value)
    assert message.startswith("cannot save the task: the model's task is merged and 2 weight(s) changed since the "
                              "merge (blocks.0.attn.qkv.bias, head.weight); the task trains all of them")
    assert "outside what the task trains" not in message and "load its task file again" in message
    with pytest.raises(sparseft.DeltaError, match=r"cannot save the merged model: the model's task is merged .*"
                                                  r"save_merged writes the task as it was merged"):
        sparseft.save_merged(model, tmp_path / "m.safetensors")
    with pytest.raises(sparseft.DeltaError, match=r"cannot unmerge: .* its base cannot be written back"):
        sparseft.unmerge(model)
    assert list(tmp_path.iterdir()) == []


def test_an_applied_model_names_weights_the_task_does_not_train(tmp_path):
    model = tiny_model("vit")
    sparseft.apply(model, random_selection(model, k=1))
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    with pytest.raises(sparseft.DeltaError, match=r"cannot save the task: 1 weight\(s\) changed since apply where the "
                                                  r"task does not train them \(pos_embed: frozen weights"):
        sparseft.save_delta(model, tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []
