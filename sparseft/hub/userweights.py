"""Your own checkpoint onto a timm architecture (`sparseft weights convert`), verified, with its data config.

    result = convert_checkpoint("efficientnet-lite2.pth", "tf_efficientnet_lite2", check_image="cat.jpg")
    save_converted(result, "lite2.safetensors")     # then: --model tf_efficientnet_lite2 --weights lite2.safetensors

The source's tensors are matched to the architecture's by name first (as they are, without a
common prefix such as `module.` or `model.`, or through timm's own `checkpoint_filter_fn` for
that architecture), else by position and shape (`map_by_order`, as the offline backbones are
converted). Either way every source tensor must be used, every target tensor filled (BatchNorm
counters aside) and every shape equal. The class count of the head follows the source (none:
a backbone without head). The data config comes from the file when it holds one, else from the
caller, else from timm's pretrained config of the architecture; caller values override the file's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.errors import InputError
from sparseft.fileutil import atomic_path, check_output_file, sha256_file
from sparseft.hub.build import DATA_KEYS, checkpoint_filter, file_data_config, resolve_config
from sparseft.hub.convert import map_by_order
from sparseft.hub.registry import REGISTRY
from sparseft.hub.verify import check_image
from sparseft.weights import RECORD_KEY, Checkpoint, WeightsError, read_checkpoint

PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.", "net.", "base_model.")
"""Prefixes stripped when every source name has one (DataParallel, Lightning, torch.compile, ...)."""
_COUNTER = "num_batches_tracked"
#: sparseft's own files that hold no full weights, by their metadata's format (refused naming what they are)
NOT_WEIGHTS = {
    "sparseft.delta/": "a sparseft task file (a task's changes to its base model, not a checkpoint of full weights); "
                       "predict, eval and sparseft.load take it as it is, and `sparseft merge {src} --out FILE` "
                       "writes the fine-tuned model's full weights",
    "sparseft.selection/": "a sparseft selection file (which entries a task trains; it holds no weights)",
}
_SHOW = 5


@dataclass
class Conversion:
    """A verified conversion: the state dict in the architecture's names and what was decided."""

    state: dict[str, torch.Tensor]
    architecture: str
    num_classes: int
    mapping: str
    data_config: dict[str, Any]
    config_from: dict[str, str]
    source: dict[str, Any]
    filled_counters: int = 0
    check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What the output file's metadata records (`sparseft.weights.weights_record` reads it back)."""
        return {"architecture": self.architecture, "num_classes": self.num_classes, "mapping": self.mapping,
                "data_config": self.data_config, "data_config_from": self.config_from, "source": self.source,
                "tensors": len(self.state), "filled_bn_counters": self.filled_counters, "check": self.check}


# -- the architecture ---------------------------------------------------------------------------

def build_architecture(name: str) -> nn.Module:
    """The untrained timm architecture `name` (a pretrained tag such as `.a1_in1k` picks its data config)."""
    import timm

    if not isinstance(name, str) or not name or not timm.is_model(name):
        hint = (f"; it is an offline backbone: convert for its architecture {REGISTRY[name].architecture}"
                if name in REGISTRY else "; timm.list_models('*lite*') lists names")
        raise WeightsError(f"unknown model {name!r}: not a timm architecture{hint}")
    try:
        return timm.create_model(name, pretrained=False).eval()
    except RuntimeError as err:  # an unknown pretrained tag
        raise WeightsError(f"model {name!r}: {err}") from err


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _COUNTER


def _head_keys(model: nn.Module) -> tuple[list[str], list[str]]:
    """(all tensor names with the default head, the classifier's own names), in registration order."""
    full = list(model.state_dict())
    model.reset_classifier(0)
    headless = set(model.state_dict())
    return full, [k for k in full if k not in headless]


def _classes_in(head: list[str], shapes: Mapping[str, Sequence[int]]) -> int:
    """The class count a source gives the head: rows of its classifier weight, 0 when it has none."""
    weight = next((k for k in head if k in shapes and len(shapes[k]) >= 2), None)
    return int(shapes[weight][0]) if weight is not None else 0


# -- matching -----------------------------------------------------------------------------------

