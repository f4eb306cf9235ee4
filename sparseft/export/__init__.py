"""The ecosystem's formats: peft adapters (`export_peft`, `import_peft`), Hub-style task folders
(`save_pretrained`, `from_pretrained`, `push_to_hub`) and ONNX (`export_onnx`). docs/ecosystem.md says what maps
to what."""

from sparseft.export.common import ExportError
from sparseft.export.hub import from_pretrained, push_to_hub, save_pretrained
from sparseft.export.onnx import export_onnx
from sparseft.export.peft import PeftExport, export_peft
from sparseft.export.peftimport import import_peft

__all__ = ["ExportError", "PeftExport", "export_onnx", "export_peft", "from_pretrained", "import_peft", "push_to_hub",
           "save_pretrained"]
