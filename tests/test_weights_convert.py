"""`sparseft weights convert`: your own checkpoint onto a timm architecture, verified, for --weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import make_vtab, write_png
from safetensors.torch import load_file, save_file

from sparseft.cli import main
from sparseft.data import data_config
from sparseft.errors import InputError
from sparseft.hub.userweights import convert_checkpoint, convert_file
from sparseft.hub.verify import class_index
from sparseft.models import create_model
from sparseft.seg.model import create_segmentation_model
from sparseft.weights import RECORD_KEY, WeightsError, read_checkpoint, weights_record

ARCH = "mobilenetv2_050"  # a real timm architecture, small enough to build in a test


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A randomly initialised mobilenetv2_050 state dict with BatchNorm statistics that are not the defaults."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    state = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k.endswith(("running_mean", "running_var")):
                v.copy_(torch.rand_like(v) + 0.5)
            elif k.endswith("num_batches_tracked"):
                v.fill_(11)
    return {k: v.clone() for k, v in state.items()}


def _anonymous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch-like: other module names, same order and kinds, no BN counters."""
    return {f"_blocks.{i}._layer.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())
            if not k.endswith("num_batches_tracked")}


def _folder_is(path: Path, names: set[str]) -> None:
    assert {p.name for p in path.iterdir()} == names  # nothing written beside, no temporary file left


def _same(out: Path, state: dict[str, torch.Tensor], counters: bool = True) -> None:
    written = load_file(str(out))
    assert set(written) == set(state)
    for k, v in state.items():
        if counters or not k.endswith("num_batches_tracked"):
            assert torch.equal(written[k], v), k


# -- matching ----------------------------------------------------------------------------------

def test_by_name_without_a_wrapper_and_prefix(tmp_path: Path, source) -> None:
    src = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.items()}}, src)
    result = convert_file(src, ARCH, tmp_path / "out.safetensors")
    _same(tmp_path / "out.safetensors", source)
    assert result.mapping == "by name, without the prefix 'module.'" and result.num_classes == 1000
    record = weights_record(tmp_path / "out.safetensors")
    assert record["architecture"] == ARCH and record["source"]["nested_under"] == ["state_dict"]
    assert record["data_config"]["input_size"] == [3, 224, 224]  # timm's for the architecture


def test_by_order_like_efficientnet_pytorch(tmp_path: Path, source) -> None:
    src = tmp_path / "lite.pth"
    torch.save(_anonymous(source), src)
    result = convert_file(src, ARCH, tmp_path / "out.safetensors")
    assert result.mapping == "by order and shape"
    assert result.filled_counters == sum(k.endswith("num_batches_tracked") for k in source)
    _same(tmp_path / "out.safetensors", source, counters=False)


def test_npz_keeps_its_order(tmp_path: Path, source) -> None:
    src = tmp_path / "w.npz"
    np.savez(src, **{k.replace(".", "_"): v.numpy() for k, v in _anonymous(source).items()})
    with pytest.raises(WeightsError, match="different kinds"):  # names lost their kind: refused, not guessed
        convert_checkpoint(src, ARCH)
    np.savez(src, **{k: v.numpy() for k, v in _anonymous(source).items()})
    assert convert_checkpoint(src, ARCH).mapping == "by order and shape"


def test_the_head_follows_the_source(tmp_path: Path, source) -> None:
    headless = {k: v for k, v in source.items() if not k.startswith("classifier.")}
    torch.save(headless, tmp_path / "backbone.pth")
    result = convert_file(tmp_path / "backbone.pth", ARCH, tmp_path / "backbone.safetensors")
    assert result.num_classes == 0 and not any(k.startswith("classifier.") for k in result.state)
    ten = dict(source, **{"classifier.weight": torch.randn(10, 1280), "classifier.bias": torch.randn(10)})
    torch.save(_anonymous(ten), tmp_path / "ten.pth")
    assert convert_checkpoint(tmp_path / "ten.pth", ARCH).num_classes == 10  # by order too
    image = write_png(tmp_path / "img.png", size=40)
    assert convert_checkpoint(tmp_path / "backbone.pth", ARCH, check=image).check["features"] == [1280]
    with pytest.raises(InputError, match="--check-class needs a classifier head; the converted model has none"):
        convert_checkpoint(tmp_path / "backbone.pth", ARCH, check=image, check_class=3)
    model = create_model(ARCH, 5, weights=tmp_path / "backbone.safetensors")  # a new 5-class head on it
    assert torch.equal(model.state_dict()["conv_stem.weight"], source["conv_stem.weight"])


