"""sparseft tasks as peft adapters: plain peft (no sparseft import) gives the merged task's logits; the way back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import random_selection, tiny_model, toy_base, toy_batches, write_task
from safetensors.torch import load_file, save_file

import sparseft
from sparseft.export import ExportError, export_peft
from sparseft.export.peftimport import import_peft
from sparseft.methods import MethodContext, get_method

RECORD = {"model": "test_vit", "num_classes": 3, "img_size": 32, "init_seed": 0, "class_names": ["a", "b", "c"]}


def _task(method: str, path: Path, seed: int = 1, **options) -> Path:
    """A task of `method` on the test base with random trained values (GPS without the patch-embedding conv)."""
    model = toy_base()
    x, y = toy_batches(1, batch=6, classes=3)[0]
    ctx = MethodContext(loader={"select": [([x, x.flip(-1)], y)], "train": [(x, y)]}.__getitem__, progress=False)
    method_ = get_method(method, **options)
    model = method_.prepare(model, ctx)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return method_.save(model, path, extra=RECORD)


def _merged_logits(task: Path, x: torch.Tensor) -> torch.Tensor:
    model = sparseft.merge(sparseft.load(task, toy_base())).eval()
    with torch.no_grad():
        return model(x)


PLAIN_PEFT = textwrap.dedent("""
    import sys, timm, torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    base_file, x_file, out_file, *folders = sys.argv[1:]
    x, out = load_file(x_file)["x"], {}
    for i, folder in enumerate(folders):
        base = timm.create_model("test_vit", num_classes=3, img_size=32)
        base.load_state_dict(load_file(base_file))
        model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            out[f"unmerged{i}"] = model(x)
            out[f"merged{i}"] = model.merge_and_unload()(x)
    assert not any(m.startswith("sparseft") for m in sys.modules), "sparseft was imported"
    save_file(out, out_file)
