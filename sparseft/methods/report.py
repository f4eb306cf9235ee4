"""Trainable-parameter counts of every method on one model, reported the same way for all."""

from __future__ import annotations

from typing import Any

import torch

from sparseft.delta import parameter_summary
from sparseft.methods import METHODS, MethodContext, NotApplicable, get_method
from sparseft.models import create_model


def method_table(model_name: str, num_classes: int, *, img_size: int | None = None,
                 k: int = 1) -> list[dict[str, Any]]:
    """Per method: trainable backbone values (absolute and % of the backbone), head values, mergeable.

    Data-driven selections (GPS) are counted on one batch of random images: their size depends
    only on the rule (K per neuron), not on which entries win. A method that does not fit the
    architecture (e.g. VPT on a CNN) gets a row without counts that says why.
    """

    rows = []
    for name, cls in METHODS.items():
        model = create_model(model_name, num_classes, img_size=img_size)
        size = img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        x = torch.randn(4, 3, size, size)
        y = torch.arange(4) % num_classes
        batches = {"select": [([x, x.flip(-1)], y)], "train": [(x, y)]}
        ctx = MethodContext(loader=batches.__getitem__, progress=False)
        options = {"k": k} if "k" in {f for f in cls.Options.__dataclass_fields__} else {}
        try:
            model = get_method(name, **options).prepare(model, ctx)
        except NotApplicable as err:
            rows.append({"method": name, "mergeable": cls.mergeable, "summary": f"not applicable: {err}"})
            continue
        rows.append({"method": name, "mergeable": cls.mergeable, "summary": cls.summary, **parameter_summary(model)})
    return rows
