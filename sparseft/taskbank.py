"""Many tasks on one base model: switch between task files in place, in milliseconds.

    bank = sparseft.TaskBank(sparseft.base_model("runs/pets/delta.safetensors"))  # the base the tasks were trained on
    bank.add("pets", "runs/pets/delta.safetensors")
    bank.add("flowers", "runs/flowers/delta.safetensors")
    bank.use("pets")                             # the model is now the pets model (merged)
    with bank.use("flowers"):                    # ... the flowers model inside the block
        logits = model(x)
    bank.use(None)                               # the base again, bit-exactly
    outputs = bank.predict(images, ["pets", "flowers", "pets"])  # one batch, mixed tasks

Each task is read once: loaded onto the model, merged, and what the merge changed is kept
(flat indices, as int32, and values of the entries a sparse task changed; whole tensors for
parameters trained in full, folded modules and BatchNorm statistics), then the model is unmerged.
Switching *exchanges* those values with the model's own: the task's values go into the model's
weight tensors and the values they replace (the base's) take their place in the bank, so the bank
never holds a second copy of what the model holds, and switching back exchanges them again
(bit-exact both ways). No weight tensor is re-allocated, so a `torch.compile`d model does not
recompile. A head with another number of classes than the base's is swapped as a tensor (one
recompilation per shape).

The base is the model the tasks were trained on: `sparseft.base_model(task_file)` builds it from a
task file's header (model name, image size, weights, and a head; tasks of another class count swap
theirs in). A task made for another base is refused, naming what differs (model name, image size).

The bank trusts nothing between switches: a switch (and `add`, `remove`, `predict`) first checks
that no tensor of the model was written since the bank's last write (each tensor's autograd version
counter, and that no buffer was replaced: microseconds). An optimizer step, `load_state_dict` or a
forward in train mode that updates BatchNorm statistics while a task (or the base) is active would
otherwise leave a mix of the trained weights and the base behind the next switch; the switch is
refused instead, naming the tensors, and the model is left as it is (nothing is restored: the bank
keeps only what its tasks change). Writes that bypass the version counter are not seen: in-place
edits through `.data` and fused optimizers (`fused=True`).

Methods whose task merges into the weights are served: gps, bitfit, linear, full, lora,
spt-lora, ssf. Memory: the base + what each task changes; a sparse task (GPS, BitFit) holds its
file's tensors (`memory()`: bytes held against the files' sizes), while a merged LoRA or SSF task
changes its target weights whole. Methods that
add modules which cannot be merged (adapter, vpt-*, sct, spt-adapter) are refused: load those
one at a time with `sparseft.load`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft import delta
from sparseft.anatomy import built_as
from sparseft.api import load, method_for, method_named_in
from sparseft.deltafile import BaseMismatch, TaskSource, read_task
from sparseft.errors import InputError
from sparseft.inference import eval_mode
from sparseft.methods import METHODS
from sparseft.mixed import NotServed, mixed_forward
from sparseft.sparse_layers import write_flat


@dataclass
class _Change:
    """One tensor a task changes: `value` at the flat `index` (int32; None: the whole tensor).

    `value` holds the task's values while the task is inactive and, while it is active, the values the
    task displaced from the model (the base's): a switch exchanges them, so nothing is kept twice.
    """

    index: torch.Tensor | None
    value: torch.Tensor
    # another shape than the base's (a head): the tensor objects are exchanged, not their contents
    swap: bool = False


class _Active:
    """What `TaskBank.use` returns: the switch is done; as a context manager it switches back on exit."""

    def __init__(self, bank: TaskBank, previous: str | None) -> None:
        self.bank, self.previous = bank, previous

    def __enter__(self) -> nn.Module:
        return self.bank.model

    def __exit__(self, *exc: object) -> None:
        self.bank._switch(self.previous if self.previous in self.bank else None)  # it may have been removed


class UnknownTask(InputError, KeyError):
    """A task name the bank does not hold; a KeyError too (a missing key of a mapping, as it always was)."""

    __str__ = InputError.__str__  # the message as it is (KeyError's own quotes it)


class TaskBank:
    """One base model, many task files; `use(name)` makes a task active in place, `use(None)` the base."""

    def __init__(self, model: nn.Module) -> None:
        if delta.is_applied(model):
            raise delta.DeltaError("TaskBank needs the plain base model; this one carries a task (unmerge it)")
        self.model = model
        self.active: str | None = None
        self._tasks: dict[str, dict[str, _Change]] = {}
        self._headers: dict[str, dict[str, Any]] = {}
        self._file_bytes: dict[str, int] = {}  # each task's file size (its tensors' bytes when not a file)
        # where each parameter and buffer lives: `.to()`/`.cuda()` replace buffers (and may replace parameters)
        self._slots: dict[str, tuple[dict[str, Any], str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is not None:
                        self._slots.setdefault(f"{prefix}.{key}" if prefix else key, (table, key))
        self._buffer_names = {n for n, _ in model.named_buffers(remove_duplicate=False)}
        self._sealed: list[tuple[torch.Tensor, int]] = []
        self._seal()
        self._one_forward_checked: dict[str, str | None] = {}  # task -> None (served) or why not
        #: tasks `predict` ran grouped although one forward was asked for, and why
        self.one_forward_refused: dict[str, str] = {}

    # -- tasks ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The names of the tasks in the bank, in the order they were added."""
        return list(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def header(self, name: str) -> dict[str, Any]:
        """The `extra` record of a task's file (class names, image size, preprocessing, method...)."""
        self._require(name)
        return self._headers[name]

    def add(self, name: str, path: TaskSource) -> None:
        """Read a task file into the bank (refused: a name in use, a file for another base, a method that
        cannot merge). The active task stays active."""
        if not isinstance(name, str) or not name:
            raise InputError(f"a task name must be a non-empty string, got {name!r}")
        if name in self._tasks:
            raise InputError(f"task {name!r} is already in the bank; remove it first or choose another name")
        task = read_task(path)  # read and verified once: the load below takes it as it is
        header, tensors = task
        path = task.path
        if task.merged:
            raise InputError(f"{path}: a merged model (full weights), not a task a TaskBank can switch to; add the "
                             f"task file it was merged from ({header.get('merged_from') or 'its delta.safetensors'})")
        method = method_named_in(header)
        if method in METHODS and not METHODS[method].mergeable:
            raise delta.DeltaError(
                f"{path}: a {method} task adds modules that cannot be merged into the base weights, so a TaskBank "
                f"cannot switch to it; it serves {', '.join(m for m, c in sorted(METHODS.items()) if c.mergeable)} "
                "tasks (load this one alone with sparseft.load)")
        self._check_untouched(f"add task {name!r}")
        previous = self.active
        self._switch(None)
        try:
            with _heads_shaped_as(self.model, header, tensors) as originals:
                try:
                    model = load(task, model=self.model)
                except BaseMismatch as err:
                    raise err.reworded(f"task {name!r} ({path})", "this bank's base") from None
                owner = method_for(model)
                owner.merge(model)
                changes = {n: self._keep(n, idx, n in originals)
                           for n, (idx, _) in delta.merged_changes(model).items()}
                owner.unmerge(model)
        finally:
            self._seal()  # the load, merge and unmerge above were the bank's own writes
            self._switch(previous)
        self._tasks[name] = changes
        self._headers[name] = dict(header.get("extra", {}))
        self._file_bytes[name] = _file_size(path, tensors)

    def remove(self, name: str) -> None:
        """Take a task out of the bank (the base is restored first if it is active)."""
        self._require(name)
        if self.active == name:
            self._switch(None)
        del self._tasks[name], self._headers[name], self._file_bytes[name]
        self._one_forward_checked.pop(name, None)
        self.one_forward_refused.pop(name, None)

    def nbytes(self) -> int:
        """Memory the bank holds besides the model: the storage bytes of every task's indices and values
        (each storage once; the model's own tensors are not counted)."""
        storages: dict[tuple[str, int], int] = {}
        for changes in self._tasks.values():
            for c in changes.values():
                for t in (c.index, c.value):
                    if t is not None:
                        st = t.untyped_storage()
                        storages[(str(t.device), st.data_ptr())] = st.nbytes()
        return sum(storages.values())

    def memory(self) -> dict[str, float]:
        """`held`: bytes the bank holds besides the model (`nbytes`); `files`: the sizes of the task files it
        holds; `ratio`: held / files (a sparse task holds its file's tensors: at most about 1.0)."""
        held, files = self.nbytes(), sum(self._file_bytes.values())
        return {"held": held, "files": files, "ratio": held / files if files else 0.0}

    # -- switching -----------------------------------------------------------------------
    def use(self, name: str | None) -> _Active:
        """Make task `name` active (None: the base); also a context manager that switches back on exit."""
        if name is not None:
            self._require(name)
        previous = self.active
        self._switch(name)
        return _Active(self, previous)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, tasks: Sequence[str | None], mode: str = "grouped") -> list[torch.Tensor]:
        """Outputs for a batch whose items name different tasks (None: the base).

        Returns one output row per image, in input order (tasks may differ in their number of classes).
        `mode`: "grouped" (the default) runs the model once per task on its items, each task switched in;
        "one-forward" runs the base once on the whole batch and corrects each task's items layer by layer
        (`sparseft.mixed`; outputs equal to float rounding). Measured on a CPU (docs/performance.md), one
        forward costs 1.07-1.14× a base forward at 224 px and wins once a batch holds about one image per
        task (64 tasks: 1.11-1.14× against grouping's 1.32-1.37×); at 28 px it wins from 4 tasks per batch
        (16 tasks: 1.9-2.1× against 6.1-6.3×). A task's first one-forward use is checked against its own
        forward on one image; a model or task one forward cannot serve runs grouped (`one_forward_refused`
        says why). The model runs in eval mode; the active task and every module's mode are restored after.
        """
        self._check_images(images)
        if isinstance(tasks, str):
            raise InputError(f"predict: tasks must name one task per image, got the string {tasks!r} (for one task "
                             f"for every image: [{tasks!r}] * len(images))")
        if len(tasks) != len(images):
            raise InputError(f"predict: {len(images)} images but {len(tasks)} task names")
        if mode not in ("grouped", "one-forward"):
            raise InputError(f"predict: mode must be 'grouped' or 'one-forward', got {mode!r}")
        for task in dict.fromkeys(tasks):
            if task is not None:
                self._require(task)
        previous = self.active
        with eval_mode(self.model):  # every module's own train/eval mode back afterwards
            try:
                if mode == "one-forward" and self._one_forward_serves(images, tasks):
                    self._switch(None)
                    return mixed_forward(self.model, images, tasks, self._tasks)
                return self._grouped(images, tasks)
            finally:
                self._switch(previous)

    def _grouped(self, images: torch.Tensor, tasks: Sequence[str | None]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(tasks)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            self._switch(task)
            for i, row in zip(rows, self.model(images[rows])):
                out[i] = row
        return out  # type: ignore[return-value]

    def _one_forward_serves(self, images: torch.Tensor, tasks: Sequence[str | None]) -> bool:
        """Whether every task of the batch passed (now, or at its first use) the one-forward check: its item
        beside a base item in one forward equals its own forward and the base's (to float rounding)."""
        for task in dict.fromkeys(t for t in tasks if t is not None):
            for name, c in self._tasks[task].items():
                self._follow(c, self._tensor(name))
            if task not in self._one_forward_checked:
                first = tasks.index(task)
                probe, names = images[[first, first]], [task, None]
                self._switch(None)
                try:
                    got = mixed_forward(self.model, probe, names, self._tasks)
                    want = self._grouped(probe, names)
                    same = all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
                               for a, b in zip(got, want))
                    reason = None if same else "its one-forward outputs differ from its own forward's"
                except NotServed as err:
                    reason = str(err)
                self._one_forward_checked[task] = reason
            if self._one_forward_checked[task] is not None:
                self.one_forward_refused[task] = self._one_forward_checked[task]
                return False
        return True

    # -- internals -----------------------------------------------------------------------
    def _require(self, name: str) -> None:
        if name not in self._tasks:
            raise UnknownTask(f"no task {name!r} in the bank (it holds {', '.join(map(repr, self._tasks)) or 'none'})")

    def _check_images(self, images: Any) -> None:
        """Refuse a batch the base cannot take, naming the shape it takes: not a tensor, not [N, C, H, W] (one image
        [C, H, W] among them), other channels than its first convolution's, another size than a ViT built for a
        fixed size takes (timm's `strict_img_size`), or for one built with `dynamic_img_size` a size that is no
        multiple of its patch. A CNN takes other sizes (its tasks were trained at one)."""
        first = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else None
        size = built_as(self.model)["img_size"]
        embed = next((m for m in self.model.modules() if hasattr(m, "patch_size") and hasattr(m, "img_size")), None)
        fixed = size is not None and embed is not None and bool(getattr(embed, "strict_img_size", False))
        patch = getattr(embed, "patch_size", None) if embed is not None and not fixed else None
        patch = patch if isinstance(patch, (tuple, list)) and not getattr(embed, "dynamic_img_pad", False) else None
        side = str(size) if size is not None else "H"
        want = f"a [N, {channels or 'C'}, {side}, {side if size is not None else 'W'}] batch for this bank's base"
        if patch is not None:
            want += f" (or another size that is a multiple of its patch, {patch[0]}x{patch[-1]} px)"
        if not isinstance(images, torch.Tensor):
            raise InputError(f"predict: images must be a tensor, {want}, got a {type(images).__name__}")
        shape = list(images.shape)
        if images.dim() == 3:
            raise InputError(f"predict: images must be {want}, got one image {shape}: images.unsqueeze(0) makes it "
                             "a batch of one")
        if (images.dim() != 4 or (channels is not None and shape[1] != channels)
                or (fixed and shape[2:] != [size, size])
                or (patch is not None and (shape[2] % patch[0] or shape[3] % patch[-1]))):
            raise InputError(f"predict: images must be {want}, got {shape}")

    def _keep(self, name: str, index: torch.Tensor | None, reshaped: bool) -> _Change:
        """The merged model's values of one changed tensor (`reshaped`: a head of another shape than the
        base's, swapped as a tensor)."""
        current = self._tensor(name).detach()
        if index is not None:
            flat = current.reshape(-1).index_select(0, index.long())
            return _Change(index.to(torch.int32 if current.numel() < 2**31 else torch.int64), flat)
        return _Change(None, current.clone(), swap=reshaped)

    def _seal(self) -> None:
        """Note each tensor of the model and its version counter: what the bank wrote last."""
        self._sealed = [(t := table[key], t._version) for table, key in self._slots.values()]

    def _check_untouched(self, action: str) -> None:
        """Refuse `action`, naming the tensors, when the model was written since the bank's last write.

        A tensor counts as written when its version counter moved, or when it was replaced by another
        tensor of the same dtype and device (`.to()`, `.cuda()`, `.half()` replace tensors: a move or a
        cast is not a change; the bank follows it in `_follow`).
        """
        changed = []
        for name, (table, key), (sealed, version) in zip(self._slots, self._slots.values(), self._sealed):
            now = table[key]
            if now is sealed:
                if now._version != version:
                    changed.append(name)
            elif now.dtype == sealed.dtype and now.device == sealed.device:
                changed.append(name)
        if not changed:
            return
        active = f"task {self.active!r}" if self.active is not None else "the base"
        listed = ", ".join(changed[:4]) + (", …" if len(changed) > 4 else "")
        hint = ("; buffers among them: a forward pass in train mode updates BatchNorm statistics (run the model in "
                "eval mode)" if any(n in self._buffer_names for n in changed) else "")
        raise delta.DeltaError(
            f"cannot {action}: {len(changed)} tensor(s) of the model were written while {active} was active, outside "
            f"what the bank wrote ({listed}): an optimizer step, load_state_dict or another in-place write{hint}; "
            "the bank keeps only what its tasks change and cannot give the base back from this, so nothing was "
            "switched: build a new TaskBank on a fresh base (sparseft.base_model(task_file), or a model with the "
            "base weights loaded again) and add the tasks again")

    @torch.no_grad()
    def _switch(self, name: str | None) -> None:
        if name == self.active:
            return
        if delta.is_applied(self.model):
            raise delta.DeltaError("the bank's model carries a task applied outside the bank; unmerge it first")
        self._check_untouched("switch to " + (f"task {name!r}" if name is not None else "the base"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many small writes: thread hand-offs would cost more than the copies
        try:
            if self.active is not None:
                self._exchange(self._tasks[self.active])  # the base's values back, the task's into the bank
            self.active = None
            if name is not None:
                self._exchange(self._tasks[name])
                self.active = name
        finally:
            torch.set_num_threads(threads)
        self._seal()

    def _exchange(self, changes: dict[str, _Change]) -> None:
        """Exchange each change's kept values with the model's at the same places (an exact copy both ways)."""
        for name, c in changes.items():
            tensor = self._tensor(name)
            self._follow(c, tensor)
            if c.swap:
                c.value, tensor.data = tensor.data, c.value
            elif c.index is None:
                displaced = tensor.detach().clone()
                tensor.copy_(c.value)
                c.value = displaced
            else:
                index = c.index.long()  # index_select / index_copy_ take int64 (a transient copy)
                displaced = tensor.detach().reshape(-1).index_select(0, index)
                write_flat(tensor, index, c.value)
                c.value = displaced

    def _tensor(self, name: str) -> torch.Tensor:
        table, key = self._slots[name]
        return table[key]

    @staticmethod
    def _follow(c: _Change, tensor: torch.Tensor) -> None:
        """If the model was moved or cast (`.to`, `.cuda()`, `.half()`) after the task was read, its kept
        values follow, once."""
        if c.value.device == tensor.device and c.value.dtype == tensor.dtype:
            return
        if c.index is not None:
            c.index = c.index.to(tensor.device)
        c.value = c.value.to(device=tensor.device, dtype=tensor.dtype)


def _file_size(path: TaskSource, tensors: dict[str, torch.Tensor]) -> int:
    """A task file's size in bytes; for a task read from elsewhere, its tensors' bytes."""
    try:
        return Path(path).stat().st_size
    except (OSError, TypeError):
        return sum(t.numel() * t.element_size() for t in tensors.values())


@contextmanager
def _heads_shaped_as(model: nn.Module, header: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """While a task is read, head parameters take the task's shapes where they differ from the base's.

    Yields the base's own tensors of those heads, which are put back afterwards (not copied).
    """
    params = dict(model.named_parameters())
    heads = [n for n in header.get("head", []) if n in params and f"full/{n}" in tensors
             and tensors[f"full/{n}"].shape != params[n].shape]
    originals = {n: params[n].data for n in heads}
    for n in heads:
        params[n].data = torch.zeros(tensors[f"full/{n}"].shape, dtype=params[n].dtype, device=params[n].device)
    try:
        yield originals
    finally:
        for n, original in originals.items():
            params[n].data = original
