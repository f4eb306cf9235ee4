"""Module-adding methods (LoRA, adapter, SSF, VPT): counts, frozen base, task files, merge, errors."""

import copy

import pytest
import timm
import torch
from helpers import tiny_model, toy_batches, train_steps
from torch import nn

import sparseft
from sparseft.delta import DeltaError
from sparseft.deltafile import DeltaFileError
from sparseft.methods import METHODS, MethodContext, NotApplicable, get_method
from sparseft.models import head_parameter_names

CTX = MethodContext(loader=lambda kind: [], progress=False)
X = toy_batches(1, batch=4)[0][0]

# (method, family, options) for every architecture a method applies to
CASES = [
    ("lora", "vit", {}), ("lora", "swin", {}), ("lora", "convnext", {}),
    ("lora", "resnet", {"lora_targets": "conv1,conv2", "lora_conv": True, "lora_r": 2}),
    ("adapter", "vit", {}), ("adapter", "swin", {}), ("adapter", "convnext", {}),
    ("ssf", "vit", {}), ("ssf", "swin", {}), ("ssf", "convnext", {}), ("ssf", "resnet", {}),
    ("vpt-shallow", "vit", {}), ("vpt-deep", "vit", {}),
]
IDS = [f"{m}-{f}" for m, f, _ in CASES]


def _model(family: str, seed: int = 0) -> nn.Module:
    """A tiny model whose every block matters: timm zero-inits each ResNet block's last BatchNorm."""
    model = tiny_model(family, seed=seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
    return model


def _prepared(method: str, family: str, options: dict, seed: int = 0):
    model = _model(family, seed=seed)
    base = copy.deepcopy(model)
    m = get_method(method, **options)
    return m, m.prepare(model, CTX), base


def _leaf_modules(model: nn.Module):
    head = head_parameter_names(model)[0].rsplit(".", 1)[0]
    return [(n, mod) for n, mod in model.named_modules() if n and n != head and not n.startswith(head + ".")]


def expected_backbone(method: str, base: nn.Module, options: dict) -> int:
    """The method's trainable-parameter formula, computed from the base model alone."""
    if method == "lora":
        r = options.get("lora_r", 8)
        targets = options.get("lora_targets", "qkv,proj,fc1,fc2").split(",")
        total = 0
        for name, mod in _leaf_modules(base):
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            if isinstance(mod, nn.Linear):
                total += r * (mod.in_features + mod.out_features)
            elif isinstance(mod, nn.Conv2d) and (mod.kernel_size == (1, 1) or options.get("lora_conv")):
                total += r * (mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] + mod.out_channels)
        return total
    if method == "adapter":
        d = options.get("adapter_dim", 8)
        blocks = [mod for _, mod in _leaf_modules(base) if hasattr(mod, "mlp")]
        dims = [b.mlp.fc2.weight.shape[0] for b in blocks]
        return sum(2 * c * d + d + c for c in dims)
    if method == "ssf":  # C scales (+ C shifts where the layer has a bias) per Linear/Conv/affine norm
        total = 0
        for _, mod in _leaf_modules(base):
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)) and \
                    getattr(mod, "weight", None) is not None:
                total += mod.weight.shape[0] * (2 if mod.bias is not None else 1)
        return total
    if method.startswith("vpt"):
        p = options.get("prompt_tokens", 10)
        return p * base.embed_dim * (len(base.blocks) if method == "vpt-deep" else 1)
    raise AssertionError(method)


def _base_view(model: nn.Module, added: set[str]) -> dict[str, torch.Tensor]:
    """The model's base parameters under the base model's names (peft's `.base_layer` removed)."""
    return {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if n not in added}


@pytest.mark.parametrize(("method", "family", "options"), CASES, ids=IDS)
def test_trainable_count_matches_formula_and_only_method_params_train(method, family, options):
    m, model, base = _prepared(method, family, options)
    summary = sparseft.parameter_summary(model)
    assert summary["trainable_backbone"] == expected_backbone(method, base, options) > 0
    heads = head_parameter_names(base)
    assert summary["trainable_head"] == sum(dict(base.named_parameters())[n].numel() for n in heads)
    added = sparseft.delta.added_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(added) | set(heads)
    if method == "lora":
        assert all(".lora_A.default." in n or ".lora_B.default." in n for n in added)
    assert summary["backbone_params"] == sum(p.numel() for n, p in base.named_parameters() if n not in heads)


