"""One forward for a batch of mixed tasks (sparseft.mixed, TaskBank.predict): the base once, each task's
items corrected layer by layer; outputs equal each task's own forward."""

import pytest
import torch
from helpers import toy_base, toy_batches, write_task
from torch import nn

import sparseft
from sparseft import mixed, taskbank
from sparseft.errors import InputError
from sparseft.kernels import correct
from sparseft.methods import METHODS
from sparseft.mixed import NotServed, TaskTensors, mixed_forward

MERGEABLE = sorted(m for m, cls in METHODS.items() if cls.mergeable)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    bank = sparseft.TaskBank(toy_base())
    for m in MERGEABLE:
        bank.add(m, write_task(m, root / f"{m}.safetensors"))
    bank.add("gps-5", write_task("gps", root / "gps-5.safetensors", classes=5, seed=3))
    return bank


def test_one_forward_equals_each_tasks_own_forward_for_every_mergeable_method(bank):
    names = [*(m for m in MERGEABLE if m != "full"), "gps-5", None]
    tasks = [names[i % len(names)] for i in range(2 * len(names) + 3)]
    x = toy_batches(1, batch=len(tasks), classes=3)[0][0]
    one = bank.predict(x, tasks, mode="one-forward")
    assert bank.one_forward_refused == {}
    for a, b in zip(one, bank.predict(x, tasks, mode="grouped")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    names.append("full")
    tasks = [names[i % len(names)] for i in range(2 * len(names) + 3)]
    x = toy_batches(1, batch=len(tasks), classes=3)[0][0]
    one = bank.predict(x, tasks, mode="one-forward")
    grouped = bank.predict(x, tasks, mode="grouped")
    # full fine-tuning changes the ViT's own tokens (cls_token, pos_embed: no leaf module's): run grouped, said why
    assert set(bank.one_forward_refused) == {"full"}
    assert "not a tensor of a leaf module" in bank.one_forward_refused["full"]
    assert [len(r) for r in one] == [5 if t == "gps-5" else 3 for t in tasks]
    for a, b in zip(one, grouped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert bank.active is None


def test_gps_layers_are_corrected_by_their_entries_not_run_again(bank, monkeypatch):
    """A GPS task's Linear layers add their sparse products to the base output, its layer norms take their
    weights per item; only the other modules it changes (the patch embedding, the head) run again."""
    rerun = []
    real = mixed._run_again
    monkeypatch.setattr(mixed, "_run_again", lambda m, *a: rerun.append(m) or real(m, *a))
    x = toy_batches(1, batch=4, classes=3)[0][0]
    bank.predict(x, ["gps", None, "gps", "bitfit"], mode="one-forward")
    head = bank.model.get_classifier()
    assert rerun and all(m is head or not isinstance(m, (nn.Linear, nn.LayerNorm)) for m in rerun)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _cnn_task(seed: int) -> dict[str, TaskTensors]:
    g = torch.Generator().manual_seed(seed)
    base = dict(_cnn().state_dict())
    sparse = {"0.weight": torch.randperm(8 * 3 * 9, generator=g)[:20], "3.weight": torch.randperm(64, generator=g)[:9],
              "6.weight": torch.randperm(32, generator=g)[:5]}
    out = {n: TaskTensors(i.to(torch.int32), base[n].reshape(-1)[i] + torch.randn(len(i), generator=g))
           for n, i in sparse.items()}
    for n in ("0.bias", "1.weight", "1.bias", "1.running_mean", "6.bias"):
        out[n] = TaskTensors(None, base[n] + 0.1 * torch.randn(base[n].shape, generator=g))
    out["1.running_var"] = TaskTensors(None, base["1.running_var"] * 2)
    return out


def _own_forward(change: dict[str, TaskTensors], x: torch.Tensor) -> torch.Tensor:
    model = _cnn()
    state = model.state_dict()
    for n, c in change.items():
        if c.index is None:
            state[n] = c.value
        else:
            state[n].view(-1)[c.index.long()] = c.value
    model.load_state_dict(state)
    return model(x)


@pytest.mark.parametrize("kernel", ["auto", "torch-blocked"])
def test_a_cnn_with_sparse_convolutions_and_batchnorm_statistics(kernel, monkeypatch):
    if kernel == "torch-blocked":  # the torch path, its gathered columns in blocks of one item
        monkeypatch.setenv("SPARSEFT_KERNEL", "torch")
        monkeypatch.setattr(correct, "_CORRECT_BLOCK", 7)
    rerun = []
    real = mixed._run_again
    monkeypatch.setattr(mixed, "_run_again", lambda m, *a: rerun.append(m) or real(m, *a))
    changes = {"a": _cnn_task(1), "b": _cnn_task(2)}
    x = torch.randn(5, 3, 12, 12)
    tasks = ["a", None, "b", "a", "b"]
    with torch.no_grad():
        rows = mixed_forward(_cnn(), x, tasks, changes)
        for i, t in enumerate(tasks):
            want = _cnn()(x[i:i + 1]) if t is None else _own_forward(changes[t], x[i:i + 1])
            torch.testing.assert_close(rows[i], want[0], rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.Conv2d) for m in rerun)  # corrected in place, by either path


class _Folding(nn.Module):
    """Tokens of all images folded into dim 0 before a Linear (as windowed attention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1)


def test_a_model_one_forward_cannot_serve_is_named():
    change = {"t": {"fc.weight": TaskTensors(torch.tensor([1], dtype=torch.int32), torch.tensor([0.5]))}}
    with torch.no_grad(), pytest.raises(NotServed, match="does not see the batch as dim 0"):
        mixed_forward(_Folding(), torch.randn(3, 2, 4), ["t", None, "t"], change)
    nested = {"t": {"0.weight": TaskTensors(None, torch.ones(2, 4))}}
    with pytest.raises(NotServed, match="not a tensor of a leaf module"):
        mixed_forward(nn.Sequential(nn.Sequential(nn.Linear(4, 2))), torch.randn(2, 4), ["t", None],
                      {"t": {"0.0.weight": nested["t"]["0.weight"], "0": nested["t"]["0.weight"]}})


def test_a_task_one_forward_cannot_serve_runs_grouped_and_the_bank_says_why(bank, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotServed("a test refusal")

    monkeypatch.setattr(taskbank, "mixed_forward", refuse)
    monkeypatch.setattr(bank, "_one_forward_checked", {})
    monkeypatch.setattr(bank, "one_forward_refused", {})
    x = toy_batches(1, batch=3, classes=3)[0][0]
    out = bank.predict(x, ["gps", "lora", None], mode="one-forward")
    assert bank.one_forward_refused == {"gps": "a test refusal"}
    for a, b in zip(out, bank.predict(x, ["gps", "lora", None], mode="grouped")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grouped_is_the_default_and_one_forward_is_asked_for(bank, monkeypatch):
    calls = []
    monkeypatch.setattr(taskbank, "mixed_forward", lambda *a: calls.append(a[3]) or mixed_forward(*a))
    x = toy_batches(1, batch=6, classes=3)[0][0]
    tasks = ["gps", "lora", "bitfit", "ssf", None, "gps"]
    bank.predict(x, tasks)  # one image per task or so: still grouped (one forward costs more on CPUs)
    assert calls == []
    bank.predict(x, tasks, mode="one-forward")
    assert calls
    with pytest.raises(InputError, match="mode must be"):
        bank.predict(x, tasks, mode="auto")


def test_one_forward_follows_a_model_cast_after_the_tasks_were_read(tmp_path):
    bank = sparseft.TaskBank(toy_base())
    bank.add("gps", write_task("gps", tmp_path / "gps.safetensors"))
    bank.model.double()
    x = toy_batches(1, batch=3, classes=3)[0][0].double()
    one = bank.predict(x, ["gps", None, "gps"], mode="one-forward")
    assert bank.one_forward_refused == {} and one[0].dtype == torch.float64
    for a, b in zip(one, bank.predict(x, ["gps", None, "gps"])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_layer_scales_take_each_items_gamma_without_running_again(monkeypatch):
    """DINOv2's layer scales (trained whole by GPS): one multiply for the batch, each item with its task's gamma."""
    from timm.layers import LayerScale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), LayerScale(6, init_values=0.5), nn.Linear(6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    changes = {t: {"1.gamma": TaskTensors(None, torch.randn(6, generator=g)),
                   "0.weight": TaskTensors(torch.tensor([3, 20], dtype=torch.int32), torch.randn(2, generator=g))}
               for t in ("a", "b")}
    rerun = []
    real = mixed._run_again
    monkeypatch.setattr(mixed, "_run_again", lambda m, *a: rerun.append(m) or real(m, *a))
    x, tasks = torch.randn(4, 5, 6), ["a", None, "b", "a"]
    with torch.no_grad():
        rows = mixed_forward(model, x, tasks, changes)
        for i, t in enumerate(tasks):
            own = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, c in (changes[t].items() if t else ()):
                if c.index is None:
                    own[n] = c.value
                else:
                    own[n].view(-1)[c.index.long()] = c.value
            want = torch.func.functional_call(model, own, (x[i:i + 1],))[0]
            torch.testing.assert_close(rows[i], want, rtol=1e-5, atol=1e-6)
    assert not rerun
