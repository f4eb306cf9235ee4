"""Delta files: one small `.safetensors` file per task.

Contents: for every selected parameter its indices (int32 where they fit) and delta values; the
parameters trained in full (biases, layer-scale, head); buffers that training changed (BatchNorm
statistics); and a JSON header with the method, the selection's settings, a fingerprint of the
base model, a manifest of every tensor (name, dtype, shape) and a sha256 of all tensor bytes.

`load_delta` checks all of that before it touches the model: a delta made for another base, a
truncated or corrupt file, a missing or extra tensor, or shapes that do not fit are refused with
an error that names the file and the problem, and the model is left as it was. Nothing is ever
unpickled.

A merged model file (`save_merged`, `sparseft merge --out`) is a plain state dict (the keys of
`model.state_dict()`) whose metadata carries the task's record in a header of the same kind:
model name, image size, classes, preprocessing, method, base fingerprint, manifest and checksums.
`read_delta` reads and verifies both kinds (`TaskFile.merged` tells them apart).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparseft.anatomy import built_as, fingerprint, head_parameter_names
from sparseft.delta import (
    DeltaError,
    abandon,
    apply,
    buffers_by_name,
    export_task,
    import_task,
    is_applied,
    mark_added,
    merged_task,
    params_by_name,
    set_task_record,
)
from sparseft.delta import merge as merge_model
from sparseft.errors import InputError
from sparseft.fileutil import atomic_path, check_output_file, read_tagged_safetensors, tensor_bytes
from sparseft.selected import Selection
from sparseft.version import __version__

FORMAT = "sparseft.delta/1"
#: a merged model: full weights (a plain state dict) and the task's header
MERGED_FORMAT = "sparseft.merged/1"


class DeltaFileError(InputError):
    """A delta file that cannot be applied to the given model."""


class BaseMismatch(DeltaFileError):
    """A task file made for another base than the model given; the message names what differs
    (model name, image size, class count) where the header says it."""

    def __init__(self, path: str | Path, task: str, base: str, hint: str, *, subject: str | None = None,
                 whose: str = "this model") -> None:
        self.path, self.task, self.base, self.hint = path, task, base, hint
        super().__init__(f"{subject or f'{path}: this task'} is for {task}; {whose} is {base}{hint}")

    def reworded(self, subject: str, whose: str) -> BaseMismatch:
        """The same mismatch said of another subject and base (a TaskBank names the task and "this bank's base")."""
        return BaseMismatch(self.path, self.task, self.base, self.hint, subject=subject, whose=whose)


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _header_hash(header: dict[str, Any]) -> str:
    """sha256 of the header itself (its own hash field left out): a changed fingerprint, shape or
    structure is caught like a changed tensor."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _manifest(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in sorted(tensors.items())}


def save_delta(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's task delta to `path` atomically; returns the path (checked first: `check_output_file`)."""
    check_output_file(path, what="task file")
    if not is_applied(model):
        raise DeltaFileError("model has no sparseft deltas to save (apply() or load_delta() first)")
    fields, tensors = export_task(model)
    header = {
        "format": FORMAT,
        "sparseft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "manifest": _manifest(tensors),
        "checksum": _tensor_checksum(tensors),
        "extra": extra or {},
    }
    header["header_sha256"] = _header_hash(header)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "header": json.dumps(header)})
    return Path(path)


def save_merged(model: nn.Module, path: str | Path, source: str | Path | None = None) -> Path:
    """Write a merged task (`sparseft.merge` of a loaded task file) atomically as a plain state dict
    whose metadata holds the task's header (model, image size, classes, preprocessing, method, base
    fingerprint; `source`: the task file it came from); returns the path.

    `model.load_state_dict(safetensors.torch.load_file(path))` loads it into its architecture;
    `sparseft.load`, `sparseft predict`, `eval` and `info` take it with no base model.
    """
    check_output_file(path, source=source, source_is="task file it was merged from", what="merged model file")
    task = merged_task(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {
        "format": MERGED_FORMAT,
        "sparseft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "merged_from": None if source is None else str(source),
        "method": task["record"].get("method") or task["method"],
        "fingerprint": task["fingerprint"],
        "head": task["head"],
        "manifest": _manifest(tensors),
        "checksum": _tensor_checksum(tensors),
        "extra": task["record"],
    }
    header["header_sha256"] = _header_hash(header)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": MERGED_FORMAT, "header": json.dumps(header)})
    return Path(path)


class TaskFile(tuple):
    """A task file read and verified once: `(header, tensors)` (it unpacks as that pair) and its `path`.

    `sparseft.load`, `Method.load`, `load_delta`, `TaskBank.add` and `evaluate_task` take one
    instead of a path, so a command that looks at the header first does not read the file again.
    """

    path: str | Path  # as the caller named it (messages quote it unchanged)

    def __new__(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor], path: str | Path) -> TaskFile:
        task = super().__new__(cls, (header, tensors))
        task.path = path
        return task

    @property
    def header(self) -> dict[str, Any]:
        return self[0]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self[1]

    @property
    def merged(self) -> bool:
        """Whether the file is a merged model (full weights, no base needed) rather than a task delta."""
        return self.header.get("format") == MERGED_FORMAT


