"""Helpers shared by the tests: tiny models of every family, toy data, training steps, on-disk data sets.

Tests import from here (never from each other); pytest fixtures live in conftest.py.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparseft.selection import Selection, parameter_roles

# -- models and toy tensors ---------------------------------------------------------------

TIMM_TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                                                   window_size=4)),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))),
    "resnet": ("resnet10t", dict()),
    "mobilenetv2": ("mobilenetv2_050", dict()),
    "efficientnet": ("tf_efficientnet_lite0", dict()),
}


def tiny_model(family: str, num_classes: int = 4, seed: int = 0) -> nn.Module:
    """A small randomly initialised model of `family` (also 'tv_mobilenet_v2' and 'mlp')."""
    torch.manual_seed(seed)
    if family == "tv_mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.25)
    if family == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(),
                             nn.Linear(32, num_classes))
    name, kwargs = TIMM_TINY[family]
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def toy_batches(n_batches: int = 2, batch: int = 8, classes: int = 4, size: int = 32, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images whose class shifts the mean of one colour channel, so labels carry signal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        x = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
        x[:, 0] += y[:, None, None].to(dtype) * 0.5
        out.append((x, y))
    return out


def random_selection(model: nn.Module, k: int = 2, seed: int = 0) -> Selection:
    """Top-k of random scores per neuron over the default eligible weights."""
    g = torch.Generator().manual_seed(seed)
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    indices, shapes = {}, {}
    for name, role in roles.items():
        if role != "select":
            continue
        p = params[name]
        rows = torch.rand(p.shape[0], p[0].numel(), generator=g)
        cols = rows.topk(min(k, rows.shape[1]), dim=1).indices
        indices[name] = (cols + torch.arange(p.shape[0])[:, None] * rows.shape[1]).reshape(-1)
        shapes[name] = tuple(p.shape)
    return Selection(indices=indices, shapes=shapes, full=[n for n, r in roles.items() if r == "full"])


def train_steps(model, steps=3, lr=1e-2, weight_decay=0.05, batches=None):
    """A few AdamW steps on the trainable parameters; returns the optimizer."""
    batches = batches or toy_batches(steps, batch=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


# -- training runs ------------------------------------------------------------------------

def toy_loader(n=48, batch=8, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x[:, 0] += y[:, None, None] * 1.0
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


class Interrupt(Exception):
    pass


class FailingLoader:
    """Wraps a loader and raises after `after` batches in total (a crash mid-run)."""

    def __init__(self, loader, after):
        self.loader, self.after, self.count = loader, after, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.count += 1
            if self.count > self.after:
                raise Interrupt
            yield batch


# -- tiny on-disk data sets in each layout ------------------------------------------------

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


def make_vtab(root: Path, n_train: int = 6, n_val: int = 2, n_test: int = 4, classes: int = 3,
              names: list[str] | None = None) -> Path:
    """A VTAB-1k task folder (NOAH layout) with the four split lists (and `names` in classes.txt)."""
    root.mkdir(parents=True, exist_ok=True)
    if names is not None:
        (root / "classes.txt").write_text("\n".join(names) + "\n")
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


SEG_CLASSES = ["background", "square", "disc"]


def make_seg_task(root: Path, n_train: int = 12, n_test: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Squares (class 1) and discs (class 2) of a class colour on noise; index masks, classes.txt."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    stems = []
    for i in range(n_train + n_test):
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        cy, cx = rng.integers(8, size - 8, 2)
        kind = 1 + i % 2
        region = (abs(yy - cy) < 6) & (abs(xx - cx) < 6) if kind == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        img[region] = (200, 40, 40) if kind == 1 else (40, 40, 200)
        mask[region] = kind
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"{i:03d}.png")
        stems.append(f"{i:03d}")
    (root / "classes.txt").write_text("\n".join(SEG_CLASSES) + "\n")
    for split, part in {"train800": stems[:8], "val200": stems[8:n_train], "train800val200": stems[:n_train],
                        "test": stems[n_train:]}.items():
        (root / f"{split}.txt").write_text("\n".join(part) + "\n")
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



def pin_fake_deb(cache: Path, monkeypatch, key: str, files: dict[str, bytes]) -> Path:
    """A fake .deb of `files` in `cache`'s kept sources for data source `key`, pinned (monkeypatched) by its own
    sha256, so a fetch builds from it without downloading."""
    from sparseft.data.sources import SOURCES
    from sparseft.fileutil import sha256_file
    from sparseft.provision import Source

    src = SOURCES[key]
    folder = cache / "data" / "sources" / src.key
    folder.mkdir(parents=True)
    deb = write_deb(folder / "fake.deb", files)
    monkeypatch.setitem(SOURCES, key, Source(src.package, src.version, "deb", src.licence, sha256=sha256_file(deb),
                                             pool_path=src.pool_path))
    return deb


def idx_gz(array: np.ndarray) -> bytes:
    """An array as a gzipped IDX (MNIST) file."""

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


# -- task files for the front-door, bank and read-once tests -----------------------------------

#: task files written by sparseft 0.1 and the base they belong to (tests/fixtures/make_legacy_0_1.py)
LEGACY = Path(__file__).parent / "fixtures" / "legacy-0.1"


def toy_base(classes: int = 3, seed: int = 0) -> nn.Module:
    """The test base (test_vit at 32 px, eval mode); with another number of classes, the same backbone under a new
    head."""
    import sparseft

    torch.manual_seed(seed)
    model = sparseft.create_model("test_vit", num_classes=3, img_size=32).eval()
    if classes != 3:
        model.reset_classifier(classes)
    return model


def method_test_options(method: str) -> dict:
    """Options that keep a method's planning pass to one batch."""
    return {"select_batches": 1} if method in ("spt-lora", "spt-adapter", "sct") else {}


def trained_model(method: str, classes: int = 3, seed: int = 1, base_seed: int = 0,
                  run_dir: Path | None = None) -> nn.Module:
    """`toy_base(classes, base_seed)` prepared by `method`, its trained values random (seeded by `seed`) so every
    task differs; in eval mode."""
    from sparseft.methods import MethodContext, get_method

    model = toy_base(classes, base_seed)
    x, y = toy_batches(1, batch=6, classes=classes)[0]
    ctx = MethodContext(loader={"select": [([x, x.flip(-1)], y)], "train": [(x, y)]}.__getitem__, progress=False,
                        run_dir=run_dir)
    model = get_method(method, **method_test_options(method)).prepare(model, ctx)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def write_task(method: str, path: Path, classes: int = 3, seed: int = 1, base_seed: int = 0) -> Path:
    """A task file of `method` (see `trained_model`) whose header names its base and class names."""
    from sparseft.methods import get_method

    model = trained_model(method, classes, seed, base_seed)
    return get_method(method).save(model, path, extra={"model": "test_vit", "num_classes": classes, "img_size": 32,
                                                       "init_seed": base_seed, "class_names": list("abcde"[:classes])})