""")


@pytest.mark.slow  # a fresh interpreter imports torch, timm and peft (5 s of CPU)
def test_plain_peft_loads_gps_and_lora_exports_with_sparseft_logits(tmp_path):
    gps = _task("gps", tmp_path / "gps.safetensors", k=2, select_patch_embed=False)
    lora = _task("lora", tmp_path / "lora.safetensors", lora_r=4, lora_alpha=8.0, lora_targets="qkv,fc1")
    shira = export_peft(gps, tmp_path / "gps-peft")
    low = export_peft(lora, tmp_path / "lora-peft")
    assert (shira.peft_type, low.peft_type) == ("SHIRA", "LORA")
    config = json.loads((tmp_path / "gps-peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["modules_to_save"] == ["head"] and config["mask_type"] != "random"
    assert json.loads((tmp_path / "lora-peft" / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    entries = sum(t.numel() for k, t in sparseft.read_delta(gps).tensors.items() if k.endswith("/values"))
    assert shira.entries == entries
    assert "library_name: peft" in (tmp_path / "gps-peft" / "README.md").read_text()
    tensors = load_file(tmp_path / "gps-peft" / "adapter_model.safetensors")
    idx = tensors["base_model.model.blocks.0.attn.qkv.shira_indices"]
    assert idx.dtype == torch.int32 and idx.shape == (2, shira.r * (64 + 192))
    stored = sum(t.numel() for k, t in tensors.items() if k.endswith("shira_weight"))
    assert stored == shira.entries + shira.padding and shira.padding > 0  # zero-valued padding to r·(in+out)
    assert "base_model.model.blocks.0.attn.qkv.base_layer.bias" in tensors  # the trained bias of an adapted layer

    save_file({k: v.contiguous() for k, v in toy_base().state_dict().items()}, tmp_path / "base.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, tmp_path / "x.safetensors")
    files = [tmp_path / f for f in ("base.safetensors", "x.safetensors", "out.safetensors", "gps-peft", "lora-peft")]
    subprocess.run([sys.executable, "-c", PLAIN_PEFT, *map(str, files)], check=True, cwd=tmp_path, timeout=300)
    got = load_file(tmp_path / "out.safetensors")
    for i, task in enumerate((gps, lora)):
        want = _merged_logits(task, x)
        for mode in ("unmerged", "merged"):
            assert (got[f"{mode}{i}"] - want).abs().max() <= 1e-5, (task.name, mode)
        assert (want - toy_base()(x)).abs().max() > 1e-3  # the task changes the model

    for folder, task in ((tmp_path / "gps-peft", gps), (tmp_path / "lora-peft", lora)):  # the way back
        back = import_peft(folder, tmp_path / f"{task.stem}-back.safetensors", model=toy_base())
        model = sparseft.merge(sparseft.load(back, toy_base())).eval()
        with torch.no_grad():
            assert (model(x) - _merged_logits(task, x)).abs().max() <= 1e-6
    original = sparseft.read_delta(gps).tensors
    back = sparseft.read_delta(tmp_path / "gps-back.safetensors").tensors
    for name in [k for k in original if k.startswith("sparse/")]:  # padding dropped: the same entries again
        assert torch.equal(original[name], back[name].to(original[name].dtype)), name


def test_conv_entries_are_carried_whole_by_default_while_small_and_refused_otherwise(tmp_path, monkeypatch):
    task = write_task("gps", tmp_path / "gps.safetensors")  # GPS selects in the patch-embedding conv too
    # the toy ViT's patch embedding is 16 % of its values (a ViT-S/16's is 1.3 %): over the default share
    with pytest.raises(ExportError, match=r"patch_embed\.proj\.weight.*SHiRA adapts only nn\.Linear.*16% of the "
                                          r"base model.*--dense"):
        export_peft(task, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match=r"--no-dense was given"):
        export_peft(task, tmp_path / "out", dense=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("sparseft.export.peft.AUTO_DENSE_SHARE", 0.2)
    for dense, out in ((None, tmp_path / "auto"), (True, tmp_path / "out")):
        done = export_peft(task, out, dense=dense)
        assert "patch_embed.proj.weight" in done.whole
    from peft import PeftModel

    x = torch.randn(2, 3, 32, 32)
    for out in (tmp_path / "auto", tmp_path / "out"):
        model = PeftModel.from_pretrained(toy_base(), out).eval()
        with torch.no_grad():
            assert (model(x) - _merged_logits(task, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_a_real_vit_patch_embedding_is_within_the_default_dense_share(name):
    import timm

    from sparseft.export.peft import AUTO_DENSE_SHARE

    with torch.device("meta"):
        model = timm.create_model(name)
    total = sum(p.numel() for p in model.parameters())
    assert model.patch_embed.proj.weight.numel() / total <= AUTO_DENSE_SHARE


@pytest.mark.parametrize("dense", [False, True])
def test_a_cnn_task_without_a_linear_entry_is_refused_even_with_dense(tmp_path, dense):
    model = tiny_model("resnet", num_classes=3)
    sparseft.apply(model, random_selection(model, k=1))
    task = sparseft.save_delta(model, tmp_path / "cnn.safetensors")
    with pytest.raises(ExportError, match="no sparse entry lies in an nn.Linear weight.*--format onnx"):
        export_peft(task, tmp_path / "out", model=tiny_model("resnet", num_classes=3), dense=dense)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["adapter", "vpt-shallow", "full"])
def test_methods_without_a_peft_form_are_refused_with_the_reason(tmp_path, method):
    task = write_task(method, tmp_path / "t.safetensors")
    with pytest.raises(ExportError, match=f"a {method} task has no peft form: "):
        export_peft(task, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shira_adapter_made_by_peft_imports_as_a_task(tmp_path):
    from peft import ShiraConfig, get_peft_model

    base = toy_base()
    config = ShiraConfig(r=2, target_modules=["qkv", "fc2"], modules_to_save=["head"], random_seed=5)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "shira_weight" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(tmp_path / "theirs")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = peft_model.eval()(x)
    task = import_peft(tmp_path / "theirs", tmp_path / "t.safetensors", model=toy_base())
    bank = sparseft.TaskBank(toy_base())
    bank.add("theirs", task)
    bank.use("theirs")
    with torch.no_grad():
        assert (bank.model.eval()(x) - want).abs().max() <= 1e-5


def test_an_export_imported_onto_another_base_is_refused(tmp_path):
    export_peft(_task("gps", tmp_path / "g.safetensors", k=1, select_patch_embed=False), tmp_path / "g-peft")
    with pytest.raises(ExportError, match="another base"):
        import_peft(tmp_path / "g-peft", tmp_path / "u.safetensors", model=toy_base(seed=9))
    assert not (tmp_path / "u.safetensors").exists()


def test_cli_export_and_import_peft(tmp_path, capsys):
    from sparseft.cli import main

    task = _task("gps", tmp_path / "g.safetensors", k=1, select_patch_embed=False)
    assert main(["export", str(task), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peft_type"] == "SHIRA" and report["adapter_bytes"] > 0
    assert main(["export", str(task), "--format", "peft", "--out", str(tmp_path / "p")]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-peft", str(tmp_path / "p"), "--out", str(tmp_path / "back.safetensors")]) == 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        back = sparseft.merge(sparseft.load(tmp_path / "back.safetensors")).eval()(x)
    assert (back - _merged_logits(task, x)).abs().max() <= 1e-6


def test_a_peft_export_gets_the_permissions_of_the_umask(tmp_path):
    """Every file of the folder as open() makes it: safetensors' writer alone makes adapter_model.safetensors 0600."""
    import os

    task = _task("gps", tmp_path / "g.safetensors", k=1, select_patch_embed=False)
    old = os.umask(0o022)
    try:
        export_peft(task, tmp_path / "p")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir()}
    assert modes == {"adapter_model.safetensors": 0o644, "adapter_config.json": 0o644, "README.md": 0o644}
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o755


