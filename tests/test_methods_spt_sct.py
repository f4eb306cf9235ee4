"""SPT (spt-lora, spt-adapter) and SCT: selection, counts, training, task files, merging."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import tiny_model, toy_batches
from torch import nn

import sparseft
from sparseft.delta import DeltaError
from sparseft.deltafile import DeltaFileError
from sparseft.methods import MethodContext, get_method, spt_plan
from sparseft.methods import sct as sct_mod
from sparseft.methods import spt as spt_mod
from sparseft.selection import Selection

SPT_OPTIONS = {"budget_fraction": 0.05, "select_batches": 2}  # big enough for structured modules on tiny models


def prepared(name, family="vit", seed=0, batches=None, **options):
    """(prepared model, untouched copy of the base, ctx) for method `name` on a tiny model."""
    model = tiny_model(family, seed=seed)
    base = copy.deepcopy(model)
    batches = batches or toy_batches(2, batch=8)
    ctx = MethodContext(loader=lambda kind: batches, progress=False)
    opts = {**(SPT_OPTIONS if name.startswith("spt") else {}), **options}
    model = get_method(name, **opts).prepare(model, ctx)
    return model, base, ctx


def train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for x, y in toy_batches(steps, batch=8, seed=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def top_counts(scores, tau):
    """Per parameter, how many of the global top-τ entries it holds."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([scores[n].numel() for n in names]))
    counts = torch.bincount(owner[flat.topk(tau).indices], minlength=len(names))
    return dict(zip(names, counts.tolist()))


@pytest.fixture(scope="module")
def vit_scores():
    model = tiny_model("vit")
    scores, _ = spt_plan.sensitivity(model, toy_batches(2, batch=8), max_batches=2)
    return model, scores


# -- SPT ------------------------------------------------------------------------------------

def test_spt_sensitivity_is_the_sum_of_squared_ce_gradients():
    model = tiny_model("vit")
    batches = toy_batches(3, batch=8)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores, stats = spt_plan.sensitivity(model, batches, max_batches=2)
    assert stats == {"batches": 2, "images": 16, "chunk_size": None, "precision": "fp32"}
    assert not any(w in n for n in scores for w in ("head", "cls_token", "pos_embed", "patch_embed"))
    assert {n for n, _ in model.named_parameters()} - set(scores) == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"}
    ref = copy.deepcopy(model).train()
    params = dict(ref.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in scores}
    for x, y in batches[:2]:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for n in scores:
            expected[n] += params[n].grad ** 2
    for n in scores:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-12)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def _check_plan_rules(model, scores, p, kind, alpha=10.0, beta=5.0, rank=8):
    counts = top_counts(scores, p.tau)
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    structured = {f"{m}.weight" for m in p.structured}
    size = {}
    for name in scores:
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, nn.Linear) and name.endswith(".weight"):
            size[name] = spt_plan.structured_size(kind, owner.in_features, owner.out_features, rank)
    for name in structured:
        assert counts[name] >= size[name] / alpha and name not in p.sparse
    for name, idx in p.sparse.items():
        assert idx.numel() == counts[name] > 0
        if name in size:
            assert counts[name] < size[name] / alpha or size[name] >= params[name].numel()
        if params[name].dim() == 1:
            assert counts[name] < params[name].numel() / beta
            weight = name.rpartition(".")[0] + ".weight"
            if name.endswith(".bias") and weight in size:  # a tuned Linear's bias never goes sparse
                assert weight not in structured and weight not in p.sparse
    for name in p.full:
        assert params[name].dim() == 1 and counts[name] > 0
        if counts[name] < params[name].numel() / beta:  # promoted: its Linear's weight is tuned
            weight = name.rpartition(".")[0] + ".weight"
            assert weight in structured or weight in p.sparse
    untouched = set(scores) - structured - set(p.sparse) - set(p.full)
    assert all(counts[n] == 0 for n in untouched)
    cost = p.num_sparse + sum(size[n] for n in structured) + sum(params[n].numel() for n in p.full)
    assert p.cost == cost
    return counts, size, structured


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_spt_plan_fits_the_budget_with_the_largest_tau(vit_scores, kind):
    model, scores = vit_scores
    budget = 40_000
    p = spt_plan.plan(model, scores, budget, kind=kind)
    _check_plan_rules(model, scores, p, kind)
    assert p.structured and p.sparse and p.full, "the test budget should exercise every kind of training"
    assert p.cost <= budget
    over = spt_plan.plan(model, scores, budget, kind=kind, rule="tau")  # τ = budget overshoots here
    assert over.tau == budget and over.cost > budget
    # τ is the largest that fits: one more sensitive entry (rule "tau" takes τ = its budget) does not
    assert spt_plan.plan(model, scores, p.tau + 1, kind=kind, rule="tau").cost > budget


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_spt_tau_rule_overshoot_is_exactly_the_structured_modules(vit_scores, kind):
    model, scores = vit_scores
    budget = 20_000
    p = spt_plan.plan(model, scores, budget, kind=kind, rule="tau")
    counts, size, structured = _check_plan_rules(model, scores, p, kind)
    params = dict(model.named_parameters())
    assert p.tau == budget
    absorbed = sum(counts[n] for n in structured) + sum(counts[n] for n in p.full)
    added = sum(size[n] for n in structured) + sum(params[n].numel() for n in p.full)
    assert p.cost == budget - absorbed + added


