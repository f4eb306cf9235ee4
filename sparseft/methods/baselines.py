"""Baselines that are a choice of which whole parameters train: full, linear probing, BitFit.

They run on the sparse-delta engine with an empty sparse part, so they share its training,
task files (with the base fingerprint) and merge; merging is trivial since nothing is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

import sparseft
from sparseft.methods import Method, MethodContext, register
from sparseft.models import head_parameter_names
from sparseft.select import Selection


def _whole(model: nn.Module, names: list[str], method: str) -> Selection:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return Selection(indices={}, shapes=shapes, full=names, meta={"method": method})


@register
class Full(Method):
    name = "full"
    summary = "full fine-tuning: every parameter trains (the task file is the whole model)"

    @dataclass
    class Options:
        batchnorm: str = field(default="update", metadata={"help": "BatchNorm statistics",
                                                            "choices": ["update", "frozen"]})

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        names = [n for n, _ in model.named_parameters()]
        return sparseft.apply(model, _whole(model, names, self.name), batchnorm=self.options.batchnorm,
                              keep_base=False)


@register
class Linear(Method):
    name = "linear"
    summary = "linear probing: only the new head trains"

    @dataclass
    class Options:
        pass

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return sparseft.apply(model, _whole(model, head_parameter_names(model), self.name), batchnorm="frozen")


@register
class BitFit(Method):
    name = "bitfit"
    summary = "BitFit: every bias (norms included) and the head train"

    @dataclass
    class Options:
        pass

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        heads = set(head_parameter_names(model))
        names = [n for n, _ in model.named_parameters() if n in heads or n.rsplit(".", 1)[-1] == "bias"]
        return sparseft.apply(model, _whole(model, names, self.name), batchnorm="frozen")
