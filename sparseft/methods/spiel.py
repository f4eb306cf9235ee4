"""SpIEL-style sparse fine-tuning (after Ansell et al., 2024): GPS's selection, then drop and regrow.

The run starts from GPS's selection (the same options, K and budget) and, while it trains,
replaces the entries whose delta moved least with unselected entries of larger accumulated
gradient (`sparseft.regrow`), keeping every weight's count and so the budget. The task file holds
the final entries; merge, unmerge and TaskBank treat it as any GPS task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from sparseft.methods.base import register
from sparseft.methods.gps import GPS
from sparseft.regrow import Regrower, RegrowSchedule


@register
class SpIEL(GPS):
    name = "spiel"
    summary = "SpIEL: GPS's selection, then drop the entries that moved least and regrow by gradient while training"

    @dataclass
    class Options(GPS.Options):
        regrow_every: int = field(default=10, metadata={"help": "optimizer steps between drop-and-regrow updates"})
        regrow_fraction: float = field(default=0.1, metadata={
            "help": "fraction of each weight's entries replaced at the first update (cosine-decayed to 0)"})
        regrow_stop: float = field(default=0.75, metadata={"help": "no update after this fraction of the run"})
        regrow_accumulate: int = field(default=2, metadata={
            "help": "steps before each update whose (transient, per-layer) gradients score the candidates"})

    def validate(self) -> None:
        super().validate()
        o = self.options
        self.require(isinstance(o.regrow_every, int) and o.regrow_every >= 1, "regrow_every", "a whole number >= 1")
        self.require(0 < o.regrow_fraction <= 1, "regrow_fraction", "in (0, 1]")
        self.require(0 < o.regrow_stop <= 1, "regrow_stop", "in (0, 1]")
        self.require(isinstance(o.regrow_accumulate, int) and 1 <= o.regrow_accumulate <= o.regrow_every,
                     "regrow_accumulate", "a whole number in [1, --regrow-every]")

    def training_hook(self, model: nn.Module) -> Regrower:
        o = self.options
        return Regrower(model, RegrowSchedule(every=o.regrow_every, fraction=o.regrow_fraction, stop=o.regrow_stop,
                                              accumulate=o.regrow_accumulate))
