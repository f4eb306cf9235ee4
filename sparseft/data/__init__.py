"""Data for sparseft: benchmark layouts, preprocessing per protocol, and offline provisioning.

    from sparseft.data import load_split, num_classes, data_config, build_transform
    cfg = data_config(model)                                   # the backbone's timm data config
    train = load_split("mini-vtab/fashion_mnist", "train800", build_transform(cfg, "vtab", train=True))
    head = num_classes("mini-vtab/fashion_mnist")

Specs: a VTAB-1k task folder, `fgvc:<dir>`, `folder:<dir>`, or a provisioned task such as
`mini-vtab/fashion_mnist` (`sparseft data fetch mini-vtab`). Segmentation folders (images/ +
masks/) and `mini-seg/clipart-scenes` are read by `sparseft.data.segmentation`. See docs/data.md.
"""

# importing them registers mini-seg and mini-vtab
from sparseft.data import miniseg, minivtab, minivtab_extra, minivtab_freedroid, minivtab_more  # noqa: F401
from sparseft.data.images import DataError, DataWarning, ImageDataset, Sample, open_rgb, to_rgb, verify_samples
from sparseft.data.layouts import SPLITS
from sparseft.data.spec import class_names, load_split, num_classes, resolve_spec
from sparseft.data.tasks import fetch_suite, list_tasks, task_status
from sparseft.data.transforms import TwoViews, build_transform, data_config

__all__ = [
    "DataError", "DataWarning", "ImageDataset", "SPLITS", "Sample", "TwoViews", "build_transform", "class_names",
    "data_config", "fetch_suite", "list_tasks", "load_split", "num_classes", "open_rgb", "resolve_spec",
    "task_status", "to_rgb", "verify_samples",
]
