"""Per-step figures read from the device in batches: the same sums and curves as reading every step, divergence
named at its first step."""

import math

import pytest
import torch
from helpers import FailingLoader, random_selection, tiny_model, toy_loader

import sparseft
from sparseft.steplog import StepLog
from sparseft.train import TrainConfig, TrainingDiverged, fit


def _feed(log: StepLog, losses: list[float]):
    for step, loss in enumerate(losses, 1):
        bad = log.add(step, torch.tensor(loss), terms=4, correct=torch.tensor(step % 3), lr=0.1 * step)
        if bad is not None:
            return bad
    return log.read()


@pytest.mark.parametrize("every", [2, 3, 7, 50])
def test_reading_in_batches_gives_what_reading_every_step_gives(every):
    losses = [2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25]
    seen = {1: [], every: []}
    logs = {n: StepLog(every=n, on_step=lambda *a, n=n: seen[n].append(a)) for n in seen}
    for log in logs.values():
        assert _feed(log, losses) is None
    assert seen[every] == seen[1] == [(s, loss, 0.1 * s) for s, loss in enumerate(losses, 1)]
    assert logs[every].loss_sum == logs[1].loss_sum == sum(4 * loss for loss in losses)
    assert logs[every].correct == logs[1].correct == sum(s % 3 for s in range(1, 8))


def test_the_first_non_finite_step_is_named_and_later_steps_are_not_counted():
    seen = []
    log = StepLog(every=4, on_step=lambda *a: seen.append(a[0]))
    step, loss = _feed(log, [1.0, 1.0, 1.0, 1.0, 1.0, float("nan"), float("inf"), 1.0])
    assert step == 6 and math.isnan(loss)
    assert seen == [1, 2, 3, 4, 5]
    assert log.loss_sum == 20.0


def test_no_device_read_until_the_batch_is_full(monkeypatch):
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a figure read with .item()"))
    log = StepLog(every=5, on_step=lambda *a: None)
    for step in range(1, 5):
        assert log.add(step, torch.tensor(1.0), 1, torch.tensor(1), 0.1) is None
    assert reads == []  # four steps in: nothing read yet
    log.add(5, torch.tensor(1.0), 1, torch.tensor(1), 0.1)
    assert len(reads) == 1  # one read of the losses and the counts together, for all five steps


def test_training_reads_in_batches_with_the_same_results_and_names_the_diverging_step(tmp_path, monkeypatch):
    def gps_vit():
        model = tiny_model("vit", seed=0)
        return sparseft.apply(model, random_selection(model, k=2))

    config = TrainConfig(epochs=2, lr=3e-3, warmup_epochs=1, progress=False)
    every_step = fit(gps_vit(), toy_loader(), config, run_dir=tmp_path / "one")
    monkeypatch.setattr(StepLog, "for_device", classmethod(lambda cls, device, on_step: cls(3, on_step)))
    batched = fit(gps_vit(), toy_loader(), config, run_dir=tmp_path / "three")
    for a, b in zip(every_step["history"], batched["history"]):
        assert (a["train_loss"], a["train_acc"]) == (b["train_loss"], b["train_acc"])

    class PoisonAfter(FailingLoader):
        def __iter__(self):
            for x, y in self.loader:
                self.count += 1
                yield (x * float("nan"), y) if self.count > self.after else (x, y)

    batches = len(toy_loader())
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at epoch 2, step {batches + 2}; lower the learning"):
        fit(gps_vit(), PoisonAfter(toy_loader(), after=batches + 1), config, run_dir=tmp_path / "bad")