@pytest.mark.parametrize("name", ["spt-lora", "spt-adapter"])
def test_spt_trainable_count_matches_the_formula(name):
    model, base, ctx = prepared(name)
    rank = 8
    structure = sparseft.delta.structure_of(model)
    params = dict(model.named_parameters())
    per_module = 0
    for m in structure["modules"]:
        layer = base.get_submodule(m)
        per_module += rank * (layer.in_features + layer.out_features)
        if name == "spt-lora":
            assert params[f"{m}.lora_A.default.weight"].shape == (rank, layer.in_features)
            assert params[f"{m}.lora_B.default.weight"].shape == (layer.out_features, rank)
            assert torch.equal(params[f"{m}.lora_B.default.weight"], torch.zeros(layer.out_features, rank))
        else:
            per_module += rank + layer.out_features
            assert not params[f"{m}.spt_adapter.up.weight"].any()
    selection = sparseft.delta.selection_of(model)
    heads = {"head.weight", "head.bias"}
    vectors = [n for n in selection.full if n not in heads] + [spt_mod._bias_name(structure["kind"], m)
                                                               for m in structure["bias"]]
    summary = sparseft.parameter_summary(model)
    expected = selection.num_sparse + per_module + sum(params[n].numel() for n in vectors)
    assert structure["modules"] and selection.num_sparse > 0
    assert summary["trainable_backbone"] == expected == ctx.info["trainable_backbone"]
    assert summary["trainable_head"] == base.head.weight.numel() + base.head.bias.numel()
    assert expected <= ctx.info["spt_budget"] == round(0.05 * sum(p.numel() for n, p in base.named_parameters()
                                                                    if n not in heads))
    assert ctx.info["spt_structured_matrices"] == len(structure["modules"])
    assert ctx.info["spt_sparse_entries"] == selection.num_sparse


def _current_name(name, structure):
    module, _, leaf = name.rpartition(".")
    if structure.get("kind") == "lora" and module in structure.get("modules", []):
        return f"{module}.base_layer.{leaf}"
    return name


@pytest.mark.parametrize("name", ["spt-lora", "spt-adapter"])
def test_spt_training_changes_only_what_it_selected(name):
    model, base, _ = prepared(name)
    structure = sparseft.delta.structure_of(model)
    selection = sparseft.delta.selection_of(model)
    trained_bias = {f"{m}.bias" for m in structure["bias"]}
    train(model)
    model(toy_batches(1)[0][0])  # a forward writes the last sparse update into the weights
    now = dict(model.named_parameters())
    changed_sparse = False
    for n, p in base.named_parameters():
        after = now[_current_name(n, structure)].detach()
        if n in selection.indices:
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[selection.indices[n]] = True
            assert torch.equal(after.reshape(-1)[~mask], p.reshape(-1)[~mask]), n
            changed_sparse |= not torch.equal(after.reshape(-1)[mask], p.reshape(-1)[mask])
        elif n in selection.full or n in trained_bias:
            assert not torch.equal(after, p), f"{n}: trained in full but unchanged"
        else:
            assert torch.equal(after, p), f"{n}: frozen but changed"
    assert changed_sparse
    up = "lora_B.default.weight" if name == "spt-lora" else "spt_adapter.up.weight"
    for m in structure["modules"]:
        assert now[f"{m}.{up}"].abs().sum() > 0, f"{m}: structured module did not train"


