"""`sparseft` command line: select, train, eval, predict, merge, export, import-peft, plot, info, methods, layers,
bench, report, demo, data, weights.

Exit status, for every command: 0 success; 1 a user error (bad file, bad value, a run that
diverged), reported as one line `error: ...` on stderr; 2 a usage error (unknown flag, a
method option given to another method); 130 interrupted (Ctrl-C). A reader of stdout that went
away (`sparseft info F | head -1`) ends the command quietly, status 1 (Python's recipe). Anything else is a bug and
keeps its traceback. The training and method flags are generated from `TrainConfig` and the
methods' `Options` dataclasses (`sparseft.cliopts`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

import sparseft
from sparseft import distributed
from sparseft.api import describe_task, evaluate_task, load_for_inference, method_named_in, trained_on
from sparseft.autolr import run_auto_lr
from sparseft.bench import load_suite, run_suite, write_report
from sparseft.bench import reproduce as reproduction
from sparseft.bench.cells import runs_in_cell
from sparseft.bench.runner import checked_cells
from sparseft.cliopts import (
    UsageError,
    add_arguments,
    add_shared_arguments,
    cli_options,
    from_args,
    given,
    owned_options,
)
from sparseft.data import DataError, DataWarning
from sparseft.data.cli import register_cli as register_data_cli
from sparseft.deltafile import TaskFile, read_delta, save_merged
from sparseft.demo import main as demo_main
from sparseft.errors import InputError, SparseftError, TrainingWarning
from sparseft.evalreport import check_confusion_folder, per_class_table, write_confusion
from sparseft.export.cli import register_cli as register_export_cli
from sparseft.fileutil import check_output_file, check_output_folder
from sparseft.hub.cli import register_cli as register_weights_cli
from sparseft.inference import UNKNOWN, check_min_confidence, find_images, predict, write_csv
from sparseft.kinds.base import Command, TaskKind, kind_named_in, kind_options
from sparseft.layers import format_layers
from sparseft.loaders import TaskData, num_classes_of
from sparseft.methods import METHODS, MethodContext, get_method
from sparseft.methods.gps import SELECTION_SETTINGS
from sparseft.methods.report import method_table
from sparseft.run import PROTOCOL_SPLITS, RunSpec, run
from sparseft.seg.predict import check_destinations, predict_masks, write_masks
from sparseft.train import TrainConfig

OPTION_PREFIX = "opt_"  # namespace prefix of the method options' flags
KIND_PREFIX = "kind_"  # namespace prefix of the flags of predict and eval that depend on the task kind

EPILOG = """examples:
  sparseft data fetch mini-vtab                    # offline tasks into the cache
  sparseft weights fetch mobilenetv2_100_offline   # offline ImageNet weights
  sparseft train --model mobilenetv2_100_offline --data mini-vtab/fashion_mnist --method gps --k 1 \\
      --img-size 64 --epochs 10 --out runs/fashion-gps
  sparseft eval runs/fashion-gps/delta.safetensors --data mini-vtab/fashion_mnist --confusion runs/fashion-gps/test
  sparseft predict runs/fashion-gps/delta.safetensors photos/ --top-k 3 --out preds.csv
  sparseft merge runs/fashion-gps/delta.safetensors --out fashion-model.safetensors
"""


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required,
                   help="timm model name (e.g. vit_small_patch16_224) or offline backbone (sparseft weights list)")
    g.add_argument("--weights", help="local backbone weights: .safetensors, or a trusted .pth read weights-only")
    g.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (needs internet)")
    g.add_argument("--img-size", type=int, help="input resolution (ViTs resample position embeddings; default: "
                                                "the backbone's own)")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="a VTAB-1k task folder, fgvc:<dir>, folder:<dir>, or a fetched "
                                                 "task such as mini-vtab/fashion_mnist")
    g.add_argument("--preprocessing", default="vtab", choices=["vtab", "fgvc"],
                   help="vtab: resize, no augmentation; fgvc: random resized crop + flip for training")
    g.add_argument("--batch-size", type=int, default=32, help="training (and selection) batch size")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--protocol", default="final", choices=["final", "tune"],
                   help="final: train on train800val200, evaluate on test; tune: train800 -> val200")
    add_arguments(g, TrainConfig)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The training settings given as flags, TrainConfig's defaults for the others: those it leaves open (the
    learning rate, the optimiser) `sparseft.run.run` fills in, as it does for a run built in Python."""
    return from_args(args, TrainConfig)