def _renamings(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(prefix stripped, names) candidates: as they are, known prefixes off, the longest common prefix off."""
    out = [("", keys)]
    stripped, current = "", keys
    while (prefix := next((p for p in PREFIXES if all(k.startswith(p) for k in current)), None)) is not None:
        stripped += prefix
        current = [k[len(prefix):] for k in current]
        out.append((stripped, current))
    common = os.path.commonprefix(keys)
    common = common[:common.rfind(".") + 1]
    if common and common not in [s for s, _ in out]:
        out.append((common, [k[len(common):] for k in keys]))
    return out


@dataclass
class _Attempt:
    how: str
    state: dict[str, torch.Tensor] | None = None
    problem: str = ""
    overlap: float = 0.0


def _fill_counters(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` in the target's order, BatchNorm counters the source lacks set to 0."""
    return {k: state[k] if k in state else torch.zeros((), dtype=torch.long) for k in target
            if k in state or _is_counter(k)}


def _compare(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], arch: str) -> str:
    """'' when `state` fills `target` exactly (counters aside), else what differs, first offenders named."""
    src = [k for k in state if not _is_counter(k) or k in target]
    left = [k for k in src if k not in target]
    missing = [k for k in target if k not in state and not _is_counter(k)]
    wrong = [f"{k} {list(state[k].shape)} vs {list(target[k].shape)}" for k in src
             if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    parts = []
    if left:
        parts.append(f"{len(left)} tensor(s) left over, with no place in {arch}: {_names(left)}")
    if missing:
        parts.append(f"{len(missing)} {arch} tensor(s) not filled: {_names(missing)}")
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of another shape than {arch}'s: {_names(wrong)}")
    return "; ".join(parts)


def _values(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for k, v in state.items() if not _is_counter(k))


def _names(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _by_name(tensors: dict[str, torch.Tensor], model: nn.Module, arch: str, head: list[str]) -> _Attempt:
    """Match names as they are or without a common prefix; the head's class count follows the source."""
    best = _Attempt("by name", overlap=-1.0)
    for prefix, names in _renamings(list(tensors)):
        renamed = dict(zip(names, tensors.values()))
        _reset(model, _classes_in(head, {k: v.shape for k, v in renamed.items()}))
        target = model.state_dict()
        how = f"by name, without the prefix '{prefix}'" if prefix else "by name"
        problem = _compare(renamed, target, arch)
        if not problem:
            return _Attempt(how, renamed)
        overlap = sum(k in target for k in renamed) / max(len(target), 1)
        if overlap > best.overlap:
            best = _Attempt(how, None, problem, overlap)
    return best


def _by_timm_filter(tensors: dict[str, torch.Tensor], model: nn.Module, arch: str, default: int,
                    head: list[str]) -> _Attempt | None:
    """timm's own converter for the architecture (original repositories' names), when it has one.

    Accepted only when it renames or reshapes without adding or dropping values (a filter that
    resamples a position embedding or drops tensors does not give a one-to-one conversion).
    """
    filter_fn = checkpoint_filter(model)
    if filter_fn is None:
        return None
    try:
        _reset(model, default)
        mapped = filter_fn(dict(tensors), model)
        _reset(model, _classes_in(head, {k: v.shape for k, v in mapped.items()}))
        mapped = filter_fn(dict(tensors), model)
    except Exception:  # noqa: BLE001 - a filter written for other checkpoints may fail any way
        return None
    if not isinstance(mapped, dict) or _values(mapped) != _values(tensors):
        return None
    if _compare(mapped, model.state_dict(), arch):
        return None
    return _Attempt("by timm's checkpoint_filter_fn for the architecture", mapped)


def _by_order(ckpt: Checkpoint, model: nn.Module, arch: str, default: int, full: list[str],
              head: list[str], what: str) -> _Attempt:
    """Position by position, shapes and kinds checked (`map_by_order`); the head's presence follows the count."""
    if not ckpt.ordered:
        return _Attempt("by order", problem="a safetensors file keeps its tensors sorted by name, not in the "
                                            "order they were saved, so they cannot be paired by position")
    src = [k for k in ckpt.tensors if not _is_counter(k)]
    with_head = [k for k in full if not _is_counter(k)]
    head_only = [k for k in head if not _is_counter(k)]
    if len(src) == len(with_head) - len(head_only):
        classes = 0
    elif len(src) == len(with_head):
        weight = next((k for k in head_only if k.endswith("weight")), None)
        classes = int(ckpt.tensors[src[with_head.index(weight)]].shape[0]) if weight else default
    else:
        return _Attempt("by order", problem=f"{len(src)} tensors (BN counters aside), {arch} has {len(with_head)} "
                                            f"with its classifier and {len(with_head) - len(head_only)} without")
    _reset(model, classes)
    try:
        return _Attempt("by order and shape", map_by_order(ckpt.tensors, model.state_dict(), what=what))
    except WeightsError as err:
        return _Attempt("by order", problem=str(err).removeprefix(f"{what}: "))


def _reset(model: nn.Module, classes: int) -> None:
    """Give `model` a head of `classes` outputs (0: none) unless it has one already."""
    if getattr(model, "num_classes", None) != classes:
        model.reset_classifier(classes)


def match_tensors(ckpt: Checkpoint, model: nn.Module, arch: str, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """(the source's tensors in `model`'s names, how they were matched); `model` gets the source's head.

    Raises `WeightsError` naming what is left over, missing or of another shape when neither
    names nor order give a one-to-one match.
    """
    default = int(getattr(model, "num_classes", 1000))
    full, head = _head_keys(model)
    named = _by_name(ckpt.tensors, model, arch, head)
    if named.state is not None:
        return named.state, named.how
    filtered = _by_timm_filter(ckpt.tensors, model, arch, default, head)
    if filtered is not None:
        return filtered.state, filtered.how  # type: ignore[return-value]
    ordered = _by_order(ckpt, model, arch, default, full, head, what)
    if ordered.state is not None:
        return ordered.state, ordered.how
    if named.overlap >= 0.5:  # the same naming, with a few differences: those are the news
        raise WeightsError(f"{what}: does not map one-to-one {named.how}: {named.problem}")
    raise WeightsError(f"{what}: does not map one-to-one: by name {round(named.overlap * 100)} % of {arch}'s "
                       f"names match ({named.problem}); by order: {ordered.problem}")


# -- the whole job ------------------------------------------------------------------------------

def convert_checkpoint(src: str | Path, model: str, *, data_config: Mapping[str, Any] | None = None,
                       check: str | Path | None = None, check_class: str | int | None = None,
                       log: Callable[[str], None] | None = None) -> Conversion:
    """Convert the weight file `src` onto timm architecture `model`, verified; nothing is written.

    `data_config`: keys of `DATA_KEYS` to record (override the file's). `check`: an image whose
    top-5 is reported; with `check_class` (an index or ImageNet name) its top-1 must be that class.
    Raises `WeightsError`/`InputError` with the culprit named.
    """
    say = log or (lambda msg: None)
    src = Path(src)
    if check_class is not None and check is None:
        raise InputError("--check-class goes with --check-image IMG")
    given = dict(data_config or {})
    unknown = sorted(set(given) - set(DATA_KEYS))
    if unknown:
        raise InputError(f"unknown data-config keys {unknown}; known: {', '.join(DATA_KEYS)}")
    net = build_architecture(model)
    ckpt = read_checkpoint(src)
    kind = next((what for fmt, what in NOT_WEIGHTS.items() if str(ckpt.meta.get("format", "")).startswith(fmt)), None)
    if kind is not None:
        raise WeightsError(f"{src}: {kind.format(src=src)}")
    bad = [k for k, v in ckpt.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{src}: {len(bad)} tensor(s) hold NaN or infinite values: {_names(bad)}")
    state, how = match_tensors(ckpt, net, model, str(src))
    target = net.state_dict()
    state = _fill_counters(state, target)
    filled = max(0, sum(map(_is_counter, target)) - sum(map(_is_counter, ckpt.tensors)))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # match_tensors compared names and shapes: this is a bug, not the file
        raise RuntimeError(f"{src}: matched tensors did not load into {model}") from err
    classes = int(getattr(net, "num_classes", 0))
    from_file, where = file_data_config(src, ckpt)
    config, origin, notes = resolve_config(net, model, from_file, where, given)
    say(f"{src}: {len(ckpt.tensors)} tensors matched {how} onto {model} "
        f"({'no head' if classes == 0 else f'{classes}-class head'}"
        f"{f', {filled} BN counters set to 0' if filled else ''})")
    for note in notes:
        say(f"note: {note}")
    checked = check_image(net, check, config, check_class) if check is not None else None
    if checked is not None:
        tops = ", ".join(f"{i} {n} {p:.3f}" for i, n, p in checked.get("top5", []))
        say(f"check image {checked['image']}: " + (f"top-5 {tops}" if tops else f"features {checked['features']}"))
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    source = {"file": src.name, "sha256": sha256_file(src), "bytes": src.stat().st_size,
              "nested_under": list(ckpt.nested)}
    return Conversion(state, model, classes, how, config, origin, source, filled, checked, notes)


def check_output(out: str | Path, src: str | Path | None = None, overwrite: bool = False) -> Path:
    """The `.safetensors` path to write, checked before any work (`fileutil.check_output_file`): not a folder,
    a `.safetensors` file (the format --weights reads without unpickling), not the source, not replaced unasked."""
    path = check_output_file(out, overwrite=overwrite, source=src, source_is="source file", label="--out",
                             what=".safetensors file")
    if path.suffix != ".safetensors":
        raise InputError(f"--out {out}: must end in .safetensors (the format --weights reads without unpickling)")
    return path


def save_converted(result: Conversion, out: str | Path) -> Path:
    """Write the converted weights as safetensors (atomically), the record in the file's metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in result.data_config.items()}
    record = json.dumps({**result.record(), "data_config": config}, sort_keys=True)
    with atomic_path(out) as tmp:
        save_file(result.state, str(tmp), metadata={"format": "pt", RECORD_KEY: record})
    return out


def convert_file(src: str | Path, model: str, out: str | Path, *, overwrite: bool = False,
                 **options: Any) -> Conversion:
    """`convert_checkpoint` then `save_converted`; `out` is checked before any work."""
    path = check_output(out, src, overwrite)
    result = convert_checkpoint(src, model, **options)
    save_converted(result, path)
    return result