@pytest.mark.parametrize(("method", "family", "options"), CASES, ids=IDS)
def test_training_keeps_base_bit_identical_and_task_file_round_trips(method, family, options, tmp_path):
    m, model, base = _prepared(method, family, options)
    added = set(sparseft.delta.added_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in added}
    size = 16 if family == "resnet" else 32  # a CNN takes any size: less compute
    train_steps(model, weight_decay=0.0, batches=toy_batches(2, batch=4, size=size))  # changes come from gradients only
    model.eval()
    trained = dict(model.named_parameters())
    unchanged = [n for n, v in before.items() if torch.equal(trained[n], v)]
    assert not unchanged, f"added parameters that did not train: {unchanged[:5]}"
    heads = set(head_parameter_names(base))
    for name, p in _base_view(model, added).items():
        if name not in heads:
            assert torch.equal(p, dict(base.named_parameters())[name]), f"{name}: base weight changed"
    for name, b in base.named_buffers():
        assert torch.equal(dict(model.named_buffers()).get(name, b), b), f"{name}: base buffer changed"

    path = m.save(model, tmp_path / "task.safetensors")
    fresh = METHODS[method]().load(_model(family), path)  # default options: the file's structure rules
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model(X))
    with pytest.raises(DeltaFileError, match="another base model"):
        METHODS[method]().load(_model(family, seed=1), path)


MERGEABLE = [c for c in CASES if c[0] in ("lora", "ssf")]


@pytest.mark.parametrize(("method", "family", "options"), MERGEABLE, ids=[f"{m}-{f}" for m, f, _ in MERGEABLE])
def test_merge_folds_into_a_plain_model_and_unmerge_restores_the_base(method, family, options, tmp_path):
    m, model, base = _prepared(method, family, options)
    params = dict(model.named_parameters())
    with torch.no_grad():  # as if trained: every added parameter moves (LoRA's B leaves zero)
        for name in sparseft.delta.added_parameters(model):
            params[name].add_(0.05 * torch.randn_like(params[name]))
    model.eval()
    with torch.no_grad():
        before = model(X)
        m.merge(model)
        after = model(X)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict())
    assert [type(x) for x in model.modules()] == [type(x) for x in base.modules()]
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
    assert "peft_config" not in model.__dict__
    assert not torch.equal(after, base.eval()(X)), "merged model is the base: nothing was folded"
    with pytest.raises(DeltaError, match="save the task file before merging"):
        m.save(model, tmp_path / "late.safetensors")
    sparseft.unmerge(model)
    for (n, p), (nb, pb) in zip(model.state_dict().items(), base.state_dict().items(), strict=True):
        assert n == nb and torch.equal(p, pb), f"{n}: not restored bit-exactly"


@pytest.mark.parametrize("method", ["adapter", "vpt-shallow", "vpt-deep"])
def test_non_mergeable_methods_refuse_with_the_reason(method):
    m, model, _ = _prepared(method, "vit", {})
    assert not m.mergeable
    with pytest.raises(DeltaError, match="cannot be merged: .*(non-linear|extra tokens)"):
        m.merge(model)
    with pytest.raises(DeltaError, match="cannot be merged: .*(non-linear|extra tokens)"):
        sparseft.merge(model)  # the front door dispatches to the method
    with pytest.raises(DeltaError, match="use that method's merge"):
        sparseft.delta.merge(model)  # the engine refuses too: the modules are still there


@pytest.mark.parametrize(("method", "family"), [("lora", "vit"), ("adapter", "swin"), ("vpt-deep", "vit")])
def test_unmerge_of_an_applied_model_gives_back_the_plain_base(method, family):
    m, model, base = _prepared(method, family, {})
    train_steps(model, batches=toy_batches(1, batch=4))
    m.unmerge(model)
    assert not sparseft.delta.is_applied(model)
    assert [type(x) for x in model.modules()] == [type(x) for x in base.modules()]
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
    for (n, p), (nb, pb) in zip(model.state_dict().items(), base.state_dict().items(), strict=True):
        assert n == nb and torch.equal(p, pb), f"{n}: not restored bit-exactly"
    assert all(p.requires_grad for p in model.parameters())  # as the base had them


