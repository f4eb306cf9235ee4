"""Hub-style task folders: save_pretrained / from_pretrained on a folder and on an offline huggingface_hub cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_vtab, toy_base, write_task

import sparseft
from sparseft.cli import main
from sparseft.deltafile import BaseMismatch
from sparseft.export import ExportError, from_pretrained, push_to_hub, save_pretrained

FAST = ["--model", "test_vit", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
        "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real `sparseft train` run folder (GPS on a tiny VTAB-layout task)."""
    root = tmp_path_factory.mktemp("hub")
    data = make_vtab(root / "toy", n_train=8, n_val=2, n_test=4, classes=3, names=["cat", "dog", "owl"])
    assert main(["train", "--method", "gps", "--data", str(data), "--out", str(root / "run"), *FAST]) == 0
    return root / "run"


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_train_writes_the_card_and_save_pretrained_a_hub_style_folder(run, tmp_path):
    card = (run / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: sparseft\nbase_model: test_vit\n") and "- gps" in card
    assert f"{summary['final']['test_acc']:.4f}" in card and "cat, dog, owl" in card

    assert main(["export", str(run / "delta.safetensors"), "--format", "hub", "--out", str(tmp_path / "pets")]) == 0
    folder = tmp_path / "pets"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "task.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["library_name"], config["architecture"], config["method"]) == ("sparseft", "test_vit", "gps")
    assert config["label_names"] == ["cat", "dog", "owl"] and config["num_classes"] == 3
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and len(config["pretrained_cfg"]["mean"]) == 3
    info = sparseft.api.describe_task(run / "delta.safetensors")
    assert config["trained_values"] == info["sparse_entries"] + info["full_values"] > 0
    assert f"trains {config['trained_values']:,} values" in (folder / "README.md").read_text()

    x = torch.randn(2, 3, 32, 32)
    want = _logits(sparseft.load(run / "delta.safetensors"), x)
    assert torch.equal(_logits(from_pretrained(folder), x), want)
    again = save_pretrained(from_pretrained(folder), tmp_path / "again")  # a loaded model saves its task again
    assert torch.equal(_logits(from_pretrained(again), x), want)

    other = sparseft.create_model("test_vit", num_classes=5, img_size=32)
    with pytest.raises(BaseMismatch) as folder_err:
        from_pretrained(folder, other)
    with pytest.raises(BaseMismatch) as file_err:
        sparseft.load(run / "delta.safetensors", other)
    said = [str(e.value).split(" is for ", 1)[1].rsplit("; sparseft.", 1)[0] for e in (folder_err, file_err)]
    assert said[0] == said[1] and "5 classes" in said[0]  # the same refusal, said of the folder
    assert str(folder_err.value).startswith(f"{folder}: this task folder is for test_vit")


def _cache(root: Path, repo: str, snapshots: dict[str, Path], main_rev: str) -> Path:
    """A huggingface_hub cache as the library lays it out: blobs by hash, snapshots of symlinks, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for rev, folder in snapshots.items():
        for f in folder.iterdir():
            blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, blob)
            link = repo_dir / "snapshots" / rev / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(main_rev)
    return root


def test_from_pretrained_reads_an_offline_huggingface_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    old, new = (write_task("gps", tmp_path / f"{n}.safetensors", seed=s) for n, s in (("old", 1), ("new", 2)))
    revs = {"a" * 40: save_pretrained(old, tmp_path / "v1"), "b" * 40: save_pretrained(new, tmp_path / "v2")}
    cache = _cache(tmp_path / "hub", "org/pets-gps", revs, main_rev="b" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = torch.randn(2, 3, 32, 32)
    latest = _logits(from_pretrained("hf-hub:org/pets-gps", toy_base(), cache_dir=cache), x)
    assert torch.equal(latest, _logits(sparseft.load(new, toy_base()), x))
    pinned = _logits(from_pretrained("hf-hub:org/pets-gps", toy_base(), revision="a" * 40, cache_dir=cache), x)
    assert torch.equal(pinned, _logits(sparseft.load(old, toy_base()), x))
    with pytest.raises(ExportError, match="not in the huggingface_hub cache"):
        from_pretrained("hf-hub:org/missing", cache_dir=cache)
    with pytest.raises(ExportError, match="not a sparseft task folder"):
        from_pretrained(tmp_path)


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    task = write_task("lora", tmp_path / "t.safetensors")
    assert push_to_hub(task, "org/pets-lora", token="tok") == "https://hub.example/commit/1"
    assert calls["repo"] == ("org/pets-lora", True) and calls["token"] == "tok"
    assert calls["files"] == ["README.md", "config.json", "task.safetensors"]
    assert 'sparseft.from_pretrained("hf-hub:org/pets-lora")' in calls["card"]
