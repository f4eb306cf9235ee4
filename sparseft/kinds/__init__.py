"""Task kinds: the registry (`sparseft.kinds.base`) and, beside it, the built-in kinds.

    from sparseft.kinds import get_kind, kind_for_data, kind_of, register

This package's own module only re-exports the registry (a leaf, importable from any layer); the
built-in kinds, `sparseft.kinds.classification` and `sparseft.kinds.segmentation`, register
themselves when imported, which `import sparseft` does. See docs/architecture.md, "Adding a task kind".
"""

from sparseft.kinds.base import (
    DEFAULT_KIND,
    KINDS,
    Meter,
    TaskKind,
    get_kind,
    kind_for_data,
    kind_named_in,
    kind_of,
    register,
    summary_keys,
    unregister,
)

__all__ = ["DEFAULT_KIND", "KINDS", "Meter", "TaskKind", "get_kind", "kind_for_data", "kind_named_in", "kind_of",
           "register", "summary_keys", "unregister"]