def test_a_task_file_of_another_method_is_refused_and_the_model_left_clean(tmp_path):
    m, model, _ = _prepared("ssf", "vit", {})
    path = m.save(model, tmp_path / "ssf.safetensors")
    fresh = _model("vit")
    keys = list(fresh.state_dict())
    with pytest.raises(DeltaError, match="holds modules of method 'ssf', not 'lora'"):
        METHODS["lora"]().load(fresh, path)
    assert not sparseft.delta.is_applied(fresh) and list(fresh.state_dict()) == keys
    with pytest.raises(DeltaFileError, match=r"holds modules of method .ssf.; load it with sparseft.load"):
        sparseft.load_delta(fresh, path)  # the engine alone cannot rebuild the modules


@pytest.mark.parametrize(("method", "family", "match"), [
    ("lora", "resnet", "no layer of resnet10t matches .* layers: conv1 \\(4 Conv2d 3x3\\).*--lora-targets conv1,conv2 "
                       "--lora-conv"),
    ("adapter", "resnet", "no transformer/ConvNeXt blocks with an MLP"),
    ("adapter", "mobilenetv2", "no transformer/ConvNeXt blocks with an MLP"),
    ("vpt-shallow", "swin", "needs a ViT with a token sequence"),
    ("vpt-deep", "convnext", "needs a ViT with a token sequence"),
    ("vpt-deep", "resnet", "needs a ViT with a token sequence"),
])
def test_unsupported_architectures_get_a_clear_error_and_stay_untouched(method, family, match):
    model = tiny_model(family)
    keys = list(model.state_dict())
    with pytest.raises(NotApplicable, match=match):
        get_method(method).prepare(model, CTX)
    assert not sparseft.delta.is_applied(model) and list(model.state_dict()) == keys


def test_lora_refuses_grouped_convs_and_skips_kxk_convs_unless_asked():
    with pytest.raises(NotApplicable, match="grouped/depthwise"):
        get_method("lora", lora_targets="conv_dw,fc1").prepare(tiny_model("convnext"), CTX)
    # the ViT patch embedding is named `proj` too: a 8x8 conv, adapted only with lora_conv
    _, plain, _ = _prepared("lora", "vit", {})
    _, conv, base = _prepared("lora", "vit", {"lora_conv": True})
    assert not any(n.startswith("patch_embed.") for n in sparseft.delta.added_parameters(plain))
    extra = sparseft.parameter_summary(conv)["trainable_backbone"] - sparseft.parameter_summary(plain)[
        "trainable_backbone"]
    assert extra == 8 * (3 * 8 * 8 + base.embed_dim)


def test_lora_uses_peft_layers_and_its_scaling():
    from peft.tuners.lora import LoraLayer

    _, model, base = _prepared("lora", "vit", {"lora_r": 4, "lora_alpha": 16.0, "lora_targets": "fc1"})
    layer = model.blocks[0].mlp.fc1
    assert isinstance(layer, LoraLayer) and layer.scaling["default"] == 4.0
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        h = torch.randn(3, layer.in_features)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(layer(h), base.blocks[0].mlp.fc1(h) + 4.0 * h @ a.T @ b.T)


def test_ssf_identity_init_starts_at_the_base_and_paper_init_is_seeded():
    _, model, base = _prepared("ssf", "vit", {"ssf_init": "identity"})
    with torch.no_grad():
        assert torch.equal(model.eval()(X), base.eval()(X))
    _, a, _ = _prepared("ssf", "vit", {})
    _, b, _ = _prepared("ssf", "vit", {})
    scale = a.blocks[0].attn.qkv.ssf.scale
    assert torch.equal(scale, b.blocks[0].attn.qkv.ssf.scale) and 0.9 < scale.mean() < 1.1 and scale.std() > 0


def test_adapter_starts_at_the_base_and_sits_beside_each_mlp():
    _, model, base = _prepared("adapter", "vit", {"adapter_dim": 4})
    with torch.no_grad():
        assert torch.equal(model.eval()(X), base.eval()(X))  # zero-initialised up projection
        mlp = model.blocks[1].mlp
        mlp.adapter.up.weight.normal_()
        h = torch.randn(2, 5, base.embed_dim)
        ad = mlp.adapter
        expected = base.blocks[1].mlp(h) + 0.1 * ad.up(torch.relu(ad.down(h)))
        torch.testing.assert_close(mlp(h), expected)