def _method_options() -> dict[str, type]:
    return {name: cls.Options for name, cls in METHODS.items()}


def _spec(args: argparse.Namespace, method: str, options: dict):
    train_split, eval_splits = PROTOCOL_SPLITS[args.protocol]
    return RunSpec(model=args.model, data=args.data, method=method, options=options, weights=args.weights,
                   pretrained=args.pretrained, img_size=args.img_size, batch_size=args.batch_size,
                   train_split=train_split, eval_splits=eval_splits, preprocessing=args.preprocessing,
                   workers=args.workers, train=_train_config(args))


def cmd_train(args: argparse.Namespace) -> int:
    options = owned_options(args, args.method, _method_options(), prefix=OPTION_PREFIX)
    if options.get("selection"):
        fixed = [f"--{k}" for k in SELECTION_SETTINGS if k in options]
        if fixed:
            raise InputError(f"{', '.join(fixed)}: fixed by the saved --selection {options['selection']} (it was made "
                             "with its own settings); drop them, or select again")
    auto = getattr(args, "lr", None) == "auto"
    if auto:
        del args.lr  # `sparseft.autolr` chooses it
        if args.log_dir is not None:
            raise UsageError("--log-dir: with --lr auto the event files go to each run's tb/ folder")
    spec = _spec(args, args.method, options)
    extra = {} if auto else {"log_dir": args.log_dir}
    summary = (run_auto_lr if auto else run)(spec, args.out, resume=args.resume, overwrite=args.overwrite, **extra)
    if distributed.is_main():
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    final = summary.get("final", {})
    params = summary.get("params", {})
    shown = ("_acc", "_mIoU", "_mDice")  # segmentation: pixel accuracy, mIoU and mDice (dataset-level)
    accs = " ".join(f"{k}={v:.4f}" for k, v in final.items() if k.endswith(shown))
    print(f"{summary.get('method')}: {accs}  trainable backbone {params.get('trainable_backbone', 0):,} "
          f"({params.get('backbone_percent', 0):.3f} %) + head {params.get('trainable_head', 0):,}  "
          f"train {summary.get('train_time_s', 0):.1f} s")
    if summary.get("lr") is not None:
        print(f"lr {summary['lr']:g} ({summary.get('lr_source', 'given')})")
    if summary.get("optimizer") is not None:
        print(f"optimizer {summary['optimizer']}, weight decay {summary['weight_decay']:g} "
              f"({summary.get('optimizer_source', 'given')})")
    if "task_file" in summary:
        print(f"task file: {summary['task_file']} ({summary['task_file_bytes'] / 1024:.1f} KiB)")


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, not {value}")
    return value


def _output_file(raw: str, overwrite: bool, source: Path | None = None, kind: str = ".safetensors") -> Path:
    """The file `--out` names, checked before any work (`fileutil.check_output_file`, as the Python API's writers)."""
    return check_output_file(raw, overwrite=overwrite, source=source, source_is="task file", label="--out",
                             what=f"{kind} file")


