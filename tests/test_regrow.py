"""Drop and regrow (SpIEL): the probe's gradients, constant budget, exact resume, task files, merge."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FailingLoader, Interrupt, random_selection, tiny_model, toy_batches, toy_loader

import sparseft
from sparseft.delta import deltas
from sparseft.methods import MethodContext, get_method
from sparseft.regrow import Regrower, RegrowSchedule
from sparseft.train import TrainConfig, fit


def applied(family="vit", seed=0):
    model = tiny_model(family, seed=seed)
    return sparseft.apply(model, random_selection(model, k=2))


@pytest.mark.parametrize("family", ["vit", "mobilenetv2"])
def test_the_probe_sees_the_dense_gradient_and_values_get_their_entries(family):
    model = applied(family).double().eval()
    x, y = toy_batches(1, batch=4, dtype=torch.float64)[0]
    sparseft.delta.sync(model)
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        sparseft.sparse_layers.uninstall(mod)
    for p in ref.parameters():
        p.requires_grad_(True)
    F.cross_entropy(ref(x), y).backward()
    reference = dict(ref.named_parameters())
    seen = {}
    for name, d in deltas(model).items():
        d.probe = lambda g, name=name: seen.__setitem__(name, g.clone())
    F.cross_entropy(model(x), y).backward()
    for name, d in deltas(model).items():
        torch.testing.assert_close(seen[name], reference[name].grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d.values.grad, reference[name].grad.reshape(-1)[d.index], rtol=1e-9, atol=1e-12)


def test_regrow_keeps_every_count_restores_dropped_entries_and_zeroes_new_state():
    model = applied()
    base = {n: p.detach().clone() for n, p in tiny_model("vit").named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grower = Regrower(model, RegrowSchedule(every=2, fraction=0.5, stop=1.0, accumulate=2))
    before = {n: (d.index.clone(), d.values.detach().clone()) for n, d in deltas(model).items()}
    total = 10
    for step, (x, y) in enumerate(toy_batches(2, batch=8)):
        grower.before_step(step, total)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 0:
            before = {n: (d.index.clone(), d.values.detach().clone()) for n, d in deltas(model).items()}
            moments = {n: opt.state[d.values]["exp_avg"].clone() for n, d in deltas(model).items()}
        grower.after_step(step + 1, total, opt if step == 1 else None)
    assert grower.replaced > 0
    params = dict(model.named_parameters())
    sparseft.delta.sync(model)
    for name, d in deltas(model).items():
        old_index, _ = before[name]
        assert d.index.numel() == old_index.numel() and bool((d.index[1:] > d.index[:-1]).all())
        dropped = old_index[~torch.isin(old_index, d.index)]
        grown = ~torch.isin(d.index, old_index)
        assert dropped.numel() == int(grown.sum()) > 0
        flat = params[name].detach().reshape(-1)
        assert torch.equal(flat[dropped], base[name].reshape(-1)[dropped])  # back to base
        assert torch.equal(d.values.detach()[grown], torch.zeros(int(grown.sum())))
        assert torch.equal(opt.state[d.values]["exp_avg"][grown], torch.zeros(int(grown.sum())))
        kept = ~grown
        assert bool((opt.state[d.values]["exp_avg"][kept] != 0).any()) or moments[name].abs().sum() == 0
        assert sparseft.delta.selection_of(model).indices[name].tolist() == d.index.tolist()


def test_the_schedule_updates_every_n_steps_until_stop_with_a_cosine_fraction():
    grower = Regrower(applied(), RegrowSchedule(every=10, fraction=0.2, stop=0.5, accumulate=3))
    rhos = [grower.fraction_at(s, 100) for s in range(0, 101)]
    assert [s for s, r in enumerate(rhos) if r > 0] == [10, 20, 30, 40]
    assert rhos[10] > rhos[20] > rhos[30] > rhos[40] > 0 and rhos[10] <= 0.2
    grower.before_step(7, 100)  # steps 8, 9 and 10 score the candidates of the update after step 10
    assert all(d.probe is not None for d in deltas(grower.model).values())
    grower.before_step(6, 100)
    assert all(d.probe is None for d in deltas(grower.model).values())
    grower.before_step(45, 100)  # update 50 is past `stop`: no probe
    assert all(d.probe is None for d in deltas(grower.model).values())


def spiel_model(seed=0):
    torch.manual_seed(seed)
    model = tiny_model("vit", num_classes=4)
    x, y = toy_batches(1, batch=8)[0]
    method = get_method("spiel", k=1, regrow_every=2, regrow_fraction=0.3, regrow_stop=0.9)
    model = method.prepare(model, MethodContext(loader={"select": [([x, x.flip(-1)], y)]}.__getitem__,
                                                progress=False))
    return method, model


CFG = dict(epochs=3, lr=3e-3, warmup_epochs=1, progress=False, optimizer="adam", weight_decay=0.0)


def test_a_resumed_spiel_run_equals_the_uninterrupted_one_and_its_task_file_holds_the_final_entries(tmp_path):
    m, whole = spiel_model()
    start = {n: d.index.clone() for n, d in deltas(whole).items()}
    fit(whole, FailingLoader(toy_loader(), after=10**9), TrainConfig(**CFG), run_dir=tmp_path / "a",
        hook=m.training_hook(whole))
    moved = sum(int((~torch.isin(d.index, start[n])).sum()) for n, d in deltas(whole).items())
    assert moved > 0, "no entry was regrown"
    assert sparseft.parameter_summary(whole)["trainable_backbone"] == sparseft.parameter_summary(spiel_model()[1])[
        "trainable_backbone"]
    m2, crashed = spiel_model()
    with pytest.raises(Interrupt):
        fit(crashed, FailingLoader(toy_loader(), after=8), TrainConfig(**CFG), run_dir=tmp_path / "b",
            hook=m2.training_hook(crashed))
    m3, resumed = spiel_model()  # a new process rebuilds the model with the first selection
    fit(resumed, FailingLoader(toy_loader(), after=10**9), TrainConfig(**CFG), run_dir=tmp_path / "b", resume=True,
        hook=m3.training_hook(resumed))
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    for n, d in deltas(whole).items():
        assert torch.equal(d.index, deltas(resumed)[n].index), n
    # the task file: the final entries, the same logits, merge and unmerge exact
    path = m.save(whole, tmp_path / "spiel.safetensors")
    base = tiny_model("vit", num_classes=4)
    loaded = get_method("spiel").load(copy.deepcopy(base), path).eval()
    x = toy_batches(1, batch=4, seed=3)[0][0]
    whole.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), whole(x), atol=1e-6, rtol=0)
        sparseft.merge(loaded)
        torch.testing.assert_close(loaded(x), whole(x), atol=1e-5, rtol=1e-5)
    sparseft.unmerge(loaded)
    for (n, p), (_, pb) in zip(loaded.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(p, pb), n


def test_spiel_options_are_checked_with_their_flags():
    with pytest.raises(ValueError, match="--regrow-fraction"):
        get_method("spiel", regrow_fraction=0.0)
    with pytest.raises(ValueError, match="--regrow-accumulate"):
        get_method("spiel", regrow_every=2, regrow_accumulate=3)
