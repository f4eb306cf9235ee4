"""GPS as a method: select on the task's data, then train the selection as sparse deltas."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from sparseft.cliopts import flag_of
from sparseft.errors import InputError
from sparseft.methods.base import CommonOptions, Method, MethodContext, register
from sparseft.selection import Eligibility, Selection, select
from sparseft.selection.scores import check_count, check_temperature

#: options a saved selection fixes (`--selection` takes them from the file)
SELECTION_SETTINGS = ("k", "level", "criterion", "loss", "score", "score_norm", "temperature", "budget")
#: every option a selection depends on (a cached selection is reused only when all of them agree)
SELECTION_OPTIONS = (*SELECTION_SETTINGS, "view_scale", "select_batches", "train_norm", "train_embeddings",
                     "select_patch_embed", "select_bias_tables", "train_bias", "select_precision")


@register
class GPS(Method):
    name = "gps"
    summary = "Gradient-based Parameter Selection: top-K inputs per neuron by SupCon gradient"
    #: "update" until 2026-12-01; on MobileNetV2 (mini-vtab-cpu, 3 tasks x 3 seeds) GPS with frozen statistics
    #: beat GPS updating them by 8.5 points on 9/9 pairs (docs/results.md)
    batchnorm = "frozen"

    #: the paper's optimiser (official scripts: --opt adam --weight-decay 0)
    train_defaults: ClassVar[dict[str, Any]] = {"optimizer": "adam", "weight_decay": 0.0}

    @dataclass
    class Options(CommonOptions):
        k: int = field(default=1, metadata={"help": "selected input connections per neuron"})
        budget: int | None = field(default=None, metadata={
            "help": "trainable backbone values in all (selected entries + biases/layer scale trained in full); "
                    "replaces --k: the largest per-neuron K that fits, the rest to the best remaining entries"})
        level: str = field(default="neuron", metadata={
            "help": "top-K per neuron (the paper); ablations: the same count per layer or over the whole net; "
                    "structured: each weight's K whole input columns, or whole rows over the net",
            "choices": ["neuron", "layer", "net", "column", "row"]})
        criterion: str = field(default="gradient", metadata={
            "help": "score by gradient (the paper), first-order importance |sum g*w| (taylor), or the ablations "
                    "weight magnitude and random", "choices": ["gradient", "taylor", "magnitude", "random"]})
        loss: str = field(default="supcon", metadata={
            "help": "ablation: head-free SupCon, or cross-entropy through a random head", "choices": ["supcon", "ce"]})
        score: str = field(default="abs_of_sum", metadata={
            "help": "score = |sum of gradients| (official), sum of |gradients|, or sum of squared gradients",
            "choices": ["abs_of_sum", "sum_of_abs", "sum_of_squares"]})
        score_norm: str = field(default="none", metadata={
            "help": "experiment: 'column' divides each input's scores by their mean over the rows before top-K "
                    "(spreads top-1 choices over inputs); 'none' is the paper's rule", "choices": ["none", "column"]})
        temperature: float = field(default=0.07, metadata={"help": "SupCon temperature"})
        view_scale: float = field(default=0.2, metadata={
            "help": "smallest crop (fraction of the image) of the selection views; the official code passes "
                    "timm's --scale, 0.08"})
        select_batches: int | None = field(default=None, metadata={"help": "limit the selection pass to N batches"})
        select_chunk: int | None = field(default=None, metadata={
            "help": "re-run the selection backward in chunks of N images (less memory, one extra forward; "
                    "default: chosen so the pass stays below a training step, the whole batch for BatchNorm "
                    "models)"})
        train_norm: bool = field(default=False, metadata={"help": "train normalisation layers in full"})
        train_bias: bool = field(default=True, metadata={
            "help": "train biases and layer-scale gammas in full (official); --no-train-bias freezes them, so "
                    "that a --budget goes to selected entries"})
        train_embeddings: bool = field(default=False, metadata={
            "help": "make position embeddings / class token eligible"})
        select_patch_embed: bool = field(default=True, metadata={"help": "select from the patch embedding"})
        select_bias_tables: bool = field(default=False, metadata={
            "help": "select per row from 2-D bias tables (Swin's relative_position_bias_table) instead of training "
                    "them in full as the official code does"})
        select_precision: str | None = field(default=None, metadata={
            "help": "the scoring pass's precision: fp32, bf16 autocast (fp16 on CUDA, as the official code), or "
                    "auto: bf16 where the device runs it natively and faster (a GPU with bf16; a CPU with bf16 "
                    "instructions, images >= 56 px); default: bf16 under --bf16, else auto",
            "choices": ["auto", "fp32", "bf16"]})
        selection: str | None = field(default=None, metadata={"help": "use this saved selection file instead"})

    def validate(self) -> None:
        super().validate()
        o = self.options
        check_count(o.k, "k", "--k", "selected inputs per neuron")
        if o.budget is not None:
            check_count(o.budget, "budget", "--budget", "trainable backbone values")
            if o.level != "neuron":
                raise InputError(f"gps: --budget fills top-K per neuron; --level {o.level} takes --k instead")
        if o.loss == "supcon" and o.criterion in ("gradient", "taylor"):
            check_temperature(o.temperature)
        self.require(0 < o.view_scale <= 1, "view_scale", "in (0, 1]")
        for name in ("select_batches", "select_chunk"):
            if getattr(o, name) is not None:
                check_count(getattr(o, name), name, flag_of(name), "when given")

    def rules(self) -> Eligibility:
        o = self.options
        return Eligibility(freeze_norm=not o.train_norm, freeze_embeddings=not o.train_embeddings,
                           train_bias=o.train_bias, train_layer_scale=o.train_bias,
                           select_patch_embed=o.select_patch_embed, select_bias_tables=o.select_bias_tables)

    def select(self, model: nn.Module, ctx: MethodContext, budget: int | None = None,
               reserved: int = 0) -> Selection:
        """The selection (from --selection, or scored on the task's data); `budget` overrides --budget and
        `reserved` values of it go to modules a subclass adds."""
        o = self.options
        if o.selection:  # the file's settings are the task's: the header must say what was trained
            selection = Selection.load(o.selection)
            made_with = {key: selection.meta[key] for key in SELECTION_SETTINGS if key in selection.meta}
            rules = selection.meta.get("rules", {})
            if "select_bias_tables" in rules:
                made_with["select_bias_tables"] = rules["select_bias_tables"]
            if "train_bias" in rules:
                made_with["train_bias"] = rules["train_bias"]
            self.options = dataclasses.replace(o, **made_with)
            return selection
        loader = ctx.loader("select") if o.criterion in ("gradient", "taylor") else None
        return select(model, loader, k=o.k, rules=self.rules(), score=o.score,
                               temperature=o.temperature, max_batches=o.select_batches,
                               chunk_size=o.select_chunk or "auto", seed=ctx.seed,
                               autocast=ctx.bf16 and o.select_precision is None,
                               precision=o.select_precision or "auto",
                               progress=ctx.progress, level=o.level,
                               criterion=o.criterion, loss=o.loss, score_norm=o.score_norm,
                               budget=o.budget if budget is None else budget, reserved=reserved)

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        t0 = time.perf_counter()
        selection = self.select(model, ctx)
        selection.meta["method"] = self.name  # gps, or a method built on its selection (spiel)
        ctx.info["selection_time_s"] = round(time.perf_counter() - t0, 2)
        ctx.info["selected_entries"] = selection.num_sparse
        return selection
