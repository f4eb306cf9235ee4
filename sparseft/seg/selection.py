"""GPS's selection losses for masks moved to `sparseft.selection.regions`; re-exported here."""

from sparseft.selection.regions import (
    IGNORE_INDEX,
    dense_targets,
    has_two_classes,
    pixel_cross_entropy,
    region_features,
    region_supcon_loss,
)

__all__ = ["IGNORE_INDEX", "dense_targets", "has_two_classes", "pixel_cross_entropy", "region_features",
           "region_supcon_loss"]
