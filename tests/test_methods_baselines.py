"""Full, linear probing, BitFit and GPS through the method interface: counts, frozen weights, files."""

import copy
import math

import pytest
import torch
from helpers import tiny_model, toy_batches, train_steps

import sparseft
from sparseft.methods import METHODS, MethodContext, get_method
from sparseft.models import head_parameter_names
from sparseft.selection import parameter_roles


def ctx_for(batches):
    views = [([x, x.flip(-1)], y) for x, y in batches]
    return MethodContext(loader={"select": views, "train": batches}.__getitem__, progress=False)


def expected_counts(model, method, k=1):
    heads = set(head_parameter_names(model))
    params = dict(model.named_parameters())
    head = sum(params[n].numel() for n in heads)
    if method == "full":
        return sum(p.numel() for n, p in params.items() if n not in heads), head
    if method == "linear":
        return 0, head
    if method == "bitfit":
        return sum(p.numel() for n, p in params.items() if n not in heads and n.endswith("bias")), head
    roles = parameter_roles(model)  # gps: K per neuron of every eligible weight + what trains in full
    sparse = sum(p.shape[0] * min(k, math.prod(p.shape[1:])) for n, p in params.items() if roles[n] == "select")
    full = sum(p.numel() for n, p in params.items() if roles[n] == "full" and n not in heads)
    return sparse + full, head


@pytest.mark.parametrize("family", ["vit", "swin", "convnext", "resnet"])
@pytest.mark.parametrize("method", ["full", "linear", "bitfit", "gps"])
def test_counts_frozen_weights_and_task_files(family, method, tmp_path):
    base = tiny_model(family)
    model = copy.deepcopy(base)
    batches = toy_batches(2)
    m = get_method(method, **({"k": 2} if method == "gps" else {}))
    m.prepare(model, ctx_for(batches))
    summary = sparseft.parameter_summary(model)
    backbone, head = expected_counts(base, method, k=2)
    assert (summary["trainable_backbone"], summary["trainable_head"]) == (backbone, head)
    assert summary["backbone_percent"] == pytest.approx(100 * backbone / sum(
        p.numel() for n, p in base.named_parameters() if n not in set(head_parameter_names(base))))

    train_steps(model, steps=2, weight_decay=0.0)
    model.eval()
    x = toy_batches(1, seed=3)[0][0]
    out = model(x)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    now = dict(model.named_parameters())
    for name, p in base.named_parameters():
        if name in trainable:  # a parameter whose gradient is exactly zero (zero-init branches) may stay
            zero_grad = now[name].grad is None or not now[name].grad.any()
            assert zero_grad or not torch.equal(now[name], p), f"{name} should have trained"
        elif method != "gps" or name not in sparseft.delta.selection_of(model).indices:
            assert torch.equal(now[name], p), f"{name} should be frozen"

    path = m.save(model, tmp_path / "task.safetensors")
    fresh = METHODS[method]().load(copy.deepcopy(base).eval(), path)
    assert torch.equal(fresh(x), out)
    merged = m.merge(fresh)
    torch.testing.assert_close(merged(x), out, atol=1e-5, rtol=0)
    assert set(merged.state_dict()) == set(base.state_dict())