def _vpt_reference(base: nn.Module, prompts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """VPT written out by hand on the base model: insert, (deep: replace,) drop after the last block."""
    npt, p = base.num_prefix_tokens, prompts[0].shape[0]
    t = base.norm_pre(base._pos_embed(base.patch_embed(x)))
    t = torch.cat([t[:, :npt], prompts[0].expand(len(x), -1, -1), t[:, npt:]], 1)
    for i, block in enumerate(base.blocks):
        if 0 < i < len(prompts):
            t = torch.cat([t[:, :npt], prompts[i].expand(len(x), -1, -1), t[:, npt + p:]], 1)
        t = block(t)
    t = torch.cat([t[:, :npt], t[:, npt + p:]], 1)
    return base.forward_head(base.norm(t))


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_matches_a_hand_written_reference_with_register_tokens_and_avg_pool(method):
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=3,
                             reg_tokens=4, global_pool="avg").eval()
    assert base.num_prefix_tokens == 5
    model = get_method(method, prompt_tokens=3).prepare(copy.deepcopy(base), CTX).eval()
    prompts = [b.prompt.tokens for b in model.blocks if hasattr(b, "prompt")]
    assert len(prompts) == (3 if method == "vpt-deep" else 1)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(model(X), _vpt_reference(base, prompts, X), atol=1e-6, rtol=1e-6)
        assert model.forward_features(X).shape == base.forward_features(X).shape
    assert seen[0] == 5 + 3 + 16  # prefix + prompts + 4x4 patches inside the blocks
    bound = (6 / (3 * 8 * 8 + base.embed_dim)) ** 0.5
    assert all(t.abs().max() <= bound for t in prompts)


@pytest.mark.slow
def test_methods_are_listed_in_the_method_table(monkeypatch):
    from sparseft.methods import report

    mine = ("lora", "adapter", "ssf", "vpt-shallow", "vpt-deep")
    assert set(mine) <= set(METHODS)
    monkeypatch.setattr(report, "METHODS", {n: METHODS[n] for n in mine})  # the others have their own tests
    rows = {r["method"]: r for r in report.method_table("vit_tiny_patch16_224", 10, img_size=32)}
    lora_in_out = (192 + 576) + (192 + 192) + (192 + 768) + (768 + 192)  # qkv, proj, fc1, fc2
    ssf_block = 2 * (192 + 576 + 192 + 192 + 768 + 192)  # norm1, qkv, proj, norm2, fc1, fc2 (all with bias)
    expected = {"lora": 12 * 8 * lora_in_out, "adapter": 12 * (2 * 192 * 8 + 8 + 192),
                "ssf": 12 * ssf_block + 2 * 192 + 2 * 192,  # + patch embedding conv and final norm
                "vpt-shallow": 10 * 192, "vpt-deep": 12 * 10 * 192}
    for name, count in expected.items():
        assert rows[name]["trainable_backbone"] == count, name
        assert rows[name]["trainable_head"] == 192 * 10 + 10
    assert rows["ssf"]["mergeable"] and rows["lora"]["mergeable"]
    assert not rows["adapter"]["mergeable"] and not rows["vpt-deep"]["mergeable"]


def test_a_crashed_lora_run_resumes_exactly_through_the_trainer(tmp_path):
    from helpers import FailingLoader, Interrupt, toy_loader

    from sparseft.train import TrainConfig, fit

    def lora_vit():  # a new process rebuilds the model and prepares the method again
        return get_method("lora", lora_r=2, lora_dropout=0.1).prepare(_model("vit"), CTX)

    cfg = TrainConfig(epochs=2, lr=3e-3, warmup_epochs=0, progress=False)
    whole = lora_vit()
    fit(whole, FailingLoader(toy_loader(n=16), after=10**9), cfg, run_dir=tmp_path / "a")
    with pytest.raises(Interrupt):
        fit(lora_vit(), FailingLoader(toy_loader(n=16), after=3), cfg, run_dir=tmp_path / "b")
    resumed = lora_vit()
    fit(resumed, FailingLoader(toy_loader(n=16), after=10**9), cfg, run_dir=tmp_path / "b", resume=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    reloaded = METHODS["lora"]().load(_model("vit"), tmp_path / "b" / "delta.safetensors")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(X), resumed.eval()(X))
