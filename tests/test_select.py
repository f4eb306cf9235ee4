"""GPS selection: the loss, the scores, per-neuron top-K, determinism, eligibility."""

import copy
import math

import pytest
import torch
from helpers import tiny_model, toy_batches

import sparseft
from sparseft.selection import Eligibility, Selection, SelectionError, parameter_roles, supcon_loss, top_k_per_neuron
from sparseft.selection.scores import gradient_scores


def naive_supcon(features, labels, t):
    z = torch.nn.functional.normalize(features, dim=1)
    n = len(z)
    total, anchors = 0.0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        pos = [j for j in others if labels[j] == labels[i]]
        if not pos:
            continue
        total += -sum(float(z[i] @ z[p]) / t - math.log(denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_supcon_matches_a_direct_implementation():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(10, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 2, 2])  # label 3 has no positive: skipped as anchor
    assert abs(supcon_loss(f, y, 0.5).item() - naive_supcon(f, y, 0.5)) < 1e-5
    with pytest.raises(ValueError, match="features"):
        supcon_loss(f, y[:3])


def test_supcon_prefers_class_clusters():
    y = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])
    mixed = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]])
    assert supcon_loss(clustered, y) < supcon_loss(mixed, y)


def test_default_roles_follow_the_official_code(vit):
    roles = parameter_roles(vit)
    assert roles["blocks.0.attn.qkv.weight"] == "select"
    assert roles["blocks.0.mlp.fc2.weight"] == "select"
    assert roles["patch_embed.proj.weight"] == "select"
    assert roles["blocks.0.attn.qkv.bias"] == "full"
    assert roles["blocks.0.norm1.weight"] == roles["blocks.0.norm1.bias"] == "frozen"
    assert roles["pos_embed"] == roles["cls_token"] == roles["norm.weight"] == "frozen"
    assert roles["head.weight"] == roles["head.bias"] == "full"
    roles = parameter_roles(vit, Eligibility(select_patch_embed=False, train_bias=False, frozen=("blocks.1.*",)))
    assert roles["patch_embed.proj.weight"] == "frozen"
    assert roles["blocks.0.attn.qkv.bias"] == "frozen"
    assert roles["blocks.1.attn.qkv.weight"] == "frozen"


def test_batchnorm_layers_count_as_norms_by_type():
    roles = parameter_roles(tiny_model("resnet"))
    assert roles["bn1.weight"] == roles["bn1.bias"] == "frozen"
    assert roles["conv1.0.weight"] == "select"
    assert roles["fc.weight"] == "full"
    roles = parameter_roles(tiny_model("convnext"))
    assert roles["stages.0.blocks.0.gamma"] == "full"


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("family", ["vit", "convnext", "mobilenetv2"])
def test_top_k_per_neuron_holds_for_every_eligible_weight(family, k):
    model = tiny_model(family)
    sel = sparseft.select(model, toy_batches(2), k=k, progress=False)
    roles = parameter_roles(model)
    assert set(sel.indices) == {n for n, r in roles.items() if r == "select"}
    assert set(sel.full) == {n for n, r in roles.items() if r == "full"}
    for name, shape in sel.shapes.items():
        row_len = math.prod(shape[1:])
        counts = sel.per_row_counts(name)
        assert counts.shape == (shape[0],)
        assert bool((counts == min(k, row_len)).all()), name


def test_selected_entries_are_the_highest_scores_of_each_row(vit):
    batches = toy_batches(2)
    roles = parameter_roles(vit)
    names = [n for n, r in roles.items() if r == "select"]
    scores, _ = gradient_scores(vit, batches, names, progress=False)
    sel = sparseft.select(vit, batches, k=2, progress=False)
    for name in names:
        rows = scores[name].reshape(scores[name].shape[0], -1)
        chosen = torch.zeros_like(rows, dtype=torch.bool).reshape(-1)
        chosen[sel.indices[name]] = True
        chosen = chosen.reshape(rows.shape)
        min_chosen = torch.where(chosen, rows, torch.inf).min(1).values
        max_other = torch.where(chosen, -torch.inf, rows).max(1).values
        assert bool((min_chosen >= max_other).all()), name


