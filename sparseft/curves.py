"""Training curves: TensorBoard event files while a run trains, and `sparseft plot` from its metrics.jsonl.

    sparseft train ... --out runs/pets                 # + runs/pets/tb/ when `pip install 'sparseft[tensorboard]'`
    tensorboard --logdir runs                          # per step: step/loss, step/lr; per epoch: train/loss,
                                                       # train/acc, test/acc, epoch/lr, ... (every metric)
    sparseft plot runs/pets-gps runs/pets-lora --out curves.png   # loss, accuracy (or mIoU), learning rate

Every run writes metrics.jsonl (one JSON line per epoch: lr, train_loss, train_acc, each evaluated split's
metrics); the event files add the per-step loss and learning rate. A resumed run purges the events past its
checkpoint's step, so the curves continue without a doubled stretch.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseft.errors import InputError
from sparseft.fileutil import atomic_path

TB_DIR = "tb"  # the event files' default folder inside a run folder


def tensorboard_available() -> bool:
    """Whether the optional `tensorboard` package (which torch's SummaryWriter needs) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class CurveLog:
    """TensorBoard scalars of one run: per step (loss, lr) and per epoch (every numeric metric).

    `log_dir` None and no tensorboard installed: a no-op. An explicit `log_dir` without tensorboard is an
    error (the user asked for event files). `start_step`: a resumed run's step; later events are purged.
    """

    def __init__(self, log_dir: str | Path | None, *, explicit: bool = False, start_step: int = 0) -> None:
        self.writer = None
        if log_dir is None:
            return
        if not tensorboard_available():
            if explicit:
                raise InputError(f"--log-dir {log_dir}: TensorBoard event files need the tensorboard package: "
                                 "pip install 'sparseft[tensorboard]'")
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(metrics.get("step", 0))
        for key, value in metrics.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                split, _, name = key.partition("_")
                self.writer.add_scalar(f"{split}/{name}" if name else f"epoch/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_history(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch lines of a run folder's metrics.jsonl (or of that file itself)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{run}: no metrics.jsonl (a run folder of sparseft train, or its metrics.jsonl)")
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: not a JSON line") from None
    if not lines:
        raise InputError(f"{path}: no epochs recorded yet")
    return lines


#: the panels of `plot`: title, the metric-name endings each shows
PANELS = (("loss", ("_loss",)), ("accuracy / mIoU", ("_acc", "_mIoU")), ("learning rate", ("lr",)))


def plot(runs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """Draw loss, accuracy (mIoU for segmentation) and learning rate per epoch of one or more runs into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise InputError("plot: name at least one run folder")
    if labels is not None and len(labels) != len(runs):
        raise InputError(f"plot: {len(labels)} labels for {len(runs)} runs")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: name a .png file")
    histories = [read_history(r) for r in runs]
    names = list(labels) if labels is not None else [Path(r).name if Path(r).is_dir() else Path(r).parent.name
                                                      for r in runs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, ends), ax in zip(PANELS, axes):
        for i, (name, history) in enumerate(zip(names, histories)):
            keys = sorted({k for h in history for k in h if k.endswith(ends) or k in ends})
            for j, key in enumerate(keys):
                points = [(h["epoch"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, color=colours[i % len(colours)], linestyle=("-", "--", ":", "-.")[j % 4],
                            marker="o" if len(xs) < 12 else None, markersize=3,
                            label=f"{name}: {key}" if len(runs) > 1 else key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