def test_spt_lora_merge_equals_unmerged_and_leaves_a_plain_model(tmp_path):
    model, base, _ = prepared("spt-lora")
    assert sparseft.delta.structure_of(model)["bias"], "the test should fold a trained structured bias too"
    train(model)
    x = toy_batches(1, batch=4, seed=3)[0][0]
    with torch.no_grad():
        before = model(x)
    method = get_method("spt-lora")
    method.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(type(a) is type(b) for a, b in zip(model.modules(), base.modules()))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(DeltaError, match="before merging"):
        method.save(model, tmp_path / "t.safetensors")
    sparseft.unmerge(model)  # the folded LoRA weights come back bit-exactly too
    for (n, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["spt-adapter", "sct"])
def test_adapter_and_sct_refuse_to_merge(name):
    model, _, _ = prepared(name)
    with pytest.raises(DeltaError, match=f"{name} cannot be merged"):
        get_method(name).merge(model)
    with pytest.raises(DeltaError, match=f"{name} cannot be merged"):
        sparseft.merge(model)  # the front door dispatches to the method
    with pytest.raises(DeltaError, match="added by method"):
        sparseft.delta.merge(model)
    assert not get_method(name).mergeable and get_method("spt-lora").mergeable


@pytest.mark.parametrize("name,family", [("spt-lora", "vit"), ("spt-adapter", "vit"), ("spt-lora", "swin"),
                                         ("sct", "vit"), ("sct", "swin"), ("sct", "convnext")])
def test_task_file_round_trip_and_base_check(tmp_path, name, family):
    model, _, _ = prepared(name, family)
    train(model, steps=2)
    method = get_method(name)
    path = method.save(model, tmp_path / "task.safetensors")
    x = toy_batches(1, batch=4, seed=5)[0][0]
    with torch.no_grad():
        expected = model(x)
    fresh = get_method(name).load(tiny_model(family), path)  # default options: the file says it all
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-6)
    assert sparseft.parameter_summary(fresh) == sparseft.parameter_summary(model)
    other = tiny_model(family, seed=1)
    keys = list(other.state_dict())
    with pytest.raises(DeltaFileError, match="another base model"):
        method.load(other, path)
    assert not sparseft.delta.is_applied(other) and list(other.state_dict()) == keys


def test_a_failed_rebuild_leaves_the_model_plain(tmp_path):
    model, _, _ = prepared("spt-lora")
    path = get_method("spt-lora").save(model, tmp_path / "task.safetensors")
    fresh = tiny_model("vit")
    keys = list(fresh.state_dict())
    method = get_method("spt-lora")
    original = method.inject

    def broken(model, structure):
        original(model, structure)
        raise RuntimeError("boom")

    method.inject = broken
    with pytest.raises(RuntimeError, match="boom"):
        method.load(fresh, path)
    assert not sparseft.delta.is_applied(fresh) and list(fresh.state_dict()) == keys


def test_spt_lora_targets_exactly_the_named_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))  # "0" is a suffix of "1.0"
    sparseft.apply(model, Selection(indices={}, shapes={}, full=[]))
    names = get_method("spt-lora").inject(model, {"kind": "lora", "rank": 2, "dropout": 0.0, "modules": ["0"],
                                                  "bias": []})
    assert names == ["0.lora_A.default.weight", "0.lora_B.default.weight"]
    assert type(model[1][0]) is nn.Linear and "peft_config" not in model.__dict__


@pytest.mark.parametrize("family", ["resnet", "convnext", "swin"])
def test_spt_applies_to_other_architectures(family):
    model, base, ctx = prepared("spt-lora", family)
    summary = sparseft.parameter_summary(model)
    assert 0 < summary["trainable_backbone"] == ctx.info["trainable_backbone"] <= ctx.info["spt_budget"]
    train(model, steps=1)
    if family == "resnet":  # BatchNorm statistics are tracked (batchnorm="update")
        assert any(not torch.equal(a, b) for (n, a), b in zip(model.named_buffers(), base.buffers())
                   if "running_mean" in n)