# -- refusals: the culprit named, nothing written -------------------------------------------------

def test_a_tensor_left_over_is_named(tmp_path: Path, source) -> None:
    torch.save(dict(source, **{"extra.weight": torch.zeros(3)}), tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"1 tensor\(s\) left over, with no place in mobilenetv2_050: extra\.weight"):
        convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "out.safetensors")
    _folder_is(tmp_path, {"ckpt.pth"})


def test_a_missing_tensor_is_named(tmp_path: Path, source) -> None:
    torch.save({k: v for k, v in source.items() if k != "blocks.1.0.bn1.weight"}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"1 mobilenetv2_050 tensor\(s\) not filled: blocks\.1\.0\.bn1\.weight"):
        convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "out.safetensors")
    _folder_is(tmp_path, {"ckpt.pth"})


def test_shape_mismatches_are_named(tmp_path: Path, source) -> None:
    torch.save(dict(source, **{"conv_stem.weight": torch.zeros(16, 3, 5, 5)}), tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"conv_stem\.weight \[16, 3, 5, 5\] vs \[16, 3, 3, 3\]"):
        convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "out.safetensors")
    _folder_is(tmp_path, {"ckpt.pth"})


def test_by_order_a_count_that_fits_neither_head(tmp_path: Path, source) -> None:
    anon = _anonymous(source)
    anon["_extra.weight"] = torch.zeros(3)
    torch.save(anon, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"ckpt\.pth: does not map one-to-one: by name 0 % .*by order: 263 tensors "
                                           r"\(BN counters aside\), mobilenetv2_050 has 262 with its classifier and "
                                           "260 without"):
        convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "out.safetensors")
    _folder_is(tmp_path, {"ckpt.pth"})


def test_a_sparseft_task_or_selection_file_is_named_as_one(tmp_path: Path) -> None:
    """Not "does not map one-to-one": a task file holds a task's changes, a selection file no weights at all."""
    from helpers import random_selection, tiny_model

    import sparseft

    model = tiny_model("vit")
    selection = random_selection(model, k=1)
    selection.save(tmp_path / "selection.safetensors")
    sparseft.apply(model, selection)
    task = sparseft.save_delta(model, tmp_path / "delta.safetensors")
    with pytest.raises(WeightsError, match=rf"delta.safetensors: a sparseft task file \(a task's changes to its base "
                                           rf"model, not a checkpoint of full weights\).*`sparseft merge {task} --out"):
        convert_checkpoint(task, ARCH)
    with pytest.raises(WeightsError, match="selection.safetensors: a sparseft selection file"):
        convert_checkpoint(tmp_path / "selection.safetensors", ARCH)


def test_safetensors_are_never_paired_by_position(tmp_path: Path, source) -> None:
    save_file({k: v.contiguous() for k, v in _anonymous(source).items()}, str(tmp_path / "anon.safetensors"))
    with pytest.raises(WeightsError, match="keeps its tensors sorted by name"):
        convert_checkpoint(tmp_path / "anon.safetensors", ARCH)
    save_file(source, str(tmp_path / "named.safetensors"))  # by name they do
    assert convert_checkpoint(tmp_path / "named.safetensors", ARCH).mapping == "by name"


def _touch(path: str) -> None:
    Path(path).touch()