def test_import_peft_out_a_folder_is_refused_as_a_folder_before_any_work(tmp_path, capsys):
    from sparseft.cli import main

    task = _task("gps", tmp_path / "g.safetensors", k=1, select_patch_embed=False)
    export_peft(task, tmp_path / "p")
    folder = tmp_path / "out"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["import-peft", str(tmp_path / "p"), "--out", str(folder), *extra]) == 1
        err = capsys.readouterr().err
        assert str(folder) in err and "is a folder" in err and "pass --overwrite" not in err
    with pytest.raises(sparseft.errors.SparseftError, match="is a folder"):
        import_peft(tmp_path / "p", folder, overwrite=True)
    assert list(folder.iterdir()) == []


def test_a_truncated_adapter_file_is_refused_naming_it(tmp_path, capsys):
    from sparseft.cli import main

    task = _task("gps", tmp_path / "g.safetensors", k=1, select_patch_embed=False)
    export_peft(task, tmp_path / "p")
    adapter = tmp_path / "p" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    out = tmp_path / "back.safetensors"
    capsys.readouterr()
    assert main(["import-peft", str(tmp_path / "p"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {adapter}: not a readable safetensors file, truncated or corrupt")
    assert "\n" not in err
    assert not out.exists()


def test_the_cards_recipe_for_an_offline_vit_builds_the_same_base():
    """The card tells a user without sparseft to resample the stored position grid bicubic without
    antialiasing; that base gives sparseft's logits (timm's antialiased default would not)."""
    import timm
    from timm.layers import resample_abs_pos_embed

    from sparseft.export.peft import _base_recipe
    from sparseft.hub import cached_weights

    name = "dinov2_vits14_offline"
    path = cached_weights(name)
    if path is None:
        pytest.skip(f"{name} is not cached; run `sparseft weights fetch {name}`")
    recipe = _base_recipe({"model": name, "num_classes": 0, "img_size": 56})
    assert "antialias=False" in recipe and "resample_abs_pos_embed" in recipe
    state = load_file(path)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (4, 4), num_prefix_tokens=1,
                                                interpolation="bicubic", antialias=False)
    plain = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56).eval()
    plain.load_state_dict(state)
    ours = sparseft.create_model(name, num_classes=0, img_size=56).eval()
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours(x), rtol=1e-5, atol=1e-5)
