"""`sparseft predict` and `sparseft.predict`: top-k classes of a saved task for new images."""

import csv
import os
from pathlib import Path

import pytest
import torch
from helpers import make_vtab, write_png

import sparseft
from sparseft.cli import main
from sparseft.data import DataError, build_transform, data_config, open_rgb
from sparseft.methods import MethodContext, get_method

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--warmup-epochs", "0", "--no-progress"]
NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = make_vtab(tmp_path_factory.mktemp("task") / "toy", n_train=6, n_val=3, n_test=3, classes=3)
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


@pytest.fixture(scope="module")
def task_files(task, tmp_path_factory):
    """Task files written by `sparseft train`: GPS (merges) and Adapter (adds modules, cannot merge)."""
    out = {}
    for method in ("gps", "adapter"):
        run = tmp_path_factory.mktemp(method) / "run"
        assert main(["train", "--method", method, "--data", str(task), "--out", str(run), *MODEL, *FAST]) == 0
        out[method] = run / "delta.safetensors"
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six images in a folder with nested subfolders, one broken .png and a non-image file."""
    root = tmp_path_factory.mktemp("images") / "photos"
    for i, rel in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/d.bmp", "sub/deeper/e.png", "z.png"]):
        write_png(root / rel, value=50 + i, size=20 + 3 * i)
    (root / "sub" / "broken.png").write_bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).numpy().tobytes())
    (root / "sub" / "notes.txt").write_text("not an image")
    return root


def _good(images: Path) -> list[Path]:
    return sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg", ".bmp") and p.name != "broken.png")


def _reference_probs(task_file: Path, paths: list[Path]) -> torch.Tensor:
    """Softmax of a direct forward of the unmerged task, on images preprocessed here (VTAB resize to 32 px)."""
    model = sparseft.load(task_file).eval()
    transform = build_transform(data_config(model), "vtab", train=False, img_size=32)
    with torch.no_grad():
        return model(torch.stack([transform(open_rgb(p)) for p in paths])).softmax(1)


def test_a_folder_skips_and_reports_a_broken_image(task_files, images, capsys):
    capsys.readouterr()
    assert main(["predict", str(task_files["gps"]), str(images), "--no-progress", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in _good(images)]  # nested, sorted, no notes.txt
    for line in lines:
        shown = line.split(": ", 1)[1].split(", ")
        assert len(shown) == 2 and all(s.split(" (")[0] in NAMES for s in shown)  # the header's class names
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("warning: ") for e in err) and "Traceback" not in captured.err
    assert str(images / "sub" / "broken.png") in err[0]
    assert err[1] == "warning: skipped 1 of 7 images"


def test_strict_makes_the_broken_image_an_error(task_files, images, capsys):
    capsys.readouterr()
    assert main(["predict", str(task_files["gps"]), str(images), "--strict", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(images / "sub" / "broken.png") in err[0]


def test_a_named_non_image_is_skipped_like_a_broken_image(task_files, images, capsys):
    notes, good = images / "sub" / "notes.txt", images / "a.png"
    capsys.readouterr()
    assert main(["predict", str(task_files["gps"]), str(notes), str(good), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and len(captured.out.strip().splitlines()) == 1
    assert str(notes) in captured.err and "skipped 1 of 2 images" in captured.err
    assert main(["predict", str(task_files["gps"]), str(notes), "--no-progress"]) == 1  # nothing left to predict
    assert "none of the 1 images could be read" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [(["{missing}"], "nowhere.png"), (["{images}", "--top-k", "0"], "--top-k"),
                                         (["{images}", "--out", "{images}"], "is a folder")])
def test_bad_arguments_are_one_line_errors(task_files, images, tmp_path, argv, named, capsys):
    values = {"missing": tmp_path / "nowhere.png", "images": images}
    capsys.readouterr()
    assert main(["predict", str(task_files["gps"]), *[a.format(**values) for a in argv]]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0] and not captured.out


@pytest.mark.parametrize("method", ["gps", "adapter"])
def test_csv_holds_the_models_own_top_classes(task_files, images, tmp_path, method, capsys):
    out = tmp_path / "preds.csv"
    argv = ["predict", str(task_files[method]), str(images), "--out", str(out), "--top-k", "9", "--batch-size", "4",
            "--no-progress"]
    assert main(argv) == 0
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]  # top-k clipped to 3
    good = _good(images)
    assert [Path(r[0]) for r in rows[1:]] == good
    reference = _reference_probs(task_files[method], good)
    for row, ref in zip(rows[1:], reference):
        labels, probs = row[1::2], [float(v) for v in row[2::2]]
        assert sorted(labels) == sorted(NAMES)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert labels[0] == NAMES[int(ref.argmax())]
        torch.testing.assert_close(torch.tensor(probs), ref[[NAMES.index(label) for label in labels]],
                                   atol=2e-5, rtol=0)
    capsys.readouterr()
    assert main(argv) == 1  # an existing --out is not replaced unasked
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_python_predict_on_a_tensor_batch_is_softmax_top_k(task_files):
    model = sparseft.load(task_files["adapter"])
    model.train()
    model.blocks[0].eval()  # each module's own mode comes back
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    preds = sparseft.predict(model, x, top_k=2, batch_size=2)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    with torch.no_grad():
        probs, indices = model.eval()(x).softmax(1).topk(2)
    assert len(preds) == 5 and all(p.path is None and p.error is None for p in preds)
    assert [p.indices for p in preds] == indices.tolist()
    assert [p.labels for p in preds] == [[NAMES[i] for i in row] for row in indices.tolist()]  # the task's names
    torch.testing.assert_close(torch.tensor([p.probs for p in preds]), probs, atol=1e-6, rtol=0)
    plain = sparseft.create_model("test_vit", num_classes=3, img_size=32)  # no task: indices as labels
    assert all(label.isdigit() for p in sparseft.predict(plain, x, top_k=3) for label in p.labels)
    named = sparseft.predict(model, x[:1], top_k=1, class_names=["x", "y", "z"])
    assert named[0].labels == [["x", "y", "z"][indices[0, 0]]]
    with pytest.raises(ValueError, match="class_names has 2 names"):
        sparseft.predict(model, x, class_names=NAMES[:2])
    with pytest.raises(ValueError, match="top_k"):
        sparseft.predict(model, x, top_k=0)


def test_the_cli_runs_mergeable_tasks_merged(task_files):
    from sparseft.api import load_for_inference

    assert sparseft.delta.is_merged(load_for_inference(task_files["gps"]))
    adapter = load_for_inference(task_files["adapter"])
    assert sparseft.delta.is_applied(adapter) and not sparseft.delta.is_merged(adapter)


def test_python_predict_on_files_and_pil_images(task_files, images):
    from sparseft.inference import eval_transform, find_images

    model = sparseft.load(task_files["gps"])
    header, _ = sparseft.read_delta(task_files["gps"])
    transform = eval_transform(model, header["extra"])
    good = _good(images)
    from_files = sparseft.predict(model, good)  # the loaded task's own preprocessing and class names
    from_pil = sparseft.predict(model, [open_rgb(p) for p in good], transform=transform, class_names=NAMES)
    assert [p.path for p in from_files] == good and all(p.path is None for p in from_pil)
    assert [p.labels for p in from_files] == [p.labels for p in from_pil]
    assert [p.probs for p in from_files] == [p.probs for p in from_pil]
    found = find_images([images])
    assert images / "sub" / "broken.png" in found and images / "sub" / "notes.txt" not in found
    with pytest.raises(DataError, match="broken.png"):
        sparseft.predict(model, found, transform=transform)
    skipped = sparseft.predict(model, found, transform=transform, on_error="skip")
    assert [p.path for p in skipped] == found and sum(p.error is not None for p in skipped) == 1


def test_a_task_file_without_class_names_shows_indices(tmp_path, images, capsys):
    torch.manual_seed(0)
    model = sparseft.create_model("test_vit", num_classes=3, img_size=32)
    method = get_method("linear")  # saved by the Python API: no class names in the header
    method.prepare(model, MethodContext(loader=lambda kind: [], progress=False))
    path = method.save(model, tmp_path / "task.safetensors",
                       extra={"model": "test_vit", "num_classes": 3, "img_size": 32, "init_seed": 0})
    capsys.readouterr()
    assert main(["predict", str(path), str(images / "a.png"), "--top-k", "3", "--no-progress"]) == 0
    shown = capsys.readouterr().out.strip().split(": ", 1)[1].split(", ")
    assert sorted(s.split(" (")[0] for s in shown) == ["0", "1", "2"]



def test_python_predict_runs_in_the_models_dtype(task_files, images):
    """Images are read as float32: a bf16 or fp64 model gets them in its own dtype (no dtype error)."""
    files = _good(images)[:2]
    reference = sparseft.predict(sparseft.load(task_files["gps"]), files, top_k=3)
    for dtype in (torch.float64, torch.bfloat16):
        model = sparseft.load(task_files["gps"]).to(dtype)
        preds = sparseft.predict(model, files, top_k=3)
        batch = sparseft.predict(model, torch.randn(2, 3, 32, 32, dtype=torch.float16), top_k=3)
        assert len(batch) == 2 and all(len(p.probs) == 3 for p in batch)
        for p, ref in zip(preds, reference):
            torch.testing.assert_close(torch.tensor(p.probs), torch.tensor(ref.probs),
                                       atol=1e-6 if dtype == torch.float64 else 2e-2, rtol=0)


# -- whatever cannot be read is skipped, named, and counted ---------------------------------------


def unreadable_inputs(root: Path, monkeypatch) -> tuple[list[Path], dict[Path, str]]:
    """Two good images and one of each kind of input that exists but cannot be read, with what the
    warning about it says: a truncated PNG, a broken link, a FIFO and a folder named like images, a
    file without read permission (refused through `open`: as root, chmod 000 does not stop a read)."""
    import builtins

    good = [write_png(root / "good" / "a.png", value=1, size=20), write_png(root / "good" / "b.png", value=2, size=20)]
    bad: dict[Path, str] = {}
    data = write_png(root / "tmp.png", value=3, size=20).read_bytes()
    (root / "tmp.png").unlink()
    (root / "bad" / "truncated.png").parent.mkdir(parents=True)
    (root / "bad" / "truncated.png").write_bytes(data[:len(data) // 2])
    bad[root / "bad" / "truncated.png"] = "cannot read image"
    (root / "bad" / "link.png").symlink_to(root / "nowhere.png")
    bad[root / "bad" / "link.png"] = "a broken link (to "
    os.mkfifo(root / "bad" / "pipe.png")
    bad[root / "bad" / "pipe.png"] = "a FIFO (named pipe), not a file"
    (root / "folder.png").mkdir()  # named explicitly: a folder named like an image, with none in it
    bad[root / "folder.png"] = "a folder, not a file"
    locked = write_png(root / "bad" / "locked.png", value=4, size=20)
    bad[locked] = "Permission denied"
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    return good, bad


@pytest.fixture
def no_hang():
    """Fail instead of blocking for ever (a FIFO opened for reading waits for a writer)."""
    import signal

    def fail(*_):
        raise TimeoutError("predict blocked on an input")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_inputs_that_exist_but_cannot_be_read_are_skipped_with_one_line_each(task_files, tmp_path, monkeypatch,
                                                                             capsys, no_hang):
    good, bad = unreadable_inputs(tmp_path, monkeypatch)
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    argv = ["predict", str(task_files["gps"]), str(tmp_path / "good"), str(tmp_path / "bad"),
            str(tmp_path / "folder.png"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and len(err) == len(bad) + 1
    for path, says in bad.items():
        line = next(e for e in err if e.startswith(f"warning: {path}: "))
        assert says in line and line.endswith("(skipped)")
    assert err[-1] == f"warning: skipped {len(bad)} of {len(good) + len(bad)} images"
    with out.open(newline="") as f:
        assert [Path(r[0]) for r in list(csv.reader(f))[1:]] == good  # the others were predicted
    assert main([*argv[:2], str(tmp_path / "bad"), "--no-progress", "--strict"]) == 1  # --strict: an error
    assert main([*argv[:2], str(tmp_path / "bad"), "--no-progress"]) == 1  # nothing readable
    assert f"none of the {len(bad) - 1} images could be read" in capsys.readouterr().err


def test_an_explicitly_named_broken_link_is_skipped_and_a_missing_path_is_an_error(task_files, tmp_path, capsys):
    good = write_png(tmp_path / "a.png", value=1, size=20)
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    capsys.readouterr()
    assert main(["predict", str(task_files["gps"]), str(good), str(tmp_path / "link.png"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and f"{tmp_path / 'link.png'}: a broken link (to " in captured.err
    assert main(["predict", str(task_files["gps"]), str(good), str(tmp_path / "typo.png"), "--no-progress"]) == 1
    assert "typo.png: no such file or folder" in capsys.readouterr().err


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    from sparseft.data import DataWarning
    from sparseft.inference import find_images

    write_png(tmp_path / "a.png", value=1)
    write_png(tmp_path / "sub" / "b.png", value=2)
    real = os.scandir

    def scandir(path):
        if Path(path) == tmp_path / "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(DataWarning, match=f"{tmp_path / 'sub'}: cannot list this folder \\(Permission denied\\)"):
        assert find_images([tmp_path]) == [tmp_path / "a.png"]


def test_a_file_name_that_is_not_utf8_goes_into_the_csv_as_its_bytes(task_files, tmp_path, capsys):
    folder = tmp_path / "photos"
    write_png(folder / "a.png", value=1, size=20)
    odd = os.fsencode(str(folder)) + b"/\xffb.png"  # a Latin-1 name on a UTF-8 system
    write_png(Path(os.fsdecode(odd)), value=2, size=20)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(task_files["gps"]), str(folder), "--out", str(out), "--no-progress"]) == 0
    lines = out.read_bytes().splitlines()
    assert len(lines) == 3 and any(line.startswith(odd + b",") for line in lines)  # the name as it is on disk
    assert not list(tmp_path.glob(".preds.csv.*"))  # no temporary file left
