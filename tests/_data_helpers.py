"""Tiny on-disk data sets in each layout, for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, value: int = 0, size: int = 12, mode: str = "RGB") -> Path:
    """A small image file whose pixels encode `value` (so tests can tell images apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L")
    elif mode == "RGBA":
        arr = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA")
    else:
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    img.save(path)
    return path


def make_vtab(root: Path, n_train: int = 6, n_val: int = 2, n_test: int = 4, classes: int = 3) -> Path:
    """A VTAB-1k task folder (NOAH layout) with the four split lists."""
    root.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {}
    k = 0
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lines = []
        for i in range(n):
            rel = f"images/{split}_{i}.png"
            write_png(root / rel, value=k)
            lines.append(f"{rel} {k % classes}")
            k += 1
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_fgvc(root: Path, image_dir: str = "images", first_label: int = 1, classes: int = 3) -> Path:
    """A VPT-style FGVC folder: train/val/test.json mapping paths (under `image_dir`) to labels."""
    img_root = root / image_dir if image_dir else root
    k = 0
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        entries = {}
        for i in range(n):
            rel = f"{k % classes:03d}.cls/{split}_{i}.jpg"
            path = img_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 14, 3), k * 10 % 256, dtype=np.uint8)).save(path, format="JPEG")
            entries[rel] = first_label + k % classes
            k += 1
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def make_folder(root: Path, per_class: int = 10, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """An ImageFolder tree `<root>/<class>/<i>.png` (plus a non-image file that must be ignored)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i:02d}.png", value=100 * c + i)
        (root / name / "notes.txt").write_text("not an image")
    return root


def write_deb(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A minimal Debian package (ar archive with an xz data.tar) holding `files` and symlinks `links`."""
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo("./" + name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, payload in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        assert len(header) == 60
        out += header + payload + (b"\n" if len(payload) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def idx_gz(array: np.ndarray) -> bytes:
    """An array as a gzipped IDX (MNIST) file."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)
