"""Baselines that are a choice of which whole parameters train: full, linear probing, BitFit.

They run on the sparse-delta engine with an empty sparse part, so they share its training,
task files (with the base fingerprint) and merge; merging is trivial since nothing is added.
"""

from __future__ import annotations

from torch import nn

from sparseft.anatomy import head_parameter_names
from sparseft.methods.base import Method, MethodContext, register, whole_parameters
from sparseft.selection import Selection


@register
class Full(Method):
    name = "full"
    summary = "full fine-tuning: every parameter trains (the task file is the whole model)"
    keep_base = False  # a second copy of the whole model only to unmerge: load the base again instead
    batchnorm = "update"

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        return whole_parameters([n for n, _ in model.named_parameters()], self.name)


@register
class Linear(Method):
    name = "linear"
    summary = "linear probing: only the new head trains"

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        return whole_parameters(head_parameter_names(model), self.name)


@register
class BitFit(Method):
    name = "bitfit"
    summary = "BitFit: every bias (norms included) and the head train"

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        heads = set(head_parameter_names(model))
        names = [n for n, _ in model.named_parameters() if n in heads or n.rsplit(".", 1)[-1] == "bias"]
        return whole_parameters(names, self.name)