#: what the loaders take: a path, or a file `read_delta` has already read and verified
TaskSource = str | Path | TaskFile


def read_task(source: TaskSource) -> TaskFile:
    """The verified task file: `source` itself when it was read already, else `read_delta(source)`."""
    return source if isinstance(source, TaskFile) else read_delta(source)


def source_path(source: TaskSource) -> str | Path:
    """The path a task source names (for messages)."""
    return source.path if isinstance(source, TaskFile) else source


#: a peft adapter folder's files and the prefix of its tensors' names (`sparseft.export.peft` writes them)
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
#: a Hub-style task folder's files (`sparseft.export.hub`)
FOLDER_TASK_FILE = "task.safetensors"
FOLDER_CONFIG_FILE = "config.json"


def _peft_adapter(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a safetensors file looks like a peft adapter: its file name, or peft's names for its tensors."""
    return path.name == PEFT_ADAPTER_FILE or bool(tensors) and all(k.startswith(PEFT_PREFIX) for k in tensors) or any(
        part in k for k in tensors for part in (".lora_A.", ".lora_B.", ".shira_indices", ".shira_weight"))


def _import_peft_hint(what: str, folder: Path, ours: bool) -> str:
    """The refusal of a peft adapter (`ours`: exported by sparseft, so its metadata names the base)."""
    base = "" if ours else " --model NAME --num-classes N"
    return (f"{what}, not a sparseft task file; `sparseft import-peft {folder} --out TASK.safetensors{base}` "
            "(sparseft.export.import_peft) turns it into one, or load it with peft's PeftModel.from_pretrained")


def _exported_by_sparseft(adapter: Path) -> bool:
    """Whether a peft adapter file carries sparseft's record of its base (`sparseft export --format peft`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(adapter), "pt") as f:
            return "sparseft" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: import-peft names the problem
        return False


def _untagged(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """What a safetensors file without sparseft's header is, for the refusal."""
    if _peft_adapter(path, tensors):
        return _import_peft_hint("a peft adapter", path.parent, "sparseft" in metadata)
    if "merged_from" in metadata:
        return (f"a merged model written by an earlier sparseft (merged from {metadata['merged_from']}), without the "
                "task's header (image size, classes, preprocessing); merge the task file again with this version, "
                "or load it with model.load_state_dict")
    count = f"{len(tensors)} tensor{'s' if len(tensors) != 1 else ''}"
    return (f"a plain safetensors file ({count}, no sparseft header), not a task file or a merged model; a "
            "state dict loads with model.load_state_dict(safetensors.torch.load_file(...)), or as base weights "
            "with --weights")


def read_delta(path: str | Path) -> TaskFile:
    """Read and verify a task file on its own (no model): a task delta, or a merged model
    (`TaskFile.merged`); returns a `TaskFile`, which unpacks as (header, tensors)."""
    given, path = path, Path(path)
    if path.is_dir() and (path / PEFT_CONFIG_FILE).is_file():
        ours = _exported_by_sparseft(path / PEFT_ADAPTER_FILE)
        raise DeltaFileError(f"{path}: {_import_peft_hint('a peft adapter folder', path, ours)}")
    if path.is_dir() and (path / FOLDER_CONFIG_FILE).is_file() and (path / FOLDER_TASK_FILE).is_file():
        raise DeltaFileError(f"{path}: a task folder (sparseft.save_pretrained), not a task file; give its "
                             f"{path / FOLDER_TASK_FILE}, or load it with sparseft.from_pretrained({str(path)!r})")
    header, tensors = read_tagged_safetensors(path, (FORMAT, MERGED_FORMAT), "header", DeltaFileError, "delta",
                                              untagged=_untagged)
    manifest = header.get("manifest", {})
    missing = sorted(set(manifest) - set(tensors))
    unexpected = sorted(set(tensors) - set(manifest))
    if missing:
        raise DeltaFileError(f"{path}: file is missing tensors listed in its manifest: {missing[:10]}")
    if unexpected:
        raise DeltaFileError(f"{path}: file holds tensors not in its manifest: {unexpected[:10]}")
    if _manifest(tensors) != manifest:
        bad = [n for n, t in _manifest(tensors).items() if manifest.get(n) != t]
        raise DeltaFileError(f"{path}: tensors differ from the manifest in dtype or shape: {bad[:10]}")
    if _tensor_checksum(tensors) != header.get("checksum"):
        raise DeltaFileError(f"{path}: tensor checksum mismatch: the file's contents are corrupt")
    if "header_sha256" not in header:  # every released version writes it
        raise DeltaFileError(f"{path}: header checksum missing: its metadata was edited or it was not written by "
                             "sparseft")
    if _header_hash(header) != header["header_sha256"]:
        raise DeltaFileError(f"{path}: header checksum mismatch: its metadata was changed or is corrupt")
    for key in ("fingerprint",) if header.get("format") == MERGED_FORMAT else ("fingerprint", "shapes", "full"):
        if key not in header:
            raise DeltaFileError(f"{path}: header lacks '{key}'")
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DeltaFileError(f"{path}: NaN or infinite values in {bad[:5]}")
    return TaskFile(header, tensors, given)


def _described(facts: dict[str, Any], classes: bool) -> str:
    text = str(facts["model"] or "an unnamed model") + (f" at {facts['img_size']} px" if facts["img_size"] else "")
    if classes:
        text += f" with {facts['num_classes']} classes" if facts["num_classes"] else " without a head (num_classes=0)"
    return text


def base_mismatch(path: str | Path, header: dict[str, Any], model: nn.Module, *,
                  classes: bool = True) -> BaseMismatch | None:
    """The refusal naming what differs between the base a task's header records and `model`: model name,
    image size and (with `classes`) class count; None where the header does not say or nothing it says
    differs (then the weights differ)."""
    extra = header.get("extra") or {}
    task = {key: extra.get(key) for key in ("model", "img_size", "num_classes")}
    base = built_as(model)
    differs = {k for k in task if task[k] is not None and base[k] is not None and task[k] != base[k]}
    # another architecture has its own head: its class count matters only where the model has no head
    count = classes and "num_classes" in differs and (not differs - {"num_classes"} or not base["num_classes"])
    if not differs - {"num_classes"} and not count:
        return None
    if header.get("format") == MERGED_FORMAT:
        return BaseMismatch(path, _described(task, count), _described(base, count), "; sparseft.load(path) without "
                            "a model builds its own", subject=f"{path}: this merged model")
    return BaseMismatch(path, _described(task, count), _described(base, count),
                        f"; sparseft.base_model({str(path)!r}) builds the base it was trained on")


def _plan(model: nn.Module, header: dict, tensors: dict[str, torch.Tensor], path: Path) -> Selection:
    """Check everything against the model and return the selection to apply."""
    params = params_by_name(model)
    buffers = buffers_by_name(model)
    shapes = {n: tuple(s) for n, s in header["shapes"].items()}
    indices = {}
    for name, shape in shapes.items():
        if name not in params:
            raise DeltaFileError(f"{path}: delta for parameter '{name}', which this model does not have")
        if tuple(params[name].shape) != shape:
            raise DeltaFileError(f"{path}: '{name}' has shape {shape} in the delta but "
                                 f"{tuple(params[name].shape)} in the model")
        if f"sparse/{name}/index" not in tensors:  # a weight whose selection is empty (e.g. GPS at net level)
            if f"sparse/{name}/values" in tensors:
                raise DeltaFileError(f"{path}: '{name}' has delta values but no indices")
            continue
        if f"sparse/{name}/values" not in tensors:
            raise DeltaFileError(f"{path}: '{name}' has indices but no delta values")
        index, values = tensors[f"sparse/{name}/index"], tensors[f"sparse/{name}/values"]
        if index.shape != values.shape:
            raise DeltaFileError(f"{path}: '{name}' has {index.numel()} indices but {values.numel()} values")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= params[name].numel()):
            raise DeltaFileError(f"{path}: '{name}' has indices outside its {params[name].numel()} entries")
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise DeltaFileError(f"{path}: '{name}' indices are not strictly increasing")
        indices[name] = index.to(torch.int64)
    for name in header["full"]:
        t = tensors.get(f"full/{name}")
        if t is None:
            raise DeltaFileError(f"{path}: no tensor for fully trained parameter '{name}'")
        if name not in params or params[name].shape != t.shape:
            raise DeltaFileError(f"{path}: fully trained parameter '{name}' {tuple(t.shape)} does not fit the model")
    for key, t in tensors.items():
        if key.startswith("buffer/"):
            name = key.removeprefix("buffer/")
            if name not in buffers or buffers[name].shape != t.shape:
                raise DeltaFileError(f"{path}: buffer '{name}' {tuple(t.shape)} does not fit the model")
    shapes = {n: s for n, s in shapes.items() if n in indices}
    return Selection(indices=indices, shapes=shapes, full=header["full"], meta=header.get("selection", {}))