def test_selection_is_deterministic_for_a_seed_and_leaves_the_model_alone(vit):
    vit.eval()
    before = copy.deepcopy(vit.state_dict())
    flags = [p.requires_grad for p in vit.parameters()]
    a = sparseft.select(vit, toy_batches(2), k=1, seed=3, progress=False)
    b = sparseft.select(vit, toy_batches(2), k=1, seed=3, progress=False)
    c = sparseft.select(vit, toy_batches(2), k=1, seed=4, progress=False)
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
    assert any(not torch.equal(a.indices[n], c.indices[n]) for n in a.indices)  # augmentation depends on seed
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())
    assert flags == [p.requires_grad for p in vit.parameters()]
    assert not vit.training and all(p.grad is None for p in vit.parameters())


def test_batchnorm_statistics_survive_selection():
    model = tiny_model("resnet")
    before = {n: b.clone() for n, b in model.named_buffers()}
    sparseft.select(model, toy_batches(1), progress=False)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_two_view_batches_are_used_as_given(vit):
    x, y = toy_batches(1)[0]
    views = [x, x.flip(-1)]
    s1, _ = gradient_scores(vit, [(views, y)], ["blocks.0.attn.qkv.weight"], progress=False)
    s2, _ = gradient_scores(vit, [(views, y)], ["blocks.0.attn.qkv.weight"], progress=False, seed=9)
    torch.testing.assert_close(s1["blocks.0.attn.qkv.weight"], s2["blocks.0.attn.qkv.weight"])  # no augmentation
    with pytest.raises(ValueError, match="at least two views"):
        gradient_scores(vit, [([x], y)], ["blocks.0.attn.qkv.weight"], progress=False)
    with pytest.raises(ValueError, match="yield"):
        gradient_scores(vit, [x], ["blocks.0.attn.qkv.weight"], progress=False)


def test_chunked_scoring_is_exact():
    """Without stochastic layers chunking changes nothing; with drop-path each chunk's re-run
    replays the masks its no-grad forward drew, so the gradients are those of that forward."""
    import timm

    from sparseft.models import feature_fn

    x, y = toy_batches(1, batch=8)[0]
    batch = [([x, x.flip(-1)], y)]
    for rate in (0.0, 0.3):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4,
                                  drop_path_rate=rate)
        names = [n for n, r in parameter_roles(model).items() if r == "select"]
        chunked, _ = gradient_scores(model, batch, names, progress=False, seed=1, chunk_size=5)
        if rate == 0.0:
            reference, _ = gradient_scores(model, batch, names, progress=False, seed=1)
        else:  # same chunks, with gradients, in one graph
            model.train()
            torch.manual_seed(1)
            features = feature_fn(model)
            xx, yy = torch.cat([x, x.flip(-1)]), y.repeat(2)
            out = torch.cat([features(xx[i:i + 5]) for i in range(0, 16, 5)])
            grads = torch.autograd.grad(supcon_loss(out, yy), [dict(model.named_parameters())[n] for n in names])
            reference = {n: g.abs() for n, g in zip(names, grads)}
        for n in names:
            torch.testing.assert_close(chunked[n], reference[n], rtol=1e-4, atol=1e-6)


def test_score_reductions_differ_as_defined(vit):
    name = "blocks.0.mlp.fc1.weight"
    batches = toy_batches(3)
    abs_of_sum, _ = gradient_scores(vit, batches, [name], reduction="abs_of_sum", progress=False)
    sum_of_abs, _ = gradient_scores(vit, batches, [name], reduction="sum_of_abs", progress=False)
    assert bool((sum_of_abs[name] >= abs_of_sum[name] - 1e-6).all())
    assert not torch.allclose(sum_of_abs[name], abs_of_sum[name])