def cmd_select(args: argparse.Namespace) -> int:
    import torch

    if "test" in args.split.lower() and not args.allow_test_split:
        raise InputError(f"--split {args.split}: selecting on a test split lets its labels choose what trains, "
                         "and every accuracy measured on it afterwards is optimistic; select on a training split, "
                         "or give --allow-test-split REASON (recorded in the selection file)")
    out = distributed.run_on_main(lambda: _output_file(args.out, args.overwrite))
    config = _train_config(args)  # only --seed and --progress exist here
    spec = RunSpec(model=args.model, data=args.data, weights=args.weights, pretrained=args.pretrained,
                   img_size=args.img_size, batch_size=args.batch_size, train_split=args.split,
                   preprocessing=args.preprocessing, workers=args.workers, train=config)
    torch.manual_seed(config.seed)  # as `train` does: the same random initialisation on every rank and run
    model = sparseft.create_model(args.model, num_classes=num_classes_of(spec), img_size=args.img_size,
                                  weights=args.weights, pretrained=args.pretrained).to(distributed.default_device())
    data = TaskData(spec, model)
    method = get_method("gps", **given(args, METHODS["gps"].Options, prefix=OPTION_PREFIX))
    ctx = MethodContext(loader=lambda kind: data.loader(kind), seed=config.seed, progress=config.progress)
    selection = method.select(model, ctx)
    selection.meta.update({"model": args.model, "data": args.data, "split": args.split,
                           **({"test_split_reason": args.allow_test_split} if args.allow_test_split else {})})
    if not distributed.is_main():
        return 0
    selection.save(out)
    d = selection.describe()
    print(f"selected {d['num_sparse']:,} entries in {len(d['sparse'])} weights (+ {len(d['full'])} parameters "
          f"trained in full) -> {args.out}")
    return 0


def _kind_options(args: argparse.Namespace, command: Command, kind: TaskKind) -> Any:
    """The task kind's own options of `command` as given (its dataclass; defaults for the rest); an option
    that only other kinds take is refused (exit status 2) before any work."""
    present = [n for n in dict.fromkeys(o.name for cls in kind_options(command).values() for o in cli_options(cls))
               if hasattr(args, KIND_PREFIX + n)]
    kind.check_options(args.task_file, command, present)
    return from_args(args, getattr(kind, f"{command}_options"), prefix=KIND_PREFIX)


def cmd_eval(args: argparse.Namespace) -> int:
    task = read_delta(args.task_file)  # read and verified once: the evaluation below takes it as it is
    options = _kind_options(args, "eval", kind_named_in(task.header))
    folder = check_confusion_folder(args.confusion, overwrite=args.overwrite) if args.confusion is not None else None
    result = evaluate_task(task, args.data, args.split, batch_size=args.batch_size, weights=args.weights,
                           preprocessing=getattr(options, "preprocessing", None))
    overlap = trained_on(task.header.get("extra") or {}, args.data, args.split)
    if overlap:
        print(f"warning: {overlap}", file=sys.stderr)
    record = {"task_file": str(args.task_file), "split": args.split, **result}
    written = write_confusion(result, folder, overwrite=args.overwrite) if folder is not None else []
    if args.json:
        print(json.dumps({**record, **({"confusion_files": [str(w) for w in written]} if written else {})}))
        return 0
    print(json.dumps({k: v for k, v in record.items() if k not in ("per_class", "confusion")}))  # the overall line
    table = per_class_table(result)
    print(table, *(["confusion matrix -> " + ", ".join(map(str, written))] if written else []), sep="\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {args.batch_size}")
    task = read_delta(args.task_file)  # read and verified once: the load below takes it as it is
    kind = kind_named_in(task.header)  # what the task's kind predicts: classes (a CSV) or masks (PNGs)
    options = _kind_options(args, "predict", kind)
    if kind.prediction != "classes":
        if kind.prediction not in PREDICTION_WRITERS:
            raise InputError(f"{args.task_file} is a {kind.name} task, which sparseft predict does not serve: "
                             f"{kind.predict_hint}")
        return PREDICTION_WRITERS[kind.prediction](args, task)
    if options.top_k < 1:
        raise InputError(f"--top-k must be at least 1, not {options.top_k}")
    check_min_confidence(options.min_confidence, (task.header.get("extra") or {}).get("class_names"))
    out = _output_file(args.out, args.overwrite, args.task_file, ".csv") if args.out is not None else None
    images = find_images(args.inputs)
    model = load_for_inference(task, weights=args.weights)  # with the task's preprocessing and names
    preds = predict(model, images, top_k=options.top_k, batch_size=args.batch_size,
                    progress=_train_config(args).progress, on_error="raise" if args.strict else "skip",
                    min_confidence=options.min_confidence)
    _report_skipped(preds)
    good = [p for p in preds if p.error is None]
    if out is not None:
        write_csv(good, out, label=options.min_confidence is not None)
        print(f"predictions for {len(good)} images -> {out}")
    else:
        for p in good:
            print(f"{p.path}: {f'{UNKNOWN}; ' if p.unknown else ''}"
                  + ", ".join(f"{label} ({prob:.3f})" for label, prob in zip(p.labels, p.probs)))
    return 0