def _rollback(model: nn.Module, remove: Callable[[nn.Module], None] | None) -> None:
    """Undo a half-finished load: the method's modules out first (`remove`), then the sparse part."""
    if remove is not None:
        remove(model)
    abandon(model)


def load_delta(model: nn.Module, path: TaskSource, *, check_base: bool = True, merge: bool = False,
               rebuild: Callable[[nn.Module, dict[str, Any]], list[str]] | None = None,
               remove: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Apply the task delta in `path` (a path or a `TaskFile`) to a plain base `model`, in place; returns it.

    The model stays trainable (an applied model) unless `merge=True`. With `check_base=False`
    the base fingerprint is not compared (for deliberate transfer to another base of the same
    architecture). Files with added modules need `rebuild(model, structure) -> names`, which
    re-creates the method's modules, and `remove(model)`, which takes them out again if the load
    fails (`sparseft.load` passes both).
    """
    if is_applied(model):
        raise DeltaError("model already has sparseft deltas; unmerge it before loading another delta")
    task = read_task(path)
    header, tensors = task
    path = Path(task.path)
    if task.merged:
        raise DeltaFileError(f"{path}: a merged model (full weights, no base needed), not a task delta to apply; "
                             "load it with sparseft.load(path)")
    head = header.get("head") or head_parameter_names(model)
    if check_base:
        params = params_by_name(model)
        missing_head = [n for n in head if n not in params]
        other_head = [n for n in head if n in params and f"full/{n}" in tensors
                      and tensors[f"full/{n}"].shape != params[n].shape]
        actual = None if missing_head else fingerprint(model, exclude=set(head))
        if missing_head or other_head or actual != header["fingerprint"]:
            mismatch = base_mismatch(path, header, model, classes=bool(missing_head or other_head))
            if mismatch is not None:
                raise mismatch
        if missing_head:
            extra = header.get("extra") or {}
            kind = f"a {extra['task']} task" if isinstance(extra.get("task"), str) else "a task"
            more = f", … ({len(missing_head)} tensors)" if len(missing_head) > 1 else ""
            raise DeltaFileError(f"{path}: {kind} whose head ({missing_head[0]}{more}) this model does not have: "
                                 f"it is not the base the task was trained on; sparseft.base_model({str(path)!r}) "
                                 "builds that base")
        if actual != header["fingerprint"]:
            dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
            hint = (f" (this model's weights are {'/'.join(sorted(dtypes))}, and the fingerprint covers the dtype: "
                    "load the task onto the base in the dtype it was trained in, then cast the model)"
                    if dtypes != {"float32"} else "")
            raise DeltaFileError(
                f"{path}: this delta was made for another base model (fingerprint {header['fingerprint'][:12]}…, "
                f"this model {actual[:12]}…); load the base weights it was trained from{hint}")
    selection = _plan(model, header, tensors, path)
    added = header.get("added", [])
    if added and rebuild is None:
        method = header.get("structure", {}).get("method", "?")
        raise DeltaFileError(f"{path}: holds modules of method {method!r}; load it with sparseft.load(path, "
                             "model), which re-creates them")
    head_module = None
    if header.get("head"):
        head_module = header["head"][0].rsplit(".", 1)[0]
    apply(model, selection, batchnorm=header.get("batchnorm", "update"), head=head_module,
          base_fingerprint=header["fingerprint"])  # the file's: later saves name the same base
    try:
        if added:
            structure = header.get("structure", {})
            names = rebuild(model, structure)
            mark_added(model, list(names), structure)
            have = params_by_name(model)
            wrong = [n for n in added if n not in have or have[n].shape != tensors[f"added/{n}"].shape]
            if wrong or sorted(names) != sorted(added):
                raise DeltaFileError(f"{path}: the rebuilt modules do not match the file's tensors {wrong[:5]}")
        import_task(model, tensors)
        set_task_record(model, header.get("extra", {}))
    except Exception:
        _rollback(model, remove)
        raise
    if merge:
        merge_model(model)
    return model
