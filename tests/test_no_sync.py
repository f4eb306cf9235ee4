"""A sparse training step never makes the host wait for the device (GPU readiness).

On a GPU, `.item()`, `.cpu()`, `bool(tensor)`, `torch.equal` and friends stall the host until the
device catches up. On the CPU the same code path is checked under a guard that makes those calls
raise inside the step's forward and backward (with `SparseDelta.sync` taking its accelerator
branch); where CUDA exists the whole step also runs under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import random_selection, tiny_model, toy_batches

import sparseft
from sparseft import sparse_layers

FAMILIES = ["vit", "resnet", "mobilenetv2", "convnext"]  # Linear, 1x1, kxk strided, grouped/depthwise convs


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch):
    """Inside the block, every Python-level read of a tensor's data by the host raises `HostSync`."""
    def refuse(what: str):
        def raiser(*args, **kwargs):
            raise HostSync(f"{what} inside a training step (a host synchronisation on an accelerator)")
        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("equal", "allclose", "is_nonzero"):
            m.setattr(torch, name, refuse(f"torch.{name}"))
        m.setattr(sparse_layers, "_compare_on_host", lambda values: False)  # the accelerator's branch
        yield


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def test_the_guard_catches_a_host_read(monkeypatch):
    with no_host_reads(monkeypatch), pytest.raises(HostSync):
        bool(torch.ones(1) > 0)
    with no_host_reads(monkeypatch), pytest.raises(HostSync):
        torch.ones(1).sum().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sparse_step_reads_nothing_back_on_the_host(family, monkeypatch):
    model = sparseft.apply(tiny_model(family), random_selection(tiny_model(family), k=2)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (x, y), = toy_batches(1, batch=4)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with no_host_reads(monkeypatch):
            _forward_backward(model, x, y)  # the first forward after a step writes the new values
        opt.step()  # torch's optimizer (its step counters live on the host even on a GPU)
    with no_host_reads(monkeypatch):
        _forward_backward(model, x, y)  # the write after the last step
        _forward_backward(model, x, y)  # values unchanged since the last write: the accelerator's path
    # the guarded path wrote what the CPU path writes: the weights are base + values
    for name, d in sparseft.delta.deltas(model).items():
        weight = dict(model.named_parameters())[name]
        assert torch.equal(weight.detach().reshape(-1)[d.index], d.base + d.values.detach()), name
    assert any(not torch.equal(p, reference[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU path is checked above)")
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sparse_step_on_cuda_does_not_synchronise(family):
    model = sparseft.apply(tiny_model(family), random_selection(tiny_model(family), k=2)).train().cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (x, y), = toy_batches(1, batch=4)
    x, y = x.cuda(), y.cuda()
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        _forward_backward(model, x, y)
        opt.step()
        if step == 0:  # the first step builds the optimizer's state; the steps after it are the steady state
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
    try:
        _forward_backward(model, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
