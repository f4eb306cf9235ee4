"""Drop and regrow: change which entries of an applied model train while it trains (SpIEL).

Every `every` optimizer steps, until the fraction `stop` of the run, each weight with sparse
entries drops the fraction ρ of its entries whose delta moved least (smallest |value|) and grows
as many unselected entries with the largest accumulated squared gradient; ρ decays from
`fraction` to 0 along a cosine (as RigL's schedule). The count per weight stays, so the budget
does. New entries start at delta 0 with zeroed optimizer moments; dropped ones return to base.

The gradient of unselected entries is never held across steps: on the `accumulate` steps before
an update each layer forms its dense weight gradient transiently (the engine's generic path, the
`probe` of `SparseDelta`) and folds it into SM3 accumulators (Anil et al., 2019) — one float per
row and one per column — whose minimum bounds an entry's accumulated squared gradient; SpIEL's
memory-efficient variant uses SM3 the same way. Under a process group the accumulators are summed
over ranks before each update, so every rank grows the same entries.

`Regrower` is the training hook `sparseft.train.fit` calls (`before_step`, `after_step`), and
its state (current indices, accumulators) travels in the run's checkpoint, so a resumed run
regrows exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparseft import delta, distributed
from sparseft.errors import InputError


@dataclass(frozen=True)
class RegrowSchedule:
    every: int = 10          # optimizer steps between updates
    fraction: float = 0.1    # of each weight's entries replaced at the first update (then cosine-decayed)
    stop: float = 0.75       # no update after this fraction of the run's steps
    accumulate: int = 2      # steps before each update whose gradients score the candidates


class Regrower:
    """The drop-and-regrow hook of one applied model (see the module docstring)."""

    def __init__(self, model: nn.Module, schedule: RegrowSchedule) -> None:
        self.model, self.schedule = model, schedule
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        self.replaced = 0  # entries replaced so far

    # -- the schedule ------------------------------------------------------------------------
    def fraction_at(self, step: int, total: int) -> float:
        """ρ after `step` optimizer steps of `total`: 0 off the update steps and after `stop`."""
        s = self.schedule
        end = s.stop * total
        if step <= 0 or step % s.every or step >= end:
            return 0.0
        return s.fraction * (1 + math.cos(math.pi * step / end)) / 2

    def before_step(self, step: int, total: int) -> None:
        """Turn the gradient probes on for the `accumulate` steps before an update (`step` steps done)."""
        upcoming = step + 1
        update = math.ceil(upcoming / self.schedule.every) * self.schedule.every
        probing = update - upcoming < self.schedule.accumulate and self.fraction_at(update, total) > 0
        for name, d in delta.deltas(self.model).items():
            d.probe = self._accumulator(name, d) if probing and d.index.numel() else None

    def after_step(self, step: int, total: int, optimizer: torch.optim.Optimizer | None) -> None:
        """After optimizer step number `step`: drop and regrow when it is an update step."""
        rho = self.fraction_at(step, total)
        if rho > 0 and self.rows:
            self.regrow(rho, optimizer)
        if rho > 0:
            self.rows, self.cols = {}, {}
        for d in delta.deltas(self.model).values():
            d.probe = None

    def _accumulator(self, name: str, d: delta.SparseDelta):
        rows, cols = d.shape[0], math.prod(d.shape[1:])

        def probe(grad: torch.Tensor) -> None:
            g2 = grad.detach().reshape(rows, cols).float().square()
            if name not in self.rows:
                self.rows[name] = torch.zeros(rows, device=g2.device)
                self.cols[name] = torch.zeros(cols, device=g2.device)
            self.rows[name] += g2.amax(dim=1)
            self.cols[name] += g2.amax(dim=0)

        return probe

    # -- the update ----------------------------------------------------------------------------
    def regrow(self, rho: float, optimizer: torch.optim.Optimizer | None) -> int:
        """Replace ρ of every weight's entries now; returns how many entries were replaced."""
        done = 0
        for name, d in delta.deltas(self.model).items():
            if name not in self.rows:
                continue
            n = d.index.numel()
            m = min(int(round(rho * n)), math.prod(d.shape) - n)
            rows = distributed.all_reduce_sum(self.rows[name])
            cols = distributed.all_reduce_sum(self.cols[name])
            if m < 1 or not bool((rows > 0).any()):
                continue
            drop = d.values.detach().abs().topk(m, largest=False, sorted=False).indices
            score = torch.minimum(rows[:, None], cols[None, :]).reshape(-1)
            score[d.index] = -math.inf  # only entries not selected now can grow
            grow = score.topk(m, sorted=False).indices
            order = delta.replace_entries(self.model, name, drop, grow)
            if optimizer is not None:
                _move_state(optimizer, d.values, order, drop)
            done += m
        self.replaced += done
        return done

    # -- checkpoints ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The current entries and accumulators, for the run's checkpoint."""
        out = {f"index/{n}": d.index.detach().cpu() for n, d in delta.deltas(self.model).items()}
        out.update({f"rows/{n}": t.cpu() for n, t in self.rows.items()})
        out.update({f"cols/{n}": t.cpu() for n, t in self.cols.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back a checkpoint's entries (before its values and optimizer state are loaded) and accumulators."""
        for name, d in delta.deltas(self.model).items():
            saved = tensors.get(f"index/{name}")
            if saved is None or torch.equal(saved.to(d.index), d.index):
                continue
            if saved.numel() != d.index.numel():
                raise InputError(f"checkpoint: {name} has {saved.numel()} sparse entries, the model {d.index.numel()}")
            delta.replace_entries(self.model, name, torch.arange(d.index.numel(), device=d.index.device),
                                  saved.to(d.index))
        device = next(self.model.parameters()).device
        self.rows = {k.removeprefix("rows/"): t.to(device) for k, t in tensors.items() if k.startswith("rows/")}
        self.cols = {k.removeprefix("cols/"): t.to(device) for k, t in tensors.items() if k.startswith("cols/")}


def _move_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, order: torch.Tensor,
                fresh_positions: torch.Tensor) -> None:
    """Reorder `param`'s per-entry optimizer state as its entries were, zeroing the fresh entries'."""
    state = optimizer.state.get(param)
    if not state:
        return
    fresh = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    fresh[fresh_positions] = True
    fresh = fresh[order]
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            moved = value[order]
            moved[fresh] = 0
            value.copy_(moved)
