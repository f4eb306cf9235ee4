"""The frontier variants: structured (row / column) selection, first-order (taylor) scores, a
budget of trainable values instead of K, biases frozen, and RoSA (LoRA + sparse in one budget)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, toy_batches, train_steps

import sparseft
from sparseft.delta import added_parameters, deltas
from sparseft.methods import MethodContext, get_method
from sparseft.models import head_parameter_names
from sparseft.selection import Eligibility, SelectionError, parameter_roles
from sparseft.selection.gps import fill_to, per_neuron_count, top_columns, top_rows
from sparseft.sparse_layers import uninstall


def _views(classes: int = 3, batch: int = 6):
    x, y = toy_batches(1, batch=batch, classes=classes)[0]
    return [([x, x.flip(-1)], y)]


def _backbone_trainable(model, selection) -> int:
    heads = set(head_parameter_names(model))
    params = dict(model.named_parameters())
    return selection.num_sparse + sum(params[n].numel() for n in selection.full if n not in heads)


def test_top_columns_takes_whole_columns_with_the_largest_summed_score():
    scores = torch.tensor([[1.0, 0.0, 5.0, 0.0], [1.0, 3.0, 0.0, 0.0], [1.0, 3.0, 0.0, 9.0]])
    chosen = top_columns({"w": scores}, 2)["w"]
    cols = sorted(set((chosen % 4).tolist()))
    assert cols == [1, 3] and chosen.numel() == 3 * 2  # column sums 3, 6, 5, 9: the same count as top-2 per row
    assert sorted(chosen.tolist()) == [1, 3, 5, 7, 9, 11]


def test_top_rows_ranks_rows_by_mean_score_and_fills_the_same_total():
    wide = torch.tensor([[0.0] * 8, [2.0] * 8])   # rows of 8: means 0 and 2
    narrow = torch.tensor([[1.0] * 2, [3.0] * 2, [0.5] * 2])  # rows of 2: means 1, 3, 0.5
    chosen = top_rows({"wide": wide, "narrow": narrow}, 2)  # total 2*2 + 3*2 = 10 entries
    assert chosen["narrow"].tolist() == [2, 3] and chosen["wide"].tolist() == list(range(8, 16))  # means 3, 2
    assert top_rows({"wide": wide, "narrow": narrow}, 1)["wide"].numel() == 0  # 5 entries: a row of 8 never fits
    assert top_rows({"wide": wide, "narrow": narrow}, 1)["narrow"].tolist() == [0, 1, 2, 3]  # means 3, then 1


@pytest.mark.parametrize("level", ["row", "column"])
def test_structured_selection_on_a_vit_selects_whole_rows_or_columns(level):
    model = tiny_model("vit")
    sel = sparseft.select(model, _views(), k=1, level=level, score="sum_of_squares", progress=False)
    neuron = sparseft.select(model, _views(), k=1, progress=False)
    assert 0 < sel.num_sparse <= neuron.num_sparse
    for name, idx in sel.indices.items():
        if not idx.numel():
            continue
        shape = sel.shapes[name]
        width = idx.new_tensor(torch.Size(shape[1:]).numel())
        rows, cols = idx // width, idx % width
        if level == "column":
            assert len(set(cols.tolist())) == 1 and len(set(rows.tolist())) == shape[0]
        else:
            assert all((rows == r).sum() == width for r in set(rows.tolist()))
    if level == "column":
        assert sel.num_sparse == neuron.num_sparse


def test_taylor_scores_are_gradient_scores_times_weight_magnitude(monkeypatch):
    model = tiny_model("vit")
    params = dict(model.named_parameters())
    grad = sparseft.select(model, _views(), k=1, progress=False)
    from sparseft.selection import gps

    seen = {}
    real = gps.LEVELS["neuron"]

    def spy(scores, k):
        seen.update(scores)
        return real(scores, k)

    monkeypatch.setitem(gps.LEVELS, "neuron", spy)
    taylor = sparseft.select(model, _views(), k=1, criterion="taylor", progress=False)
    name = "blocks.0.attn.qkv.weight"
    scores, _ = sparseft.selection.gradient_scores(model, _views(), [name], progress=False)
    torch.testing.assert_close(seen[name], scores[name] * params[name].detach().abs())
    assert taylor.meta["criterion"] == "taylor" and taylor.num_sparse == grad.num_sparse


def test_per_neuron_count_and_fill_reach_the_budget_exactly():
    shapes = {"a": (4, 3), "b": (2, 5)}
    assert per_neuron_count(shapes, 5) == 0 and per_neuron_count(shapes, 6) == 1 and per_neuron_count(shapes, 17) == 2
    assert per_neuron_count(shapes, 10_000) == 5  # K never exceeds the widest row
    scores = {"a": torch.arange(12.0).reshape(4, 3), "b": -torch.arange(10.0).reshape(2, 5)}
    base = {"a": torch.tensor([2, 5, 8, 11]), "b": torch.tensor([0, 5])}
    filled = fill_to(scores, base, 9)
    assert sum(c.numel() for c in filled.values()) == 9
    assert filled["a"].tolist() == [2, 5, 7, 8, 9, 10, 11] and filled["b"].tolist() == [0, 5]  # best of the rest


def test_a_budget_replaces_k_and_biases_can_be_frozen_to_spend_it_on_entries():
    model = tiny_model("vit")
    k1 = sparseft.select(model, _views(), k=1, progress=False)
    budget = _backbone_trainable(model, k1)
    same = sparseft.select(model, _views(), budget=budget, progress=False)
    assert _backbone_trainable(model, same) == budget and same.meta["k"] == 1
    assert all(torch.equal(same.indices[n], k1.indices[n]) for n in k1.indices)
    frozen = Eligibility(train_bias=False, train_layer_scale=False)
    respent = sparseft.select(model, _views(), budget=budget, rules=frozen, progress=False)
    heads = set(head_parameter_names(model))
    assert not [n for n in respent.full if n not in heads]  # biases and layer scale frozen
    assert respent.num_sparse == budget > k1.num_sparse and respent.meta["k"] >= 1
    counts = [respent.per_row_counts(n) for n in respent.indices]
    assert all(bool((c >= respent.meta["k"]).all()) for c in counts)  # every neuron keeps its K
    with pytest.raises(SelectionError, match=r"--budget.*below"):
        sparseft.select(model, _views(), budget=10, progress=False)
    with pytest.raises(SelectionError, match="--level"):
        sparseft.select(model, _views(), budget=budget, level="column", progress=False)


def test_gps_method_options_reach_the_selection(tmp_path):
    model = tiny_model("vit")
    ctx = MethodContext(loader={"select": _views()}.__getitem__, progress=False)
    m = get_method("gps", budget=20_000, train_bias=False)
    m.prepare(model, ctx)
    assert sparseft.parameter_summary(model)["trainable_backbone"] == 20_000
    roles = parameter_roles(tiny_model("vit"), m.rules())
    assert roles["blocks.0.attn.qkv.bias"] == "frozen"
    with pytest.raises(ValueError, match="--level"):
        get_method("gps", budget=100, level="row")


# ---------------------------------------------------------------- RoSA

def _rosa(**options):
    model = tiny_model("vit", num_classes=3)
    base = copy.deepcopy(model)
    ctx = MethodContext(loader={"select": _views()}.__getitem__, progress=False)
    m = get_method("rosa", **options)
    return m, m.prepare(model, ctx), base


def test_rosa_shares_gps_budget_between_lora_and_sparse_entries():
    m, model, base = _rosa()
    gps_k1 = sparseft.select(base, _views(), k=1, progress=False)
    assert sparseft.parameter_summary(model)["trainable_backbone"] == _backbone_trainable(base, gps_k1)
    lora = [n for n in added_parameters(model) if "lora_" in n]
    assert lora and all(".qkv." in n for n in lora)
    sparse_on_qkv = [n for n, d in deltas(model).items() if n.endswith("qkv.weight") and d.index.numel()]
    assert sparse_on_qkv, "RoSA puts sparse entries on the LoRA layers too"


def test_rosa_sparse_gradients_equal_a_dense_reference():
    m, model, _ = _rosa()
    model = model.double().eval()
    x, y = toy_batches(1, batch=4, classes=3, dtype=torch.float64)[0]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in added_parameters(model):
            params[n].add_(0.1 * torch.randn_like(params[n]))
    sparseft.delta.sync(model)
    ref = copy.deepcopy(model)  # the same weights (base + delta written in) as plain dense layers
    for mod in ref.modules():
        uninstall(mod)
    for p in ref.parameters():
        p.requires_grad_(True)
    F.cross_entropy(ref(x), y).backward()
    reference = {sparseft.delta.base_name(n): p.grad for n, p in ref.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    checked = 0
    for name, d in deltas(model).items():
        if d.index.numel():
            torch.testing.assert_close(d.values.grad, reference[name].reshape(-1)[d.index], rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked
    for n in added_parameters(model):
        torch.testing.assert_close(params[n].grad, reference[n], rtol=1e-9, atol=1e-12)


def test_rosa_round_trips_merges_and_unmerges_bit_exactly(tmp_path):
    m, model, base = _rosa()
    train_steps(model, steps=3, batches=toy_batches(3, batch=8, classes=3))  # no forward after the last step
    x = toy_batches(1, batch=4, classes=3, seed=5)[0][0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    path = m.save(model, tmp_path / "rosa.safetensors")
    fresh = get_method("rosa").load(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, atol=1e-6, rtol=0)
        m.merge(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert [type(mod) for mod in model.modules()] == [type(mod) for mod in base.modules()]
    assert list(model.state_dict()) == list(base.state_dict())
    sparseft.unmerge(model)
    for (n, p), (_, pb) in zip(model.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(p, pb), f"{n}: not restored bit-exactly"
    sparseft.unmerge(fresh)  # from the applied state too
    for (n, p), (_, pb) in zip(fresh.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(p, pb), f"{n}: not restored bit-exactly"


def test_rosa_refuses_a_budget_its_lora_and_biases_do_not_fit():
    with pytest.raises(SelectionError, match="--budget"):
        _rosa(budget=1000)
