"""Hub-style task folders: a task file, a small config and a model card, as peft and timm users know them.

    sparseft.save_pretrained(model_or_task_file, "pets-gps")        # task.safetensors, config.json, README.md
    model = sparseft.from_pretrained("pets-gps")                      # a local folder
    model = sparseft.from_pretrained("hf-hub:org/pets-gps")           # through huggingface_hub's cache
    sparseft.push_to_hub("runs/pets/delta.safetensors", "org/pets-gps")

`hf-hub:` ids go through `huggingface_hub.snapshot_download`: its cache (`HF_HUB_CACHE`), `HF_HUB_OFFLINE=1`
(the cache only), `revision` (a branch, tag or commit). The folder's `config.json` follows timm's hub config
(architecture, num_classes, label_names, pretrained_cfg with input size, mean/std, interpolation) with sparseft's
own fields beside; the model is what `sparseft.load` makes of the task file, so a folder for another base is
refused as a task file is (`BaseMismatch`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from sparseft import delta
from sparseft.api import describe_task, load, method_for
from sparseft.deltafile import (
    FOLDER_CONFIG_FILE,
    FOLDER_TASK_FILE,
    BaseMismatch,
    TaskFile,
    TaskSource,
    read_delta,
    read_task,
)
from sparseft.export.common import ExportError, atomic_folder, preprocessing_record, task_summary
from sparseft.fileutil import read_json
from sparseft.version import __version__

TASK_FILE = FOLDER_TASK_FILE  # (defined with the task file's reader, which tells such a folder from a task file)
CONFIG_FILE = FOLDER_CONFIG_FILE
CARD_FILE = "README.md"
FORMAT = "sparseft.task-folder/1"
HUB_PREFIX = "hf-hub:"
NOT_METRICS = ("epoch", "step", "lr", "epoch_time_s")  # a run's final line: bookkeeping, not results


def _run_summary(task_path: Path) -> dict[str, Any]:
    """The summary.json of the run folder a task file sits in (`sparseft train` writes both), else {}."""
    path = task_path.parent / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _data_config(task_path: Path) -> dict[str, Any] | None:
    """The data config (mean/std, interpolation) the run recorded in its config.json, if the task sits in one."""
    path = task_path.parent / "config.json"
    try:
        found = json.loads(path.read_text()).get("data_config") if path.is_file() else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


def folder_config(task: TaskFile, model: nn.Module | None = None) -> dict[str, Any]:
    """config.json of a task folder: timm's hub fields (architecture, num_classes, label_names, pretrained_cfg)
    and sparseft's (format, method, task kind, base fingerprint, trained values)."""
    extra = task.header.get("extra", {})
    facts = task_summary(extra)
    info = describe_task(task)
    if model is not None:
        pre = preprocessing_record(model, extra)
    else:
        cfg = _data_config(Path(task.path)) or {}
        size = extra.get("img_size") or (cfg.get("input_size") or [None])[-1]
        pre = {"recipe": extra.get("preprocessing", "vtab"), "input_size": [3, size, size] if size else None,
               **{k: cfg[k] for k in ("interpolation", "mean", "std", "crop_pct") if k in cfg}}
    trained = info.get("sparse_entries", 0) + info.get("full_values", 0) + info.get("added_values", 0)
    return {"library_name": "sparseft", "format": FORMAT, "sparseft_version": __version__, "task_file": TASK_FILE,
            "architecture": facts["base_model"], "num_classes": facts["num_classes"],
            "label_names": facts["class_names"], "pretrained_cfg": pre,
            "method": info["method"], "task": facts["task"], "img_size": facts["img_size"],
            "base_fingerprint": task.header.get("fingerprint"), "trained_values": trained,
            "base_weights": extra.get("weights"), "pretrained": extra.get("pretrained")}


