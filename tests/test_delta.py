"""The sparse-delta engine: exact gradients, frozen entries untouched, merge/unmerge exact."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import random_selection, tiny_model, toy_batches, train_steps
from torch import nn

import sparseft
from sparseft.delta import DeltaError, deltas


def dense_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    F.cross_entropy(ref(x), y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("family", ["vit", "swin", "convnext", "mobilenetv2", "resnet", "efficientnet", "mlp"])
def test_delta_gradients_equal_dense_autograd_float64(family):
    model = tiny_model(family).double().eval()  # eval: no dropout / drop-path, deterministic
    x, y = toy_batches(1, batch=4, dtype=torch.float64)[0]
    reference = dense_grads(model, x, y)
    x_ref = x.clone().requires_grad_(True)
    x_ref_grad = torch.autograd.grad(F.cross_entropy(_with_grad(model)(x_ref), y), x_ref)[0]
    x.requires_grad_(True)

    sel = random_selection(model)
    sparseft.apply(model, sel)
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    checked_sparse = 0
    for name, delta in deltas(model).items():
        expected = reference[name].reshape(-1)[delta.index]
        torch.testing.assert_close(delta.values.grad, expected, rtol=1e-10, atol=1e-12)
        checked_sparse += 1
        assert params[name].grad is None, f"{name}: a frozen weight got a dense gradient"
    assert checked_sparse == len([i for i in sel.indices.values() if i.numel()])
    for name in sel.full:
        torch.testing.assert_close(params[name].grad, reference[name], rtol=1e-10, atol=1e-12)
    for name, p in params.items():
        if not p.requires_grad:
            assert p.grad is None, name
    torch.testing.assert_close(x.grad, x_ref_grad, rtol=1e-10, atol=1e-12)


def _with_grad(model):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def test_gathered_fast_path_is_used_for_linear_and_conv_layers():
    model = tiny_model("mobilenetv2")
    sparseft.apply(model, random_selection(model))
    found = deltas(model)
    assert found["blocks.1.0.conv_pw.weight"].gathered  # 1x1 conv
    assert found["blocks.1.0.conv_dw.weight"].gathered  # depthwise 3x3 conv, stride 2
    for family in ("vit", "mlp", "resnet"):
        model = tiny_model(family)
        sparseft.apply(model, random_selection(model))
        assert all(d.gathered for d in deltas(model).values()), family
    model = tiny_model("efficientnet")  # timm's Conv2dSame has its own forward: generic path
    sparseft.apply(model, random_selection(model))
    assert not deltas(model)["conv_stem.weight"].gathered


def test_bf16_autocast_gradients_close_to_fp32():
    model = tiny_model("vit").eval()
    x, y = toy_batches(1, batch=8)[0]
    sel = random_selection(model)
    ref = copy.deepcopy(model)
    sparseft.apply(model, sel)
    sparseft.apply(ref, sel)
    F.cross_entropy(ref(x), y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), y).backward()
    for name, d in deltas(model).items():
        r = deltas(ref)[name].values.grad
        assert d.values.grad.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(d.values.grad, r, dim=0) > 0.98, name


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_training_changes_only_selected_entries(family):
    model = tiny_model(family)
    base = copy.deepcopy(model)
    sel = random_selection(model, k=1)
    sparseft.apply(model, sel)
    train_steps(model)
    model.eval()
    model(toy_batches(1)[0][0])  # a forward writes the last update into the weights
    trained, original = dict(model.named_parameters()), dict(base.named_parameters())
    changed_any = False
    for name, p in original.items():
        now = trained[name].detach()
        if name in sel.indices:
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[sel.indices[name]] = True
            assert torch.equal(now.reshape(-1)[~mask], p.detach().reshape(-1)[~mask]), f"{name}: unselected changed"
            changed_any |= not torch.equal(now.reshape(-1)[mask], p.detach().reshape(-1)[mask])
        elif name in sel.full:
            assert not torch.equal(now, p.detach()), f"{name}: trained-in-full parameter did not change"
        else:
            assert torch.equal(now, p.detach()), f"{name}: frozen parameter changed"
    assert changed_any


def test_optimizer_state_exists_only_for_trainable_tensors():
    model = tiny_model("vit")
    sel = random_selection(model, k=1)
    sparseft.apply(model, sel)
    opt = train_steps(model, steps=1)
    state_numel = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state_numel == 2 * sparseft.trainable_parameters(model)
    expected = sel.num_sparse + sum(dict(model.named_parameters())[n].numel() for n in sel.full)
    assert sparseft.trainable_parameters(model) == expected


def test_merge_gives_plain_model_with_same_outputs_and_unmerge_is_exact():
    model = tiny_model("vit")
    base = copy.deepcopy(model)
    sparseft.apply(model, random_selection(model))
    train_steps(model)
    model.eval()
    x = toy_batches(1)[0][0]
    applied_out = model(x)
    sparseft.merge(model)
    assert not any("sparse_delta" in n for n, _ in model.named_modules())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(model(x), applied_out, rtol=0, atol=0)
    sparseft.unmerge(model)
    assert not sparseft.delta.is_applied(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), n
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in base.parameters()]


def test_unmerge_from_applied_state_restores_base_and_forward():
    model = tiny_model("convnext")
    base = copy.deepcopy(model)
    sparseft.apply(model, random_selection(model))
    train_steps(model)
    sparseft.unmerge(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), n
    x = toy_batches(1)[0][0]
    model.eval(), base.eval()
    assert torch.equal(model(x), base(x))


def test_base_weights_context_runs_the_base_then_restores():
    model = tiny_model("vit").eval()
    base = copy.deepcopy(model)
    sparseft.apply(model, random_selection(model))
    train_steps(model)
    model.eval()
    x = toy_batches(1)[0][0]
    tuned = model(x)
    with sparseft.base_weights(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), tuned)


def test_direct_value_edits_need_sync_and_version_tracking_catches_optimizer_steps():
    model = tiny_model("mlp").eval()
    sparseft.apply(model, random_selection(model))
    d = deltas(model)["1.weight"]
    w = model[1].weight
    with torch.no_grad():
        d.values.add_(1.0)  # in-place op: version changes, next forward writes it
    model(torch.zeros(1, 3, 32, 32))
    assert torch.equal(w.detach().reshape(-1)[d.index], d.base + 1.0)
    d.values.data.fill_(2.0)  # .data bypasses the version counter: sync() is the documented remedy
    sparseft.sync(model)
    assert torch.equal(w.detach().reshape(-1)[d.index], d.base + 2.0)


def test_state_errors_are_clear():
    model = tiny_model("mlp")
    with pytest.raises(DeltaError, match="no sparseft deltas"):
        sparseft.merge(model)
    sel = random_selection(model)
    sparseft.apply(model, sel)
    with pytest.raises(DeltaError, match="already has sparseft deltas"):
        sparseft.apply(model, sel)
    other = tiny_model("vit")
    with pytest.raises(ValueError, match="does not have"):
        sparseft.apply(other, sel)


def test_batchnorm_frozen_mode_keeps_statistics():
    model = tiny_model("resnet")
    stats = {n: b.clone() for n, b in model.named_buffers()}
    sparseft.apply(model, random_selection(model), batchnorm="frozen")
    train_steps(model, steps=2)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if n in stats)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not bn.training
    sparseft.merge(model)
    model.train()
    assert bn.training  # the override is gone after merge


def test_fused_optimizers_and_data_edits_reach_the_weights():
    model = tiny_model("mlp").eval()
    sparseft.apply(model, random_selection(model))
    x = toy_batches(1)[0][0]
    before = model(x)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    opt.step()
    d = deltas(model)["1.weight"]
    after = model(x)
    assert not torch.equal(before, after)
    assert torch.equal(model[1].weight.detach().reshape(-1)[d.index], d.base + d.values.detach())


def test_multihead_attention_out_proj_trains_through_the_attention_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    reference = dense_grads(model, x, y)
    sel = random_selection(model)
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(sel.indices)
    sparseft.apply(model, sel)
    F.cross_entropy(model(x), y).backward()
    for name in ("attn.in_proj_weight", "attn.out_proj.weight"):
        d = deltas(model)[name]
        torch.testing.assert_close(d.values.grad, reference[name].reshape(-1)[d.index])
    sparseft.merge(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_state_dict_from_another_selection_is_refused():
    a, b = tiny_model("mlp"), tiny_model("mlp")
    sparseft.apply(a, random_selection(a, seed=1))
    sparseft.apply(b, random_selection(b, seed=2))
    with pytest.raises(RuntimeError, match="another selection"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv2"])
def test_bf16_autocast_matches_autocast_dense(family):
    """Under bf16 autocast the sparse layers give what autocast's dense layers give: the same bf16
    outputs, the dense weight gradient's selected entries and the input gradients, to bf16 rounding."""
    model = tiny_model(family).train()
    for m in model.modules():  # BatchNorm statistics frozen in both (GPS trains with them frozen)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    x, y = toy_batches(1, batch=4)[0]
    sel = random_selection(model)
    dense = copy.deepcopy(model)
    for p in dense.parameters():
        p.requires_grad_(True)
    sparseft.apply(model, sel)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    xs, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_sparse, out_dense = model(xs), dense(xd)
    assert out_sparse.dtype == out_dense.dtype == torch.bfloat16
    torch.testing.assert_close(out_sparse.float(), out_dense.float(), rtol=2e-2, atol=2e-2)
    F.cross_entropy(out_sparse.float(), y).backward()
    F.cross_entropy(out_dense.float(), y).backward()
    grads = dict(dense.named_parameters())
    for name, d in deltas(model).items():
        expected = grads[name].grad.reshape(-1)[d.index]
        got = d.values.grad
        assert got.dtype == torch.float32
        scale = expected.abs().max().clamp_min(1e-6)
        assert ((got - expected).abs().max() / scale) < 5e-2, name
        if expected.abs().max() > 0:  # (a layer behind a dead ReLU on this toy batch has none)
            assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.995, name
        else:
            assert not got.any(), name
    assert torch.nn.functional.cosine_similarity(xs.grad.flatten(), xd.grad.flatten(), dim=0) > 0.995


