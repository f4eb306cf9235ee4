"""Image samples, the error policy for bad input, and the Dataset that reads the images.

A sample is (path, label, origin); `origin` says where it was listed ("test.txt:17") so every
error about it can point at the line to fix. Bad input raises `DataError`; with
`on_error="skip"` it is skipped and one `DataWarning` gives the count. Nothing is dropped
silently.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sparseft.errors import DataWarning, InputError

OnError = Literal["raise", "skip"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class DataError(InputError):
    """Bad data-set input: a malformed split file, a missing or unreadable image, a bad label."""


class Sample(NamedTuple):
    """One image of a split: its file, its integer label and where it was listed."""

    path: Path
    label: int
    origin: str


class Problems:
    """Collects bad-input reports: raises at the first (`"raise"`) or counts them (`"skip"`).

    Call `finish()` once at the end: in skip mode it emits a single `DataWarning` with the count
    and the first few messages.
    """

    def __init__(self, on_error: OnError, what: str):
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self.what = what
        self.messages: list[str] = []

    def report(self, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(message)
        self.messages.append(message)

    def finish(self) -> None:
        if self.messages:
            shown = "; ".join(self.messages[:3]) + ("; ..." if len(self.messages) > 3 else "")
            warnings.warn(f"skipped {len(self.messages)} bad {self.what}: {shown}", DataWarning, stacklevel=3)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB; transparency is composited on white.

    Grey, palette and CMYK images convert directly; 16-bit and 32-bit grey images are scaled
    to 8 bits rather than clipped.
    """
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info)
    if img.mode == "RGB" and not has_alpha:
        return img
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif img.mode == "I":
            scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        else:  # float images: 0..1 if they look normalised, else 0..255
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def check_readable(path: str | Path, what: str = "image", origin: str | None = None) -> None:
    """Refuse, before it is opened, a path that is no regular file (a folder, a FIFO that would block the
    read, a device, a socket) or a link to nothing: a `DataError` naming it (and the line that listed it).
    The other failures (permissions, I/O errors) come from the read itself."""
    where = f" (listed at {origin})" if origin else ""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        if os.path.islink(path):
            raise DataError(f"{path}: a broken link (to {os.readlink(path)}): no {what} file there{where}") from err
        raise DataError(f"{path}: {what} file not found{where}") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read {what}{where}: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise DataError(f"{path}: {kind}, not a file: cannot read {what}{where}")


def open_rgb(path: str | Path, origin: str | None = None, data: bytes | None = None) -> Image.Image:
    """Open an image file fully decoded as RGB; any failure (`check_readable`, an OS error while reading,
    an undecodable or truncated file) is a `DataError` naming the file.

    `data`: the file's bytes, when they have been read already (see `remembered`)."""
    where = f" (listed at {origin})" if origin else ""
    if data is None:
        check_readable(path, "image", origin)
    buffer = io.BytesIO(data) if data is not None else None
    try:
        with Image.open(buffer if buffer is not None else path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found{where}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        why = str(err).replace(repr(buffer), repr(str(path))) if buffer is not None else err  # not '<_io.BytesIO …>'
        raise DataError(f"{path}: cannot read image{where}: {why}") from err


# -- verifying files, remembered by their content ------------------------------------------

T = TypeVar("T")

#: what checking files found, by what was checked and the digests of the files' bytes (see `remembered`)
_REMEMBERED: dict[tuple[Hashable, ...], Any] = {}
_REMEMBER_AT_MOST = 200_000  # about 60 MB; past it, files are decoded again


def read_file(path: str | Path, what: str = "image", origin: str | None = None) -> bytes:
    """A file's bytes; a missing or unreadable file is a `DataError` naming it (and the line that listed it)."""
    where = f" (listed at {origin})" if origin else ""
    check_readable(path, what, origin)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{path}: {what} file not found{where}") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read {what}{where}: {err}") from err


def remembered(files: Sequence[tuple[str | Path, str, str | None]], how: Hashable,
               check: Callable[[list[bytes]], T]) -> T:
    """`check(contents)` of files given as (path, what, origin), remembered for this process by `how`
    and the digests of the files' bytes: checking byte-identical files again (a later run of a
    benchmark, a copy under another name) reads them but does not decode them. A check that raises
    is not remembered. `how` must hold everything besides the bytes that the result depends on."""
    contents = [read_file(*file) for file in files]
    key = (how, *(hashlib.blake2b(data, digest_size=16).digest() for data in contents))
    if key not in _REMEMBERED:
        value = check(contents)
        if len(_REMEMBERED) >= _REMEMBER_AT_MOST:
            _REMEMBERED.clear()
        _REMEMBERED[key] = value
    return _REMEMBERED[key]


def pixel_digest(pixels: Image.Image | np.ndarray) -> str:
    """A digest of decoded pixels (an image's mode, size and values; an array's dtype, shape and values):
    equal for pixel-identical images whatever their file format, name or compression."""
    if isinstance(pixels, Image.Image):
        head, body = f"{pixels.mode} {pixels.size}", pixels.tobytes()
    else:
        head, body = f"{pixels.dtype} {pixels.shape}", np.ascontiguousarray(pixels).tobytes()
    return hashlib.blake2b(head.encode() + b"\0" + body, digest_size=16).hexdigest()


def image_digest(path: str | Path, origin: str | None = None) -> str:
    """The `pixel_digest` of an image file decoded as RGB (see `open_rgb`, `remembered`); a file that
    cannot be read or decoded is a `DataError` naming it."""
    return remembered([(path, "image", origin)], "rgb",
                      lambda contents: pixel_digest(open_rgb(path, origin, contents[0])))


def sample_digests(samples: Iterable[Sample], on_error: OnError = "raise") -> list[tuple[Sample, str]]:
    """Open every image up front: the readable samples (all of them in raise mode) with their
    `image_digest`, for the checks that compare images by content (`sparseft.data.checks.check_content`)."""
    problems = Problems(on_error, "images")
    good = []
    for sample in samples:
        try:
            good.append((sample, image_digest(sample.path, sample.origin)))
        except DataError as err:
            problems.report(str(err))
    problems.finish()
    return good


def verify_samples(samples: Iterable[Sample], on_error: OnError = "raise") -> list[Sample]:
    """Open every image up front; returns the readable samples (all of them in raise mode).

    Use it before a long run so a corrupt file fails now and not in epoch 37.
    """
    return [sample for sample, _ in sample_digests(samples, on_error)]


class ImageDataset(Dataset):
    """A map-style Dataset over (path, label) samples: yields `(transform(rgb_image), label)`.

    Images are opened lazily as RGB (see `to_rgb`); an unreadable file raises `DataError`
    naming it and the split line that listed it.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any] | None = None, *,
                 classes: Sequence[str] | None = None, num_classes: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        if num_classes is None:
            num_classes = len(classes) if classes is not None else 1 + max((s.label for s in self.samples), default=-1)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]

    @property
    def targets(self) -> list[int]:
        """The labels in sample order (torchvision's attribute name)."""
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.samples[index]
        img = open_rgb(sample.path, sample.origin)
        return (self.transform(img) if self.transform is not None else img), sample.label

    def verify(self, on_error: OnError = "raise") -> ImageDataset:
        """Open every image now (see `verify_samples`); in skip mode unreadable ones are dropped."""
        self.samples = verify_samples(self.samples, on_error)
        return self

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images, {self.num_classes} classes)"