def test_top_k_rejects_bad_k_and_caps_at_row_length():
    scores = {"w": torch.arange(12.0).reshape(3, 2, 2)}
    assert top_k_per_neuron(scores, 10)["w"].tolist() == list(range(12))
    assert top_k_per_neuron(scores, 1)["w"].tolist() == [3, 7, 11]
    with pytest.raises(ValueError, match="at least 1"):
        top_k_per_neuron(scores, 0)


def test_selection_round_trips_through_a_file(tmp_path, vit):
    sel = sparseft.select(vit, toy_batches(1), k=2, progress=False)
    path = sel.save(tmp_path / "sel.safetensors")
    back = Selection.load(path)
    assert back.full == sel.full and back.meta == sel.meta and back.shapes == sel.shapes
    assert all(torch.equal(back.indices[n], sel.indices[n]) for n in sel.indices)
    assert back.describe()["num_sparse"] == sel.num_sparse
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SelectionError, match="junk.safetensors"):
        Selection.load(tmp_path / "junk.safetensors")


def test_selection_validates_indices_and_model_shapes(vit):
    with pytest.raises(SelectionError, match="out of range"):
        Selection(indices={"w": torch.tensor([0, 6])}, shapes={"w": (2, 3)})
    with pytest.raises(SelectionError, match="both sparse and full"):
        Selection(indices={"w": torch.tensor([0])}, shapes={"w": (2, 3)}, full=["w"])
    bad = Selection(indices={"head.weight": torch.tensor([0])}, shapes={"head.weight": (3, 3)})
    with pytest.raises(SelectionError, match="shape"):
        bad.check_model(vit)


def test_ce_loss_scores_through_the_head(vit):
    name = "blocks.0.attn.proj.weight"
    ce, _ = gradient_scores(vit, toy_batches(1), [name], loss="ce", progress=False)
    sc, _ = gradient_scores(vit, toy_batches(1), [name], loss="supcon", progress=False)
    assert ce[name].abs().sum() > 0 and not torch.allclose(ce[name], sc[name])


@pytest.mark.parametrize("level", ["neuron", "layer", "net"])
@pytest.mark.parametrize("criterion", ["gradient", "random", "magnitude"])
def test_ablation_levels_select_the_same_count(vit, level, criterion):
    reference = sparseft.select(vit, toy_batches(1), k=2, progress=False)
    sel = sparseft.select(vit, toy_batches(1) if criterion == "gradient" else None, k=2, level=level,
                          criterion=criterion, progress=False)
    assert sel.meta["level"] == level and sel.meta["criterion"] == criterion
    if level == "net":
        assert sel.num_sparse == reference.num_sparse
    else:
        for name in reference.indices:
            assert sel.indices[name].numel() == reference.indices[name].numel(), name
    if level == "neuron":
        assert all(bool((sel.per_row_counts(n) == 2).all()) for n in sel.indices)


def test_layer_and_net_levels_pick_the_highest_scores():
    from sparseft.selection.gps import top_k_per_layer, top_n_global

    scores = {"a": torch.tensor([[0.0, 9.0], [8.0, 7.0]]), "b": torch.tensor([[1.0, 2.0], [3.0, 0.5]])}
    assert top_k_per_layer(scores, 1)["a"].tolist() == [1, 2]
    net = top_n_global(scores, 1)  # 4 entries over both weights: 9, 8, 7 in a; 3 in b
    assert net["a"].tolist() == [1, 2, 3] and net["b"].tolist() == [2]


def test_magnitude_criterion_follows_weights(vit):
    sel = sparseft.select(vit, None, k=1, criterion="magnitude", progress=False)
    w = vit.blocks[0].mlp.fc1.weight.detach().abs()
    assert torch.equal(sel.indices["blocks.0.mlp.fc1.weight"] % w.shape[1], w.argmax(1))
    with pytest.raises(ValueError, match="needs a data loader"):
        sparseft.select(vit, None)