def test_spt_resumed_run_reuses_its_plan(tmp_path):
    batches = toy_batches(2, batch=8)
    ctx = MethodContext(loader=lambda kind: batches, progress=False, run_dir=tmp_path)
    first = get_method("spt-lora", **SPT_OPTIONS).prepare(tiny_model("vit"), ctx)
    assert (tmp_path / "selection.safetensors").exists()

    def no_data(kind):
        raise AssertionError("a resumed run must not score again")

    again = get_method("spt-lora", **SPT_OPTIONS).prepare(tiny_model("vit"), MethodContext(
        loader=no_data, progress=False, run_dir=tmp_path))
    assert sparseft.delta.structure_of(again) == sparseft.delta.structure_of(first)
    assert [n for n, p in again.named_parameters() if p.requires_grad] == \
        [n for n, p in first.named_parameters() if p.requires_grad]


# -- SCT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_sct_trainable_count_is_blocks_times_k2_plus_k(family):
    model, base, ctx = prepared("sct", family)
    sites = sparseft.delta.structure_of(model)["sites"]
    widths = [s.width for s in sct_mod.sct_sites(base)[1]]
    ks = [max(1, round(w / 8)) for w in widths]
    assert [len(s["channels"]) for s in sites] == ks
    summary = sparseft.parameter_summary(model)
    assert summary["trainable_backbone"] == sum(k * k + k for k in ks) == ctx.info["trainable_backbone"]
    head = base.get_classifier()
    assert summary["trainable_head"] == head.weight.numel() + head.bias.numel()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".sct.linear." in n or n.startswith("head") for n in trainable)


def test_sct_channels_option_and_vit_b_numbers():
    model, _, _ = prepared("sct", channels=5)
    assert all(len(s["channels"]) == 5 for s in sparseft.delta.structure_of(model)["sites"])
    torch.manual_seed(0)  # ViT-B/16's width (768) with two of its twelve blocks, at a small input size
    vit_b = timm.create_model("vit_base_patch16_224", num_classes=3, img_size=32, depth=2)
    x, y = toy_batches(1, batch=4, classes=3)[0]
    ctx = MethodContext(loader=lambda kind: [(x, y)], progress=False)
    vit_b = get_method("sct").prepare(vit_b, ctx)
    # the official SCT setting: 96 of 768 channels, 96 x 96 + 96 = 9,312 values per block (12 x 9,312 on ViT-B)
    assert [len(s["channels"]) for s in sparseft.delta.structure_of(vit_b)["sites"]] == [96, 96]
    assert sparseft.parameter_summary(vit_b)["trainable_backbone"] == 2 * 9312


