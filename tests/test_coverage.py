"""Every model family goes through select -> apply -> train -> save/load -> merge -> unmerge."""

import copy

import pytest
import torch
from helpers import tiny_model, toy_batches, train_steps

import sparseft
from sparseft.delta import deltas

pytestmark = pytest.mark.slow  # end-to-end runs

FAMILIES = ["vit", "swin", "convnext", "resnet", "mobilenetv2", "efficientnet", "tv_mobilenet_v2", "mlp"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_cycle(family, tmp_path):
    base = tiny_model(family)
    model = copy.deepcopy(base)
    sel = sparseft.select(model, toy_batches(1), k=1, progress=False)
    assert sel.num_sparse > 0 and sel.full
    sparseft.apply(model, sel)
    summary = sparseft.parameter_summary(model)
    assert 0 < summary["backbone_percent"] < 25
    train_steps(model, steps=2)
    model.eval()
    x = toy_batches(1, seed=5)[0][0]
    tuned = model(x)
    assert not torch.equal(tuned, base.eval()(x))
    assert len(deltas(model)) == len([i for i in sel.indices.values() if i.numel()])

    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    reloaded = sparseft.load_delta(copy.deepcopy(base), path).eval()
    assert torch.equal(reloaded(x), tuned)

    sparseft.merge(model)
    assert not any("sparse_delta" in n for n, _ in model.named_modules())
    torch.testing.assert_close(model(x), tuned, rtol=0, atol=0)
    sparseft.unmerge(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
