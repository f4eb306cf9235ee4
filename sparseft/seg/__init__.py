"""Semantic segmentation: a timm backbone with a light decoder, and IoU / Dice metrics.

    from sparseft.seg import SegMetrics, create_segmentation_model

    model = create_segmentation_model("mobilenetv2_100_offline", num_classes=2)
    metrics = SegMetrics(num_classes=2)
    metrics.update(model(images).argmax(1), masks)
    metrics.compute()["mDice_per_image"]
"""

from sparseft.seg.metrics import SegMetrics
from sparseft.seg.model import (
    FPNDecoder,
    SegmentationModel,
    create_segmentation_model,
    evenly_spaced,
    load_segmentation_weights,
)
from sparseft.seg.predict import MaskPrediction, predict_masks, write_masks

__all__ = ["FPNDecoder", "MaskPrediction", "SegMetrics", "SegmentationModel", "create_segmentation_model",
           "evenly_spaced", "load_segmentation_weights", "predict_masks", "write_masks"]