def _predict_masks(args: argparse.Namespace, task: TaskFile) -> int:
    """`sparseft predict` for a segmentation task: one mask PNG per image in the --out folder."""
    if args.out is None or not args.out.strip():
        raise InputError(f"{args.task_file} is a segmentation task: name a folder for its mask PNGs with --out")
    check_output_folder(args.out, label="--out", what="the mask PNGs (a segmentation task writes one per image)")
    out = Path(args.out).resolve()
    images = [p for p in find_images(args.inputs) if out not in p.resolve().parents]  # not earlier masks
    if not images:
        raise DataError(f"no images to predict outside --out {args.out}")
    check_destinations(images, out, overwrite=args.overwrite)  # before any work
    model = load_for_inference(task, weights=args.weights)
    preds = predict_masks(model, images, batch_size=args.batch_size, progress=_train_config(args).progress,
                          on_error="raise" if args.strict else "skip")
    _report_skipped(preds)
    written = write_masks(preds, args.out, overwrite=args.overwrite)
    print(f"masks for {len(written)} images -> {args.out} (pixel value = class id: "
          f"{', '.join(f'{i} {n}' for i, n in enumerate(model.class_names or []))})")
    return 0


def _report_skipped(preds: Sequence[Any]) -> None:
    """What `predict` could not read, whatever the reason (undecodable, truncated, a folder or a FIFO named
    like an image, a broken link, no permission): one warning line per image naming it, then the count
    (exit status 0: the others were predicted); none read is an error."""
    skipped = [p for p in preds if p.error is not None]
    for p in skipped:
        print(f"warning: {_one_line(p.error)} (skipped)", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} of {len(preds)} images", file=sys.stderr)
    if len(skipped) == len(preds):
        raise DataError(f"none of the {len(preds)} images could be read")


#: how `sparseft predict` writes what a task kind's `prediction` names, beside "classes" (`cmd_predict`)
PREDICTION_WRITERS = {"masks": _predict_masks}


