"""Seeded randomness that gives the same numbers on every machine and numpy version.

Splits and provisioned tasks must be reproducible byte for byte. numpy's `Generator` methods
may change between releases; its bit generators' raw streams may not, so everything here is
derived from `PCG64.random_raw`.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stable_keys(n: int, seed: int, salt: str = "") -> np.ndarray:
    """`n` uint64 pseudo-random keys determined only by (`seed`, `salt`)."""
    entropy = int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:16], "little")
    return np.asarray(np.random.PCG64(entropy).random_raw(n), dtype=np.uint64).reshape(n)


def stable_permutation(n: int, seed: int, salt: str = "") -> np.ndarray:
    """A permutation of `range(n)` determined only by (`seed`, `salt`)."""
    return np.argsort(stable_keys(n, seed, salt), kind="stable")


def stable_uniform(n: int, seed: int, salt: str = "") -> np.ndarray:
    """`n` floats in [0, 1) determined only by (`seed`, `salt`)."""
    return (stable_keys(n, seed, salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53