# -- loud failures: options, batches without negatives, labels, NaN / zero scores -----------

class NeverIterated:
    """A loader that fails the test if selection starts a pass over it."""

    batch_size = 8

    def __iter__(self):
        raise AssertionError("the selection pass started")


@pytest.mark.parametrize(("option", "value", "names"), [
    ("temperature", 0.0, "--temperature"), ("temperature", -0.07, "--temperature"),
    ("temperature", float("nan"), "--temperature"), ("temperature", float("inf"), "--temperature"),
    ("k", 0, "--k"), ("k", 1.5, "--k"), ("max_batches", 0, "--select-batches"),
    ("chunk_size", 0, "--select-chunk"),
])
def test_bad_options_are_refused_before_any_forward_pass(vit, option, value, names):
    with pytest.raises(SelectionError, match=f"{option} must be .*{names}"):
        sparseft.select(vit, NeverIterated(), progress=False, **{option: value})


def test_k_is_checked_for_the_data_free_criteria_too(vit):
    with pytest.raises(SelectionError, match="--k"):
        sparseft.select(vit, None, k=0, criterion="magnitude", progress=False)


def test_batch_size_one_is_refused_up_front_for_supcon(vit):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = toy_batches(1)[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    with pytest.raises(SelectionError, match=r"batch size 1.*--batch-size >= 2 with at least two classes"):
        sparseft.select(vit, loader, progress=False)
    ce = sparseft.select(vit, loader, loss="ce", max_batches=2, progress=False)  # CE needs no negatives
    assert ce.meta["batches"] == 2


def test_a_pass_without_negatives_is_refused():
    x, y = toy_batches(1)[0]
    model = tiny_model("vit")
    singles = [(x[i:i + 1], y[i:i + 1]) for i in range(3)]  # no batch_size attribute: found after the pass
    with pytest.raises(SelectionError, match=r"none of the 3 selection batches held two classes \(batch size 1\)"):
        sparseft.select(model, singles, progress=False)
    one_class = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.ones(4, dtype=torch.long))]
    with pytest.raises(SelectionError, match=r"batch size 4\).*--batch-size >= 2 with at least two classes"):
        sparseft.select(model, one_class, progress=False)


def test_batches_without_negatives_are_kept_and_counted(vit):
    """As in the official code every batch counts; a one-image batch adds an exactly zero gradient."""
    batches = toy_batches(1)
    x, y = batches[0]
    names = [n for n, r in parameter_roles(vit).items() if r == "select"]
    alone, stats = gradient_scores(vit, batches, names, progress=False)
    assert stats["single_class_batches"] == 0
    padded, stats = gradient_scores(vit, batches + [(x[:1], y[:1])], names, progress=False)
    assert stats == {"batches": 2, "images": 9, "single_class_batches": 1, "chunk_size": None,
                     "precision": "fp32"}
    assert all(torch.equal(alone[n], padded[n]) for n in names)
    sel = sparseft.select(vit, batches + [(x[:3], torch.zeros(3, dtype=torch.long))], progress=False)
    assert sel.meta["single_class_batches"] == 1


