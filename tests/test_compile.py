"""torch.compile: a model with deltas is one graph, trains as in eager, and is plain after merge."""

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from helpers import random_selection, tiny_model, toy_batches
from torch._dynamo.testing import CompileCounterWithBackend

import sparseft


def graphs(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    return explained.graph_count, explained.graph_break_count


def small_cnn() -> torch.nn.Module:
    """Every convolution path of the engine: strided k×k, pointwise 1×1, depthwise; BatchNorm."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def applied(family: str) -> torch.nn.Module:
    model = small_cnn() if family == "cnn" else tiny_model(family)
    return sparseft.apply(model, random_selection(model, k=2))


def test_the_generic_path_adds_no_graph_break():
    x = toy_batches(1, batch=2)[0][0]  # swin's relative-position tables take the generic (injected) path
    assert graphs(applied("swin").eval(), x) == graphs(tiny_model("swin").eval(), x) == (1, 0)


@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_compiled_training_equals_eager_with_one_compilation(family):
    eager, model = applied(family), applied(family)
    counter = CompileCounterWithBackend("aot_eager")  # the graphs dynamo and autograd capture, run as traced
    dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, model)]
    for x, y in toy_batches(3, batch=4):
        for forward, optimizer in ((eager, optimizers[0]), (compiled, optimizers[1])):
            optimizer.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
    assert counter.frame_count == 1  # no graph break, no recompilation as values change: one graph
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    sparseft.merge(model)
    assert not any("sparse_delta" in name for name, _ in model.named_modules())
    assert graphs(model.eval(), toy_batches(1, batch=2)[0][0]) == (1, 0)