def model_card(config: dict[str, Any], summary: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """README.md of a task folder or run: the Hub's metadata header, what the task is, its metrics, how to load it."""
    summary = summary or {}
    final = {k: v for k, v in (summary.get("final") or {}).items() if isinstance(v, (int, float))
             and not isinstance(v, bool) and k not in NOT_METRICS}
    kind = "image-segmentation" if config.get("task") == "segmentation" else "image-classification"
    head = ["---", "library_name: sparseft", f"base_model: {config.get('architecture')}", "tags:",
            *[f"- {t}" for t in ("sparseft", config.get("method") or "gps", kind)]]
    if final:
        data = json.dumps(str(summary.get("data") or "unknown"))
        head += ["model-index:", f"- name: {repo_id or config.get('method')}", "  results:", "  - task:",
                 f"      type: {kind}", "    dataset:", f"      name: {data}", f"      type: {data}", "    metrics:",
                 *[f"    - type: {k}\n      value: {v:.6g}" for k, v in sorted(final.items())]]
    head.append("---")
    params = summary.get("params") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(final.items())) or "| (no run metrics recorded) | |"
    where = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    classes = config.get("label_names") or []
    shown = ", ".join(map(str, classes[:8])) + ("…" if len(classes) > 8 else "")
    backbone = (f" ({params['backbone_percent']:.3f} % of the backbone)" if "backbone_percent" in params else "")
    return "\n".join(head) + f"""

# {config.get('method')} task on {config.get('architecture')}

A [sparseft](https://pypi.org/project/sparseft/) task: the `{config.get('method')}` method fine-tuned
`{config.get('architecture')}` for {config.get('task')} with {config.get('num_classes')} classes ({shown})
at {config.get('img_size') or 'its default'} px. It trains {config.get('trained_values', 0):,} values{backbone};
`{TASK_FILE}` holds only those, and the base model is rebuilt from its name and weights.

| metric | value |
| --- | --- |
{rows}

```python
import sparseft

model = sparseft.from_pretrained("{where}")   # the base model with the task applied
sparseft.merge(model)                          # mergeable methods: a plain model, no extra cost
```

Preprocessing: {json.dumps(config.get('pretrained_cfg'))}.
"""


def save_pretrained(source: nn.Module | TaskSource, folder: str | Path, *, overwrite: bool = False,
                    summary: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
    """Write a Hub-style task folder: `task.safetensors`, `config.json`, `README.md`; returns the folder.

    `source`: a model with a task (saved with its method, record kept) or a task file. `summary`: the run's
    summary for the card (default: the summary.json beside a task file that `sparseft train` wrote).
    """
    with atomic_folder(folder, overwrite) as tmp:
        model = None
        if isinstance(source, nn.Module):
            if not delta.is_applied(source) or delta.is_merged(source):
                raise ExportError("save_pretrained needs a model with an unmerged task (sparseft.load, or a method's "
                                  "prepare), or a task file")
            method_for(source).save(source, tmp / TASK_FILE, extra=delta.task_record(source))
            model, task = source, read_delta(tmp / TASK_FILE)
        else:
            task = read_task(source)
            if task.merged:
                raise ExportError(f"{task.path}: a merged model; a task folder holds the task file it came from")
            shutil.copyfile(task.path, tmp / TASK_FILE)
            summary = summary if summary is not None else _run_summary(Path(task.path))
        config = folder_config(task, model)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(config, summary, repo_id))
    return Path(folder)


def resolve(source: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a task folder or an `hf-hub:org/name` id (downloaded or found in huggingface_hub's
    cache; `HF_HUB_OFFLINE=1` uses only the cache)."""
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        if revision is not None:
            raise ExportError(f"{source}: revision= applies to hf-hub: ids")
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo = text.removeprefix(HUB_PREFIX)
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[TASK_FILE, CONFIG_FILE, CARD_FILE]))
    except LocalEntryNotFoundError as err:
        raise ExportError(f"{text}: not in the huggingface_hub cache and cannot be downloaded (offline: "
                          f"HF_HUB_OFFLINE or no network): {str(err).splitlines()[0]}") from None
    except HFValidationError as err:
        raise ExportError(f"{text}: not a Hub repository id: {str(err).splitlines()[0]}") from None


def from_pretrained(source: str | Path, model: nn.Module | None = None, *, weights: str | Path | None = None,
                    revision: str | None = None, cache_dir: str | Path | None = None) -> nn.Module:
    """The model of a task folder (a path or `hf-hub:org/name`): its base with the task applied, as
    `sparseft.load` gives it (`model`: a base you built; one for another base is refused)."""
    folder = resolve(source, revision=revision, cache_dir=cache_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(f"{source}: no {CONFIG_FILE}: not a sparseft task folder (sparseft.save_pretrained "
                          "writes one)")
    config = read_json(folder / CONFIG_FILE, ExportError, "task folder config")
    if config.get("format") != FORMAT:
        raise ExportError(f"{source}: {CONFIG_FILE} is not a sparseft task folder's ({config.get('format')!r})")
    try:
        return load(folder / config.get("task_file", TASK_FILE), model, weights=weights)
    except BaseMismatch as err:  # said of the folder, with the way to its own base
        raise BaseMismatch(source, err.task, err.base, f"; sparseft.from_pretrained({str(source)!r}) without a model "
                           "builds the base it was trained on", subject=f"{source}: this task folder") from None


def push_to_hub(source: nn.Module | TaskSource, repo_id: str, *, private: bool | None = None,
                token: str | None = None, commit_message: str = "sparseft task", revision: str | None = None) -> str:
    """Write the task folder and upload it to the Hub repository `repo_id` (created if missing); returns the
    commit's URL. Needs network and a token (`huggingface-cli login` or `token=`)."""
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(source, Path(tmp) / "task", repo_id=repo_id)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision)
    return str(getattr(info, "commit_url", info))