@pytest.mark.parametrize("loss", ["supcon", "ce"])
def test_labels_must_be_a_vector_of_class_indices(vit, loss):
    x, y = toy_batches(1)[0]
    one_hot = torch.nn.functional.one_hot(y, 4)
    with pytest.raises(SelectionError, match=r"1-D integer vector of class indices.*shape \(8, 4\) \(int64\)"):
        sparseft.select(vit, [(x, one_hot)], loss=loss, progress=False)
    with pytest.raises(SelectionError, match=r"shape \(8,\) \(float32\)"):
        sparseft.select(vit, [(x, y.float())], loss=loss, progress=False)
    with pytest.raises(SelectionError, match="7 labels for views of"):
        sparseft.select(vit, [(x, y[:7])], loss=loss, progress=False)
    sparseft.select(vit, [(x, y.int())], loss=loss, progress=False)  # any integer dtype is fine


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_nan_inputs_are_refused_naming_the_parameter(vit, chunk_size):
    batches = toy_batches(2)
    batches[1][0][0] = float("nan")  # one whole image, so every crop of it holds NaN
    with pytest.raises(SelectionError, match=r"scores of 'patch_embed.proj.weight' .* not finite.*"
                                             r"loss is nan in selection batch 1 \(1 of 2"):
        sparseft.select(vit, batches, chunk_size=chunk_size, progress=False)


def test_scores_that_reach_no_weight_are_refused(vit):
    with torch.no_grad():
        vit.head.weight.zero_()  # cross-entropy then sends no gradient into the backbone
    with pytest.raises(SelectionError, match="zero for every eligible weight.*--loss ce"):
        sparseft.select(vit, toy_batches(1), loss="ce", progress=False)
    sparseft.select(vit, toy_batches(1), progress=False)  # SupCon does not go through the head


def test_magnitude_needs_finite_nonzero_weights_and_random_needs_nothing(vit):
    with torch.no_grad():
        vit.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(SelectionError, match=r"weights of 'blocks.1.mlp.fc1.weight' \(1 of .* not finite"):
        sparseft.select(vit, None, criterion="magnitude", progress=False)
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
    with pytest.raises(SelectionError, match="every eligible weight is zero.*--criterion magnitude"):
        sparseft.select(vit, None, criterion="magnitude", progress=False)
    sparseft.select(vit, None, criterion="random", progress=False)


def test_the_default_pass_is_chunked_when_it_would_outgrow_a_training_step(monkeypatch):
    import timm

    from sparseft.models import feature_fn
    from sparseft.selection import scores

    x, y = toy_batches(1, batch=8)[0]
    batch = [([x, x.flip(-1)], y)]
    vit = tiny_model("vit")
    assert sparseft.select(vit, batch, progress=False).meta["chunk_size"] is None  # a small pass: no extra forward
    monkeypatch.setattr(scores, "AUTO_CHUNK_MIN_BYTES", 0)
    auto = sparseft.select(vit, batch, progress=False)
    assert 1 <= auto.meta["chunk_size"] < 16
    whole = sparseft.select(vit, batch, progress=False, chunk_size=None)
    assert all(torch.equal(auto.indices[n], whole.indices[n]) for n in whole.indices)  # chunking is exact
    assert sparseft.select(vit, batch, progress=False, chunk_size=3).meta["chunk_size"] == 3  # asked for: kept
    cnn = tiny_model("resnet")  # BatchNorm in train mode would normalise per chunk: never chunked unasked
    assert sparseft.select(cnn, batch, progress=False).meta["chunk_size"] is None
    # ViT-S/16 @224, batch 8: 57 MiB of activations per image, 83 MiB of scores -> chunks of 2
    monkeypatch.setattr(scores, "AUTO_CHUNK_MIN_BYTES", 512 * 2**20)
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch16_224", num_classes=10)
    names = [n for n, r in parameter_roles(small).items() if r == "select"]
    params = dict(small.named_parameters())
    with scores.scoring_mode(small, set(names)):
        chunk = scores.auto_chunk(small, feature_fn(small), torch.randn(16, 3, 224, 224), 8,
                                  [params[n] for n in names])
    assert chunk == 2