@pytest.mark.parametrize("autocast", [False, True])
def test_gelu_and_layer_norm_outputs_are_not_copied_and_the_gradients_are_the_same(monkeypatch, autocast):
    """fc2's input is GELU(fc1's output), qkv's and fc1's a layer norm's output; autograd keeps the inputs of
    both for their own backward, so the sparse layers hold those instead of copies of their own input's
    columns and recompute the columns: the same gradients (to float rounding; bit for bit here). Under bf16
    autocast the float32 norm's columns are recomputed and cast as the forward cast them."""
    from sparseft import sparse_layers

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def grads(recompute: bool):
        model = tiny_model("vit")
        sparseft.apply(model, random_selection(model, k=3))
        seen = {}
        mlp = model.blocks[0].mlp
        mlp.fc1.register_forward_hook(lambda m, i, o: seen.update(fc1=o))
        mlp.fc2.register_forward_hook(lambda m, i, o: seen.update(fc2=o.grad_fn))
        model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.update(norm1=i[0]))
        model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.update(qkv=o.grad_fn))
        if not recompute:
            monkeypatch.setattr(sparse_layers, "_producer", lambda x: None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().sum()
        held_by = {n: {t.data_ptr() for t in seen[n].saved_tensors if t is not None} for n in ("fc2", "qkv")}
        shares = seen["fc1"].data_ptr() in held_by["fc2"] and seen["norm1"].data_ptr() in held_by["qkv"]
        loss.backward()
        monkeypatch.undo()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, shares

    held, shares = grads(True)
    assert shares  # fc2 holds GELU's input (fc1's output), qkv the layer norm's input: no copies
    copied, shares = grads(False)
    assert not shares
    assert held.keys() == copied.keys()
    for name in held:
        torch.testing.assert_close(held[name], copied[name], rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_gives_the_same_gradients():
    """Under saved-tensor hooks (torch.utils.checkpoint) the layers keep their own copies (sparse_layers._producer
    reuses nothing a hook may have packed away); the gradients are those of the plain model."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in ("plain", "checkpointed"):
        model = tiny_model("vit")
        sparseft.apply(model, random_selection(model, k=3))
        if mode == "checkpointed":
            blocks = model.blocks
            model.blocks = nn.Sequential(*[_Checkpointed(b, checkpoint) for b in blocks])
        model(x).square().sum().backward()
        out[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    import re

    assert len(out["plain"]) == len(out["checkpointed"])
    for name, grad in out["plain"].items():
        wrapped = re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.block.", name)
        torch.testing.assert_close(out["checkpointed"][wrapped], grad, rtol=1e-5, atol=1e-6)


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module, checkpoint) -> None:
        super().__init__()
        self.block, self.checkpoint = block, checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("case", ["bf16 norm", "norm under offloading, layer outside"])
def test_columns_are_copied_where_recomputing_them_would_not_be_exact_or_free(case):
    """A bf16 layer norm's statistics are rounded (and fp32 beside bf16 inputs would mix dtypes); tensors a norm
    kept through saved-tensor hooks would be unpacked (copied back, or recomputed) by reading them. Both: copy."""
    from sparseft import sparse_layers

    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(16), nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    if case == "bf16 norm":
        norm, linear, x = norm.bfloat16(), linear.bfloat16(), x.detach().bfloat16().requires_grad_()
        h = norm(x)
    else:
        with torch.autograd.graph.save_on_cpu():
            h = norm(x)
    assert sparse_layers._producer(h) is None
    sparseft.apply(linear, sparseft.Selection(indices={"weight": torch.arange(0, 128, 9)}, shapes={"weight": (8, 16)}))
    linear(h).float().square().sum().backward()  # and the layer trains on the copy
    assert linear.sparse_delta["weight"].values.grad is not None


@pytest.mark.parametrize("used", [3, 30, 32])
@pytest.mark.parametrize(("kind", "affine"), [("layer_norm", "both"), ("layer_norm", "weight"), ("layer_norm", "bias"),
                                              ("layer_norm", "none"), ("gelu", "both")])
def test_recomputed_columns_are_the_producers_output_at_each_entrys_column(kind, affine, used):
    """Few used columns are gathered before recomputing, many are recomputed whole: either way the column each
    entry reads holds what the layer norm / GELU gave in the forward."""
    from sparseft import sparse_layers

    gen = torch.Generator().manual_seed(used)
    source = torch.randn(2, 7, 32, generator=gen) * 3 + 1
    if kind == "gelu":
        source.requires_grad_()
        out = torch.nn.functional.gelu(source, approximate="tanh")
    else:
        norm = nn.LayerNorm(32, elementwise_affine=affine != "none", bias=affine in ("both", "bias"))
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_(generator=gen)
        if affine == "bias":  # LayerNorm has no bias-only form: drop the weight by hand
            norm.weight = None
        out = norm(source.requires_grad_())
    kind_, held, extra = sparse_layers._producer(out)
    assert kind_ == kind
    ucols = torch.randperm(32, generator=gen)[:used].sort().values
    cpos = torch.randint(0, used, (40,), generator=gen, dtype=torch.int32)
    x, cols = sparse_layers._recompute_columns(kind, held, extra, None if used == 32 else ucols, cpos)
    expected = out.detach().reshape(-1, 32).index_select(1, ucols.index_select(0, cpos.long()))
    torch.testing.assert_close(x.index_select(1, cols.long()), expected, rtol=1e-6, atol=1e-6)
    assert x.shape[1] == (used if used < 0.5 * 32 else 32)
