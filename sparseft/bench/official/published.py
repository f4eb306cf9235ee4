"""The papers' published accuracies, with where each number was read.

`PUBLISHED[table name]` holds a paper's per-task top-1 (%) and its mean, each with its source (the
paper's table or section). A number this package could not read from its source is absent (None),
never estimated: `sparseft reproduce` then shows "not recorded" in the paper's column, and a number
added here must name its table.

Where the tables were looked for (issue 24): the stored copies of arXiv:2312.10136 (GPS),
arXiv:2303.08566 (SPT) and the SCT repository reachable from where this was written gave the
abstracts and introductions only, not the result tables; the official repositories' READMEs hold
no result tables. So only the means the GPS abstract states are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    paper: str  # the citation
    source: str  # where the per-task numbers come from (table number), or why there are none
    per_task: dict[str, float] = field(default_factory=dict)  # task folder name -> top-1 (%)
    #: a paper with several variants in one table (SPT-LoRA, SPT-Adapter): method -> task folder name -> top-1 (%)
    per_method: dict[str, dict[str, float]] = field(default_factory=dict)
    mean: float | None = None
    mean_source: str = ""
    #: which average `mean` is: "tasks" (over the tasks), "groups" (of VTAB's group means), "" (not recorded)
    mean_of: str = ""

    def number(self, method: str, task: str) -> float | None:
        """The published top-1 (%) of `method` on `task`, None where none is recorded."""
        return self.per_method.get(method, self.per_task).get(task)


_NOT_READ = ("not recorded: the copies of the paper reachable where this table was written give its abstract and "
             "introduction, not its result tables; add the per-task numbers with their table number")

PUBLISHED: dict[str, Published] = {
    "gps-vtab": Published(
        paper="Zhang et al., Gradient-based Parameter Selection for Efficient Fine-Tuning, CVPR 2024 "
              "(arXiv:2312.10136)", source=_NOT_READ, mean=73.1,
        mean_source="arXiv:2312.10136v1 abstract: '73.1% vs. 65.57%, VTAB' (GPS vs. full fine-tuning)"),
    "gps-fgvc": Published(
        paper="Zhang et al., Gradient-based Parameter Selection for Efficient Fine-Tuning, CVPR 2024 "
              "(arXiv:2312.10136)", source=_NOT_READ, mean=91.78, mean_of="tasks",  # FGVC has no groups
        mean_source="arXiv:2312.10136v1 abstract: '91.78% vs. 88.45%, FGVC' (GPS vs. full fine-tuning)"),
    "spt-vtab": Published(
        paper="He et al., Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning, ICCV 2023 (arXiv:2303.08566)",
        source=_NOT_READ),
    "sct-vtab": Published(
        paper="Zhao et al., SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient Channels "
              "(github.com/zhaohengyuan1/SCT)", source=_NOT_READ),
}