def cmd_merge(args: argparse.Namespace) -> int:
    out = _output_file(args.out, args.overwrite, source=args.task_file)
    task = read_delta(args.task_file)  # read and verified once: the load below takes it as it is
    header = task.header
    if task.merged:
        raise InputError(f"{args.task_file}: is a merged model already; predict, eval and info take it as it is")
    name = method_named_in(header)
    if name not in METHODS:
        raise InputError(f"{args.task_file}: written by method {name!r}, which this sparseft does not know")
    if not METHODS[name].mergeable:
        raise InputError(f"{args.task_file}: {METHODS[name]().merge_refusal()}")
    model = sparseft.merge(sparseft.load(task, weights=args.weights))
    save_merged(model, out, source=args.task_file)  # the task's header goes along: predict, eval, info take it
    print(f"merged model ({sum(v.numel() for v in model.state_dict().values()):,} values) -> {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(describe_task(args.task_file), indent=1, default=str))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    rows = method_table(args.model, args.num_classes, img_size=args.img_size) if args.model else [
        {"method": n, "mergeable": c.mergeable, "summary": c.summary} for n, c in METHODS.items()]
    for row in rows:
        if "trainable_backbone" in row:
            print(f"{row['method']:12s} merge={'yes' if row['mergeable'] else 'no ':3s} "
                  f"backbone {row['trainable_backbone']:>11,} ({row['backbone_percent']:7.3f} %)  "
                  f"head {row['trainable_head']:>8,}  {row['summary']}")
        else:
            print(f"{row['method']:12s} merge={'yes' if row['mergeable'] else 'no ':3s} {row['summary']}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    model = sparseft.create_model(args.model, img_size=args.img_size, weights=args.weights,
                                  pretrained=args.pretrained)
    print(format_layers(model))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, protocol=args.protocol)
    out = args.out or Path("results") / f"{suite.name}-{suite.protocol}"
    if args.dry_run:  # every check a run makes before its first cell; nothing written
        cells = checked_cells(suite, out, args.only)
        for c in cells:
            print(f"{c.backbone.key} / {c.task} / {c.entry.label} / seed {c.seed}: {runs_in_cell(suite, c)} run(s)")
        print(f"{len(cells)} cells, {sum(runs_in_cell(suite, c) for c in cells)} training runs -> {out}")
        return 0
    run_suite(suite, out, progress=True, show_epochs=args.epochs_progress, only=args.only)
    report = write_report(out)
    print(f"report: {report}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    rep = reproduction.prepare(args.target, args.data, protocol=args.protocol, weights=args.weights,
                               download=args.download, tasks=args.tasks, strict_weights=not args.dry_run)
    out = args.out or Path("results") / f"reproduce-{args.target}"
    if args.dry_run:
        print(reproduction.plan_text(rep, out))
        return 0
    print(f"report: {reproduction.reproduce(rep, out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(f"report: {write_report(args.results)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return demo_main(fast=args.fast, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseft", description="Task-adaptive parameter-efficient fine-tuning "
                                "(GPS, SPT, SCT and baselines) with lean sparse-delta training.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    t = sub.add_parser("train", help="fine-tune a backbone on a task with one method",
                       description="Fine-tune a backbone on a task; writes a run folder with config, metrics, "
                                   "checkpoint and the task file.")
    t.add_argument("--method", default="gps", choices=sorted(METHODS), help="fine-tuning method")
    t.add_argument("--out", required=True, help="run folder")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                      "(refused if a setting changed)")
    mode.add_argument("--overwrite", action="store_true", help="replace sparseft's files in a non-empty --out "
                      "(by default a run needs an empty or new folder)")
    t.add_argument("--log-dir", help="TensorBoard event files here (default: the run folder's tb/ when the "
                   "tensorboard extra is installed: pip install 'sparseft[tensorboard]')")
    _model_args(t)
    _data_args(t)
    _train_args(t)
    add_shared_arguments(t, _method_options(), prefix=OPTION_PREFIX)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("select", help="run GPS selection only and save the selection",
                       description="Score weights with GPS on a task's training data and save the selection.")
    s.add_argument("--out", required=True, help="selection file (.safetensors)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--split", default="train800val200", help="data split to select on (a test split is refused)")
    s.add_argument("--allow-test-split", metavar="REASON",
                   help="select on a test split anyway, for REASON (e.g. reproducing an official script); recorded "
                        "in the selection file")
    add_arguments(s, TrainConfig, only=["seed", "progress"])
    _model_args(s)
    _data_args(s)
    gps_options = METHODS["gps"].Options
    training_only = ("batchnorm", "selection")  # select trains nothing and makes the selection
    selecting = [o.name for o in cli_options(gps_options) if o.name not in training_only]
    add_arguments(s.add_argument_group("gps options"), gps_options, only=selecting, prefix=OPTION_PREFIX)
    s.set_defaults(func=cmd_select)

    e = sub.add_parser("eval", help="evaluate a saved task file on a data split")
    e.add_argument("task_file", type=Path, help="task file written by train (delta.safetensors), or a merged model "
                                                "(merge --out)")
    e.add_argument("--data", required=True, help="data spec (see train --help)")
    e.add_argument("--split", default="test", help="split to evaluate")
    e.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    e.add_argument("--weights", help="local base weights, if the base is not an offline backbone")
    add_shared_arguments(e, kind_options("eval"), prefix=KIND_PREFIX, title="options of {} tasks")
    e.add_argument("--confusion", metavar="DIR", help="write the confusion matrix as DIR/confusion.csv and "
                                                      "DIR/confusion.png (rows: true class)")
    e.add_argument("--overwrite", action="store_true", help="replace the --confusion files if they exist")
    e.add_argument("--json", action="store_true", help="print one JSON object (per-class results and the "
                                                       "confusion matrix included) instead of the overall line and "
                                                       "the per-class table")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="the top-k classes (or the masks) of a saved task for new images",
                        description="Run a task file on image files and folders (searched recursively): the top-k "
                                    "classes of each image, printed or written to a CSV file; for a segmentation "
                                    "task, one mask PNG per image (pixel value = class id) in the --out folder. "
                                    "Mergeable methods run merged; unreadable images are reported and skipped "
                                    "(--strict: an error).")
    pr.add_argument("task_file", type=Path, help="task file written by train (delta.safetensors), or a merged model "
                                                 "(merge --out)")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders of images")
    pr.add_argument("--out", help="CSV file to write (columns path, label_1, prob_1, ...) instead of printing; "
                                  "for a segmentation task the folder of mask PNGs")
    pr.add_argument("--overwrite", action="store_true", help="replace --out (or masks in it) if it exists")
    pr.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    pr.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: a warning, "
                                                          "and the image is skipped)")
    pr.add_argument("--weights", help="local base weights, if the base is not an offline backbone")
    add_arguments(pr, TrainConfig, only=["progress"])
    add_shared_arguments(pr, kind_options("predict"), prefix=KIND_PREFIX, title="options of {} tasks")
    pr.set_defaults(func=cmd_predict)

    m = sub.add_parser("merge", help="merge a task file into its base and save a plain model",
                       description="Merge a task file into its base: a plain state dict (load_state_dict takes it) "
                                   "whose metadata keeps the task's header, so predict, eval, info and sparseft.load "
                                   "take the merged file with no base model.")
    m.add_argument("task_file", type=Path, help="task file written by train")
    m.add_argument("--out", required=True, help="output .safetensors with the merged state dict and the task's header")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.add_argument("--weights", help="local base weights, if the base is not an offline backbone")
    m.set_defaults(func=cmd_merge)

    i = sub.add_parser("info", help="describe a task file or merged model (method, sizes, base fingerprint)")
    i.add_argument("task_file", type=Path, help="task file, or a merged model (merge --out)")
    i.set_defaults(func=cmd_info)

    ms = sub.add_parser("methods", help="list the methods; with --model, their trainable parameters on it")
    ms.add_argument("--model", help="timm model name or offline backbone to count parameters on")
    ms.add_argument("--num-classes", type=_at_least_two, default=10, help="head size for the counts")
    ms.add_argument("--img-size", type=int, help="input resolution of the model")
    ms.set_defaults(func=cmd_methods)

    ly = sub.add_parser("layers", help="a model's layers grouped as --lora-targets takes them, and what GPS trains",
                        description="List a model's layers with parameters, grouped by name and type: the target "
                                    "names --lora-targets takes, how LoRA and GPS treat each group, and a suggestion.")
    ly.add_argument("model", help="timm model name or offline backbone (sparseft weights list)")
    ly.add_argument("--img-size", type=int, help="input resolution (default: the backbone's own)")
    ly.add_argument("--weights", help="local backbone weights (.safetensors, or a .pth read weights-only)")
    ly.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (needs internet)")
    ly.set_defaults(func=cmd_layers)

    b = sub.add_parser("bench", help="run a benchmark suite (resumable) and write its report",
                       description="Run methods x tasks x backbones x seeds from a suite YAML (or a shipped suite: "
                                   "mini-vtab-quick, mini-vtab-cpu, vtab-1k, fgvc); the whole suite is checked "
                                   "before the first run; finished runs are skipped, interrupted ones resume.")
    b.add_argument("suite", help="suite YAML file or shipped suite name")
    b.add_argument("--out", type=Path, help="results folder (default: results/<suite>-<protocol>)")
    b.add_argument("--protocol", choices=["honest", "paper", "screen"], help="override the suite's protocol")
    b.add_argument("--only", nargs="+", help="run only these method labels (a label no row has is an error)")
    b.add_argument("--dry-run", action="store_true", help="check the whole suite as a run does before its first "
                   "cell (options, grid values, backbones, every task's data), list the cells and run counts; run "
                   "and write nothing")
    b.add_argument("--epochs-progress", action="store_true", help="show per-epoch progress bars too")
    b.set_defaults(func=cmd_bench)

    rp = sub.add_parser("reproduce", help="run a paper's suite as its official code does; its numbers beside ours",
                        description="Check the data and the paper's backbone weights, then run the paper suite of "
                                    "TARGET (the rows of the paper's own method, the official per-task settings) "
                                    "and write reproduce.md: the paper's published per-task numbers, ours and the "
                                    "difference (docs/reproduce.md).")
    rp.add_argument("target", choices=list(reproduction.TARGETS), help="the paper and benchmark")
    rp.add_argument("--data", required=True, help="the benchmark's root: VTAB-1k task folders (NOAH layout) or "
                                                  "FGVC data-set folders (VPT's JSON splits); docs/data.md")
    rp.add_argument("--protocol", choices=list(reproduction.PROTOCOLS), default="paper",
                    help="paper: best test top-1 over epochs, as the paper reports (labelled so); honest: the "
                         "last epoch's; both: each in its own results folder (default: paper)")
    rp.add_argument("--out", type=Path, help="results folder (default: results/reproduce-<target>)")
    rp.add_argument("--weights", help="the backbone's weights as a local file, in place of timm's pretrained tag "
                                      "(e.g. the official .npz converted with `sparseft weights convert`)")
    rp.add_argument("--download", action="store_true", help="let timm download the paper's pretrained weights when "
                                                            "they are not cached (needs internet)")
    rp.add_argument("--tasks", nargs="+", help="run only these tasks (folder names, e.g. dtd cifar)")
    rp.add_argument("--dry-run", action="store_true", help="check the data (and note the weights), print the "
                    "per-task plan with an estimated GPU time; run and write nothing")
    rp.set_defaults(func=cmd_reproduce)

    r = sub.add_parser("report", help="write report.md, results.csv and plots for a results folder")
    r.add_argument("results", type=Path, help="results folder of sparseft bench")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="end-to-end demo on real offline images: GPS vs full fine-tuning")
    d.add_argument("--fast", action="store_true", help="fewer epochs (a smoke run)")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the demo's runs")
    d.set_defaults(func=cmd_demo)

    register_export_cli(sub)
    register_data_cli(sub)
    register_weights_cli(sub)
    return p


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is the user's (bad input, a missing file, a diverged run) rather than a bug.

    User errors: `sparseft.errors.SparseftError` (DeltaFileError, DataError, WeightsError,
    SelectionError, NotApplicable, DeltaError, TrainingDiverged ... derive from it), OSError
    (missing, existing or unreadable files) and safetensors' own error (e.g. a full disk while
    writing). Anything else, a bare ValueError included, is a bug: it keeps its traceback.
    """
    return isinstance(err, (SparseftError, OSError, SafetensorError))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """Warnings about the user's data as one line (no source file or code line of sparseft's)."""

    if issubclass(category, (DataWarning, TrainingWarning)):
        print(f"warning: {_one_line(str(message))}", file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def _one_line(err: BaseException | str) -> str:
    text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _exit_status(exit_: SystemExit) -> int:
    """SystemExit(None | int | message): a message is a user error (sub-commands raise those too)."""
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    print(f"error: {_one_line(exit_.code)}", file=sys.stderr)
    return 1


def _stdout_closed() -> int:
    """The reader of stdout went away (`| head`): exit quietly, as Python's documentation advises ("Note on
    SIGPIPE", the signal module): stdout goes to /dev/null, so that the flush at exit finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file descriptor (captured): nothing is flushed at exit
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error argparse has reported (2)
        return _exit_status(exit_)
    warnings.showwarning = _show_warning
    joined = False
    try:
        joined = distributed.init_from_env()  # under torchrun: join the other processes
        if distributed.active() and args.command not in ("train", "select"):
            raise UsageError(f"sparseft {args.command} runs in one process; under torchrun only train and select "
                             "run (launch it without torchrun)")
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in the flush at exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        resumable = args.command == "train" and (Path(args.out) / "config.json").exists()
        again = args.command in ("bench", "reproduce")
        hint = "; resume with --resume" if resumable else "; run it again to resume" if again else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except UsageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return _exit_status(exit_)
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if joined:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
