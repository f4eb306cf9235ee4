"""sparseft: task-adaptive parameter-efficient fine-tuning with lean sparse deltas.

    model = sparseft.create_model("mobilenetv2_100_offline", num_classes=10)
    sel = sparseft.select(model, loader, k=1)       # GPS: score weights, top-K per neuron
    sparseft.apply(model, sel)                      # only the selected entries train
    ...train with any loop...
    sparseft.save_delta(model, "task.safetensors")  # kilobytes to a few MB
    model = sparseft.load("task.safetensors")       # a task file of any method, base rebuilt
    sparseft.merge(model)                           # plain model, zero extra cost
    sparseft.save_merged(model, "model.safetensors")  # a plain state dict + the task's header (load takes it)
    sparseft.unmerge(model)                         # the base again, bit-exactly
    base = sparseft.base_model("pets.safetensors")  # the base a task file was trained on, from its header
    bank = sparseft.TaskBank(base); bank.add("pets", "pets.safetensors"); bank.use("pets")  # many tasks
    sparseft.export_peft("pets.safetensors", "pets-peft")  # a folder plain peft loads (PeftModel.from_pretrained)
    sparseft.save_pretrained(model, "pets-gps"); sparseft.from_pretrained("hf-hub:org/pets-gps")  # Hub-style folders

Other methods (LoRA, SPT, SCT, ...): `sparseft.methods.get_method(name, **options)`.
"""

from sparseft.api import base_model, load, merge, unmerge
from sparseft.delta import (
    DeltaError,
    apply,
    base_weights,
    forget_base,
    parameter_summary,
    sync,
    trainable_parameters,
)
from sparseft.deltafile import DeltaFileError, TaskFile, load_delta, read_delta, save_delta, save_merged
from sparseft.export import export_peft, from_pretrained, import_peft, push_to_hub, save_pretrained
from sparseft.inference import Prediction, predict
from sparseft.kinds import classification, segmentation  # noqa: F401 - registers the built-in task kinds
from sparseft.models import create_model
from sparseft.selection import Eligibility, Selection, SelectionError, select
from sparseft.taskbank import TaskBank
from sparseft.version import __version__

__all__ = [
    "DeltaError", "DeltaFileError", "Eligibility", "Selection", "SelectionError", "apply", "base_model",
    "base_weights",
    "create_model", "export_peft", "from_pretrained", "push_to_hub", "save_pretrained",
    "forget_base", "import_peft", "load", "load_delta", "merge", "parameter_summary", "Prediction", "predict",
    "read_delta", "save_delta", "save_merged", "select", "sync", "TaskBank", "TaskFile", "trainable_parameters",
    "unmerge", "__version__",
]