def test_a_loader_shuffling_from_the_global_rng_selects_the_same_for_a_seed():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = toy_batches(1, batch=32)[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # no generator of its own
    vit = tiny_model("vit")
    torch.manual_seed(1)
    first = sparseft.select(vit, loader, progress=False, seed=3)
    torch.manual_seed(2)
    second = sparseft.select(vit, loader, progress=False, seed=3)
    assert all(torch.equal(first.indices[n], second.indices[n]) for n in first.indices)


def test_the_default_pass_leaves_no_reference_to_the_model(monkeypatch):
    import gc
    import weakref

    from sparseft.selection import scores

    monkeypatch.setattr(scores, "AUTO_CHUNK_MIN_BYTES", 0)  # the probe and the chunked pass both run
    x, y = toy_batches(1, batch=8)[0]
    vit = tiny_model("vit")
    assert isinstance(sparseft.select(vit, [([x, x.flip(-1)], y)], progress=False).meta["chunk_size"], int)
    weight = weakref.ref(vit.blocks[0].attn.qkv.weight)
    del vit
    gc.collect()
    assert weight() is None  # a leaked graph would keep every parameter (ViT-B: 330 MiB) alive


def test_bf16_selection_runs_and_reports_how_many_entries_change(record_property, capsys):
    """`precision="bf16"` scores under autocast; how many of fp32's entries it changes is reported here
    (a measurement on a tiny model, not a goal: the accuracy check decides any default)."""
    model = tiny_model("vit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = toy_batches(2, batch=8)
    fp32 = sparseft.select(model, batches, k=1, progress=False, chunk_size=None)
    bf16 = sparseft.select(model, batches, k=1, progress=False, chunk_size=None, precision="bf16")
    assert fp32.meta["precision"] == "fp32" and bf16.meta["precision"] == "bf16"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model left as it was
    assert set(bf16.indices) == set(fp32.indices)
    total = changed = 0
    for name, idx in fp32.indices.items():
        assert bf16.indices[name].shape == idx.shape
        total += idx.numel()
        changed += idx.numel() - len(set(idx.tolist()) & set(bf16.indices[name].tolist()))
    record_property("bf16_changed_entries", f"{changed}/{total}")
    with capsys.disabled():
        print(f"\nbf16 selection vs fp32 on a tiny ViT (K=1): {changed} of {total} entries differ "
              f"({changed / total:.1%})")
    assert changed < total  # the same scores up to bf16 rounding: most choices agree
    with pytest.raises(sparseft.SelectionError, match="precision must be 'auto', 'fp32' or 'bf16'"):
        sparseft.select(model, batches, k=1, progress=False, precision="fp16")


@pytest.mark.parametrize("device, native, side, want", [
    ("cpu", True, 56, torch.bfloat16), ("cpu", True, 28, None), ("cpu", False, 224, None),
    ("cuda", True, 28, torch.bfloat16), ("cuda", False, 224, None)])
def test_auto_precision_is_low_only_where_it_is_native_and_faster(monkeypatch, device, native, side, want):
    from sparseft.selection.scores import native_low_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert native_low_precision(torch.device(device), torch.zeros(2, 3, side, side)) is want


@pytest.mark.parametrize("native, side, want", [(True, 56, "bf16"), (True, 32, "fp32"), (False, 56, "fp32")])
def test_select_defaults_to_auto_precision_and_records_what_it_ran(monkeypatch, native, side, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    selection = sparseft.select(tiny_model("resnet"), toy_batches(1, batch=4, size=side), k=1, progress=False)
    assert selection.meta["precision"] == want


@pytest.mark.parametrize("option, bf16, want", [(None, False, "fp32"), ("bf16", False, "bf16"),
                                                (None, True, "bf16"), ("fp32", True, "fp32")])
def test_gps_select_precision_reaches_the_scoring_pass(option, bf16, want):
    from sparseft.methods import MethodContext, get_method

    x, y = toy_batches(1, batch=6)[0]
    ctx = MethodContext(loader={"select": [([x, x.flip(-1)], y)]}.__getitem__, progress=False, bf16=bf16)
    options = {} if option is None else {"select_precision": option}
    selection = get_method("gps", **options).select(tiny_model("vit"), ctx)
    assert selection.meta["precision"] == want
