"""The `Selection` record moved to `sparseft.selected` (the sparse-delta engine's input); re-exported here."""

from sparseft.selected import FORMAT, Selection, SelectionError, row_length

__all__ = ["FORMAT", "Selection", "SelectionError", "row_length"]