def _direct_saliency(model, x, y, family):
    """Per block, the same statistic from whole activation tensors kept in memory."""
    arch, sites = sct_mod.sct_sites(model)
    store, handles = {}, []
    for s in sites:
        block = model.get_submodule(s.block)
        if s.hook == "norm2":
            handles.append(block.norm2.register_forward_pre_hook(
                lambda m, a, s=s: store.__setitem__(s.block, a[0].reshape(a[0].shape[0], -1, a[0].shape[-1]))))
        else:
            handles.append(block.register_forward_hook(
                lambda m, a, out, s=s: store.__setitem__(s.block, out.flatten(2).transpose(1, 2))))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    result = {}
    for s in sites:
        acts = store[s.block][:, s.prefix:]  # [B, tokens, C]
        norms = [acts[y == c].reshape(-1, acts.shape[-1]).norm(dim=0) for c in y.unique()]
        result[s.block] = torch.stack(norms).mean(0)
    return result


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_sct_streamed_saliency_equals_direct_computation(family):
    model = tiny_model(family)
    batches = toy_batches(3, batch=6, seed=2)
    streamed, stats = sct_mod.channel_saliency(model, batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    direct = _direct_saliency(model, x, y, family)
    assert stats["images"] == 18 and stats["classes"] == len(y.unique())
    for block, value in direct.items():
        torch.testing.assert_close(streamed[block], value, rtol=1e-4, atol=1e-5)
        k = max(1, round(value.numel() / 8))
        assert set(streamed[block].topk(k).indices.tolist()) == set(value.topk(k).indices.tolist())
    if family == "vit":  # the class token is left out
        assert sct_mod.sct_sites(model)[1][0].prefix == 1


def _reference_block(block, x, family):
    """The block forward written out by hand, with the SCT update on the residual stream."""
    s = block.sct
    norm2 = lambda t: type(block.norm2).forward(block.norm2, t)  # noqa: E731 - bypasses the hook

    def update(t, dim=-1):
        picked = t.index_select(dim, s.index).movedim(dim, -1)
        return t.index_add(dim, s.index, F.linear(picked, s.linear.weight, s.linear.bias).movedim(-1, dim))

    if family == "vit":
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = update(x)
        return x + block.drop_path2(block.ls2(block.mlp(norm2(x))))
    if family == "swin":
        B, H, W, C = x.shape
        x = x + block.drop_path1(block._attn(block.norm1(x)))
        x = update(x.reshape(B, -1, C))
        return (x + block.drop_path2(block.mlp(norm2(x)))).reshape(B, H, W, C)
    return update(type(block).forward(block, x), dim=1)  # convnext: the block output


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_sct_hook_output_and_gradients_match_a_rewritten_block(family):
    model, _, _ = prepared("sct", family)
    model = model.double().eval()
    sites = sparseft.delta.structure_of(model)["sites"]
    block = model.get_submodule(sites[-1]["block"])
    with torch.no_grad():
        block.sct.linear.bias.normal_()  # a non-zero bias checks that it is added too
    captured = []
    handle = block.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(toy_batches(1, batch=2, seed=4, dtype=torch.float64)[0][0])
    handle.remove()
    x = captured[0].clone().requires_grad_(True)
    out = block(x)
    ref = _reference_block(block, x, family)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, _without_sct(block, x))  # the module does act
    g = torch.randn_like(out)
    wrt = [x, block.sct.linear.weight, block.sct.linear.bias]
    got = torch.autograd.grad(out, wrt, g)
    want = torch.autograd.grad(ref, wrt, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _without_sct(block, x):
    """The block's output with its SCT hooks taken off for a moment."""
    saved = [(d, dict(d)) for d in (block.norm2._forward_pre_hooks if hasattr(block, "norm2") else {},
                                    block._forward_hooks)]
    try:
        for hooks, _ in saved:
            hooks.clear()
        with torch.no_grad():
            return block(x)
    finally:
        for hooks, content in saved:
            hooks.update(content)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_sct_refuses_other_cnns_clearly(family):
    model = tiny_model(family)
    with pytest.raises(sct_mod.SCTError, match="not supported"):
        get_method("sct").prepare(model, MethodContext(loader=lambda kind: toy_batches(1), progress=False))
    assert not sparseft.delta.is_applied(model)


def test_sct_whole_model_gradient_reaches_every_block():
    model, _, _ = prepared("sct", "vit")
    model.train()
    x, y = toy_batches(1, batch=4)[0]
    F.cross_entropy(model(x), y).backward()
    for s in sparseft.delta.structure_of(model)["sites"]:
        assert model.get_submodule(s["block"]).sct.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ["sct", "spt-adapter"])
def test_a_deep_copy_runs_its_own_hooked_modules(name):
    model, _, _ = prepared(name)
    model.eval()
    x = toy_batches(1, batch=2)[0][0]
    with torch.no_grad():
        before = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), before)
        for n, p in twin.named_parameters():
            if ".sct." in n or ".spt_adapter.up." in n:
                p.add_(0.5)
        assert not torch.equal(twin(x), before) and torch.equal(model(x), before)


# -- registry / report ----------------------------------------------------------------------

@pytest.mark.slow
def test_method_table_lists_spt_and_sct():
    from sparseft.methods.report import method_table

    rows = {r["method"]: r for r in method_table("vit_tiny_patch16_224", 10, img_size=32)}
    assert {"spt-lora", "spt-adapter", "sct"} <= set(rows)
    assert rows["sct"]["trainable_backbone"] == 12 * (24 * 24 + 24) and not rows["sct"]["mergeable"]
    backbone = rows["sct"]["backbone_params"]
    for name in ("spt-lora", "spt-adapter"):
        assert 0 < rows[name]["trainable_backbone"] <= round(spt_plan.DEFAULT_BUDGET_FRACTION * backbone)
    assert rows["spt-lora"]["mergeable"] and not rows["spt-adapter"]["mergeable"]
