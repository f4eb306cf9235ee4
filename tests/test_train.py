"""Training loop: learns, writes its run folder, resumes exactly, stops on divergence."""

import copy
import json

import pytest
import torch
from helpers import FailingLoader, Interrupt, random_selection, tiny_model, toy_loader
from torch.utils.data import DataLoader, TensorDataset

import sparseft
from sparseft.checkpoint import CheckpointError, load_checkpoint
from sparseft.train import TrainConfig, TrainingDiverged, evaluate, fit


def gps_vit(seed=0):
    model = tiny_model("vit", seed=seed)
    return sparseft.apply(model, random_selection(model, k=2))


CFG = dict(epochs=3, lr=3e-3, warmup_epochs=1, progress=False)


def test_fit_learns_and_writes_the_run_folder(tmp_path):
    model = gps_vit()
    before = evaluate(model, toy_loader(shuffle=False))
    summary = fit(model, toy_loader(), TrainConfig(**{**CFG, "epochs": 4}),
                  eval_loaders={"val": toy_loader(shuffle=False)}, run_dir=tmp_path / "run", run_info={"method": "gps"})
    assert summary["final"]["val_acc"] > before["acc"]
    assert summary["final"]["train_loss"] < summary["history"][0]["train_loss"]
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["method"] == "gps"
    assert (run / "delta.safetensors").exists() and (run / "summary.json").exists()
    fresh = tiny_model("vit")
    sparseft.load_delta(fresh, run / "delta.safetensors")
    assert evaluate(fresh, toy_loader(shuffle=False))["acc"] == summary["final"]["val_acc"]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    # the same loader type throughout: how a loader is wrapped changes when it draws its shuffle seed
    whole = gps_vit()
    fit(whole, FailingLoader(toy_loader(), after=10**9), TrainConfig(**CFG), run_dir=tmp_path / "a")
    crashed = gps_vit()
    with pytest.raises(Interrupt):
        fit(crashed, FailingLoader(toy_loader(), after=8), TrainConfig(**CFG), run_dir=tmp_path / "b")
    resumed = gps_vit()  # a new process would rebuild the model and re-apply the selection
    summary = fit(resumed, FailingLoader(toy_loader(), after=10**9), TrainConfig(**CFG), run_dir=tmp_path / "b",
                  resume=True)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    again = fit(gps_vit(), toy_loader(), TrainConfig(**CFG), run_dir=tmp_path / "b", resume=True)
    assert again["final"] == summary["final"]  # a finished run is not trained again


def test_an_existing_run_is_not_overwritten(tmp_path):
    fit(gps_vit(), toy_loader(n=16), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "r")
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(gps_vit(), toy_loader(n=16), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "r")


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    model = gps_vit()
    fit(copy.deepcopy(model), toy_loader(), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "ok")

    class PoisonAfter(FailingLoader):
        def __iter__(self):
            for x, y in self.loader:
                self.count += 1
                yield (x * float("nan"), y) if self.count > self.after else (x, y)

    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2") as info:
        fit(model, PoisonAfter(toy_loader(), after=7), TrainConfig(**CFG), run_dir=tmp_path / "bad")
    assert "checkpoint" in str(info.value)
    record = load_checkpoint(tmp_path / "bad" / "checkpoint", gps_vit(),
                             torch.optim.AdamW([p for p in gps_vit().parameters() if p.requires_grad]))
    assert record["epoch"] == 0


def test_damaged_checkpoints_are_refused(tmp_path):
    fit(gps_vit(), toy_loader(n=16), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "r")
    stem = tmp_path / "r" / "checkpoint"
    model = gps_vit()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    (tensor_file,) = (tmp_path / "r").glob("checkpoint-e*.safetensors")
    data = bytearray(tensor_file.read_bytes())
    data[-3] ^= 1
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_checkpoint(stem, model, opt)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "nothing", model, opt)


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    model = gps_vit()
    fit(model, toy_loader(n=16), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "r")
    stem = tmp_path / "r" / "checkpoint"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sparseft.checkpoint.write_text_atomic", crash)
    from sparseft.checkpoint import save_checkpoint

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(stem, model, opt, {"epoch": 1, "step": 4, "history": []})
    monkeypatch.undo()
    assert load_checkpoint(stem, gps_vit(), opt)["epoch"] == 0  # the tensors of epoch 0 are still there


def test_a_checkpoint_of_another_model_changes_nothing(tmp_path):
    fit(gps_vit(), toy_loader(n=16), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "r")
    other = tiny_model("vit", num_classes=5)
    sparseft.apply(other, random_selection(other, k=2))
    before = {n: p.clone() for n, p in other.named_parameters()}
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(CheckpointError, match="shapes do not fit"):
        load_checkpoint(tmp_path / "r" / "checkpoint", other, opt)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_bf16_label_smoothing_adam_and_clipping_run():
    model = gps_vit()
    summary = fit(model, toy_loader(n=16), TrainConfig(epochs=1, lr=1e-3, bf16=True, label_smoothing=0.1,
                                                        optimizer="adam",
                                                        grad_clip=1.0, progress=False),
                  eval_loaders={"val": toy_loader(n=16, shuffle=False)})
    assert 0.0 <= summary["final"]["val_acc"] <= 1.0
    with pytest.raises(ValueError, match=r"optimizer \(--optimizer\) must be"):
        fit(model, toy_loader(n=16), TrainConfig(epochs=1, optimizer="sgd", progress=False))


def test_evaluate_counts_correctly():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3))
    assert result["acc"] == 0.75 and result["n"] == 4


def test_every_train_setting_is_documented_for_its_flag():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help (it is a `sparseft train` flag)"


def test_run_files_take_values_json_does_not_know(tmp_path):
    from pathlib import Path

    fit(gps_vit(), toy_loader(n=16), TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path / "r",
        run_info={"data": Path("some/task"), "nan": float("nan")}, save_task=lambda model, run_dir: None)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"] == "some/task" and config["nan"] != config["nan"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["history"]