def test_timms_own_filter_when_it_keeps_every_value(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    flat = dict(state, **{"patch_embed.proj.weight": state["patch_embed.proj.weight"].reshape(192, -1)})
    torch.save(flat, tmp_path / "flat.pth")  # an older layout timm's checkpoint_filter_fn reshapes
    result = convert_file(tmp_path / "flat.pth", "vit_tiny_patch16_224", tmp_path / "vit.safetensors")
    assert result.mapping == "by timm's checkpoint_filter_fn for the architecture"
    _same(tmp_path / "vit.safetensors", state)
    small = dict(state, pos_embed=torch.randn(1, 50, 192))  # the filter would resample it: not one-to-one
    torch.save(small, tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"does not map one-to-one by name: 1 tensor\(s\) of another shape than "
                                           r"vit_tiny_patch16_224's: pos_embed \[1, 50, 192\] vs \[1, 197, 192\]$"):
        convert_checkpoint(tmp_path / "small.pth", "vit_tiny_patch16_224")


class _Payload:
    """Unpickling this would create a marker file: the refusal must come before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_a_pickle_with_python_objects_is_refused_unrun(tmp_path: Path, source) -> None:
    torch.save({"state_dict": source, "hook": _Payload(tmp_path / "ran")}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"ckpt\.pth: holds a Python object \(\S*test_weights_convert\._touch\) "
                                           r"that only full unpickling could rebuild.*reads tensors only"):
        convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "out.safetensors")
    _folder_is(tmp_path, {"ckpt.pth"})  # no marker: nothing was run
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "objects.npy", tmp_path / "objects.npz")
    with pytest.raises(WeightsError, match="objects.npz"):
        read_checkpoint(tmp_path / "objects.npz")


def test_unknown_models_and_bad_files(tmp_path: Path, source) -> None:
    torch.save(source, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match="unknown model 'no_such_net': not a timm architecture"):
        convert_checkpoint(tmp_path / "ckpt.pth", "no_such_net")
    with pytest.raises(WeightsError, match="offline backbone: convert for its architecture mobilenetv2_100"):
        convert_checkpoint(tmp_path / "ckpt.pth", "mobilenetv2_100_offline")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"text\.pth: not a PyTorch checkpoint"):
        convert_checkpoint(tmp_path / "text.pth", ARCH)
    torch.save(dict(source, **{"blocks.0.0.conv_dw.weight": torch.full_like(source["blocks.0.0.conv_dw.weight"],
                                                                          float("nan"))}), tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match=r"NaN or infinite values: blocks\.0\.0\.conv_dw\.weight"):
        convert_checkpoint(tmp_path / "nan.pth", ARCH)


def test_the_output_path_is_checked_before_any_work(tmp_path: Path, source) -> None:
    src = tmp_path / "ckpt.pth"
    torch.save(source, src)
    for out, message in [(tmp_path / "w.pth", "must end in .safetensors"), (tmp_path, "is a folder")]:
        with pytest.raises(InputError, match=message):
            convert_file(src, ARCH, out)
    (tmp_path / "old.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        convert_file(src, ARCH, tmp_path / "old.safetensors")
    assert (tmp_path / "old.safetensors").read_bytes() == b"keep"
    convert_file(src, ARCH, tmp_path / "old.safetensors", overwrite=True)
    assert weights_record(tmp_path / "old.safetensors")["architecture"] == ARCH


# -- the data config --------------------------------------------------------------------------------

def test_data_config_from_the_file_then_the_caller_then_timm(tmp_path: Path, source) -> None:
    cfg = {"input_size": [3, 96, 96], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    torch.save({"pretrained_cfg": cfg, "state_dict": source}, tmp_path / "ckpt.pth")
    result = convert_checkpoint(tmp_path / "ckpt.pth", ARCH, data_config={"std": (0.5, 0.5, 0.5)})
    assert result.data_config["input_size"] == (3, 96, 96) and result.data_config["mean"] == (0.5, 0.5, 0.5)
    assert result.data_config["std"] == (0.5, 0.5, 0.5) and result.config_from["std"] == "given"
    assert result.config_from["input_size"] == "ckpt.pth (pretrained_cfg)"
    assert result.config_from["crop_pct"] == "timm's pretrained config of mobilenetv2_050"
    assert result.notes == ["std (0.5, 0.5, 0.5) given overrides the (0.25, 0.25, 0.25) recorded in ckpt.pth "
                            "(pretrained_cfg)"]
    for bad, message in [({"std": (0.5, 0, 0.5)}, "std"), ({"input_size": 0}, "input_size"),
                         ({"crop_pct": 1.5}, "crop_pct"), ({"interpolation": "cubic"}, "interpolation")]:
        with pytest.raises(InputError, match=f"--{message.replace('_', '-')}: {message} .* not a valid"):
            convert_checkpoint(tmp_path / "ckpt.pth", ARCH, data_config=bad)
    cfg["mean"] = [0.5, 0.5]
    torch.save({"pretrained_cfg": cfg, "state_dict": source}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"bad\.pth \(pretrained_cfg\): mean"):
        convert_checkpoint(tmp_path / "bad.pth", ARCH)


def test_weights_bring_their_data_config_and_img_size_wins(tmp_path: Path, source) -> None:
    torch.save(source, tmp_path / "ckpt.pth")
    convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "w.safetensors",
                 data_config={"input_size": 260, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    model = create_model(ARCH, 7, weights=tmp_path / "w.safetensors")
    assert data_config(model)["input_size"] == (3, 260, 260) and data_config(model)["mean"] == (0.5, 0.5, 0.5)
    model = create_model(ARCH, 7, img_size=56, weights=tmp_path / "w.safetensors")
    assert data_config(model)["input_size"] == (3, 56, 56) and data_config(model)["std"] == (0.5, 0.5, 0.5)
    assert data_config(create_model(ARCH, 7, img_size=56))["input_size"] == (3, 56, 56)  # plain timm CNNs too
    with pytest.raises(WeightsError, match=r"w\.safetensors: converted for mobilenetv2_050, not mobilenetv2_100; "
                                           "use --model mobilenetv2_050"):
        create_model("mobilenetv2_100", 7, weights=tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="converted for mobilenetv2_050, not mobilenetv2_100"):
        create_model("mobilenetv2_100_offline", 7, weights=tmp_path / "w.safetensors")  # an offline name's too
    seg = create_segmentation_model(ARCH, 3, img_size=32, weights=tmp_path / "w.safetensors")
    assert data_config(seg)["input_size"] == (3, 32, 32) and data_config(seg)["mean"] == (0.5, 0.5, 0.5)
    plain = timm.create_model(ARCH, pretrained=False)
    plain.load_state_dict(load_file(str(tmp_path / "w.safetensors")))  # a plain state dict too
    assert torch.equal(plain.state_dict()["conv_stem.weight"], source["conv_stem.weight"])


def test_a_timm_hub_folder_brings_its_config(tmp_path: Path, source) -> None:
    save_file(source, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": ARCH, "pretrained_cfg": {
        "input_size": [3, 192, 192], "interpolation": "bilinear", "crop_pct": 1.0}}))
    result = convert_checkpoint(tmp_path / "model.safetensors", ARCH)
    assert result.data_config["input_size"] == (3, 192, 192) and result.data_config["crop_pct"] == 1.0
    assert result.config_from["interpolation"] == "config.json beside model.safetensors"
    assert result.config_from["mean"] == "timm's pretrained config of mobilenetv2_050"


# -- the check image ------------------------------------------------------------------------------------

def test_check_image_top1_must_match(tmp_path: Path, source) -> None:
    torch.save(source, tmp_path / "ckpt.pth")
    image = write_png(tmp_path / "cat.png", size=40)
    top1 = convert_checkpoint(tmp_path / "ckpt.pth", ARCH, check=image).check["top5"][0][0]
    result = convert_checkpoint(tmp_path / "ckpt.pth", ARCH, check=image, check_class=top1)
    assert result.check["expected"][0] == top1 and len(result.check["top5"]) == 5
    other = (top1 + 1) % 1000
    with pytest.raises(WeightsError, match=rf"--check-image .*cat\.png: top-1 is {top1} .*, not {other} .*nothing "
                                           "written"):
        convert_file(tmp_path / "ckpt.pth", ARCH, tmp_path / "out.safetensors", check=image, check_class=other)
    _folder_is(tmp_path, {"ckpt.pth", "cat.png"})
    (tmp_path / "broken.png").write_bytes(b"no image")
    with pytest.raises(InputError, match=r"--check-image .*broken\.png: not a readable image"):
        convert_checkpoint(tmp_path / "ckpt.pth", ARCH, check=tmp_path / "broken.png")


def test_check_class_names() -> None:
    assert class_index("espresso", 1000) == 967 and class_index("Egyptian cat", 1000) == 285
    assert class_index("tabby", 1000) == 281 and class_index("7", 10) == 7
    with pytest.raises(InputError, match=r"--check-class 'cat': matches 7 ImageNet classes \(281 tabby, tabby cat; "
                                         r"282 tiger cat; .*\); give an index"):
        class_index("cat", 1000)
    with pytest.raises(InputError, match="matches no ImageNet class"):
        class_index("unicorn", 1000)
    with pytest.raises(InputError, match="this head has 10: give an index"):
        class_index("espresso", 10)
    with pytest.raises(InputError, match="the head has 10 classes"):
        class_index("10", 10)


# -- the command line -----------------------------------------------------------------------------------

def test_cli_convert_then_train_options_take_it(tmp_path: Path, source, capsys) -> None:
    torch.save(_anonymous(source), tmp_path / "lite.pth")
    out = tmp_path / "w.safetensors"
    assert main(["weights", "convert", str(tmp_path / "lite.pth"), "--model", ARCH, "--out", str(out),
                 "--mean", "0.5,0.5,0.5", "--input-size", "128"]) == 0
    printed = capsys.readouterr().out
    assert "matched by order and shape onto mobilenetv2_050" in printed and "input 128 px" in printed
    assert f"--model {ARCH} --weights {out}" in printed
    metadata = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()[RECORD_KEY])
    assert metadata["data_config"]["mean"] == [0.5, 0.5, 0.5] and metadata["data_config_from"]["mean"] == "given"
    assert main(["weights", "convert", str(tmp_path / "lite.pth"), "--model", ARCH, "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["weights", "convert", str(tmp_path / "lite.pth"), "--model", ARCH, "--out", str(out),
                 "--mean", "0.5,0.5"]) == 2  # argparse: three numbers
    assert main(["weights", "convert", str(tmp_path / "lite.pth"), "--model", ARCH,
                 "--out", str(tmp_path / "x.safetensors"), "--check-class", "3"]) == 1
    assert "--check-class goes with --check-image" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_run_records_the_size_it_trains_at(tmp_path: Path, source) -> None:
    """The issue's run said input size 260 (the weights') while the task trained at 56: now one size."""
    torch.save(_anonymous(source), tmp_path / "lite.pth")
    weights = tmp_path / "w.safetensors"
    assert main(["weights", "convert", str(tmp_path / "lite.pth"), "--model", ARCH, "--out", str(weights),
                 "--input-size", "260", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]) == 0
    task = make_vtab(tmp_path / "toy", n_train=6, n_val=2, n_test=3, classes=3)
    assert main(["train", "--model", ARCH, "--weights", str(weights), "--img-size", "32", "--data", str(task),
                 "--method", "linear", "--epochs", "1", "--batch-size", "3", "--warmup-epochs", "0", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["data_config"]
    assert config["input_size"] == [3, 32, 32] and config["mean"] == [0.5, 0.5, 0.5]


def test_real_efficientnet_lite0_from_its_package_file(tmp_path: Path) -> None:
    """The efficientnet_pytorch file behind `efficientnet_lite0_offline`, converted like a user's own."""
    from sparseft.hub import weights_dir

    src = weights_dir() / "sources" / "efficientnet-lite0-57934424.pth"
    cached = weights_dir() / "efficientnet_lite0_offline.safetensors"
    if not src.is_file() or not cached.is_file():
        pytest.skip("run `sparseft weights fetch efficientnet_lite0_offline --keep-source` for this test")
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    from PIL import Image

    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.png")
    result = convert_file(src, "tf_efficientnet_lite0", tmp_path / "lite0.safetensors", check=tmp_path / "coffee.png",
                          check_class="espresso")
    assert result.mapping == "by order and shape" and result.check["top5"][0][:2] == [967, "espresso"]
    reference = load_file(str(cached))
    written = load_file(str(tmp_path / "lite0.safetensors"))
    assert set(written) == set(reference) and all(torch.equal(written[k], reference[k]) for k in reference)
