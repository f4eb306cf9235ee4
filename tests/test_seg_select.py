"""GPS on masks: region SupCon and pixel cross-entropy scores, and a whole run on a tiny task."""

import json

import numpy as np
import pytest
import torch
from helpers import SEG_CLASSES, make_seg_task
from PIL import Image

import sparseft
from sparseft.run import RunSpec, evaluate_task, run
from sparseft.seg import create_segmentation_model
from sparseft.seg.selection import IGNORE_INDEX, region_features, region_supcon_loss
from sparseft.selection import SelectionError
from sparseft.train import TrainConfig


def test_region_features_average_each_class_region():
    fmap = torch.arange(2 * 4, dtype=torch.float32).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    masks = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, IGNORE_INDEX, IGNORE_INDEX],
                           [2, 2, IGNORE_INDEX, IGNORE_INDEX]]])
    feats, labels = region_features(fmap, masks, 3)
    assert labels.tolist() == [0, 1, 2]
    assert feats[1].tolist() == [0.0, 4.0] and feats[2].tolist() == [2.0, 6.0]  # one grid cell each
    assert feats[0].tolist() == [1.0, 5.0]  # background fills the top-right cell only; ignore counts for nothing


def test_region_supcon_pulls_same_class_regions_together():
    torch.manual_seed(0)
    masks = torch.zeros(4, 8, 8, dtype=torch.long)
    masks[:, :4] = torch.tensor([1, 2, 1, 2])[:, None, None]
    aligned = torch.zeros(4, 3, 2, 2)
    aligned[:, 0, :1] = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None]  # class 1 and 2 regions apart
    aligned[:, 1, 1:] = 1.0  # background
    mixed = torch.randn(4, 3, 2, 2)
    assert region_supcon_loss(aligned, masks, 3) < region_supcon_loss(mixed, masks, 3)


@pytest.mark.parametrize("loss", ["supcon", "ce"])
def test_gps_scores_a_segmentation_model(loss):
    torch.manual_seed(0)
    model = create_segmentation_model("test_vit", num_classes=3, img_size=32)
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    masks[:, 8:20, 8:20] = torch.tensor([1, 2, 1, 2])[:, None, None]
    x = torch.randn(4, 3, 32, 32)
    batches = [([x, x.flip(-1)], [masks, masks.flip(-1)])]
    sel = sparseft.select(model, batches, k=1, loss=loss, progress=False)
    assert sel.num_sparse > 0 and all(not n.startswith("decode_head") for n in sel.indices)
    decoder = {n for n, _ in model.named_parameters() if n.startswith("decode_head.")}
    assert decoder <= set(sel.full)  # the decoder is the head: it trains in full


def test_bad_masks_in_a_selection_batch_are_refused():
    model = create_segmentation_model("test_vit", num_classes=3, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(SelectionError, match="masks must be integer class maps"):
        sparseft.select(model, [([x, x], [torch.zeros(2, 32, 32), torch.zeros(2, 32, 32)])], k=1, progress=False)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, :8] = 1
    with pytest.raises(SelectionError, match="no longer match their masks"):  # views made from the images alone
        sparseft.select(model, [(x, masks)], k=1, progress=False)
    assert sparseft.select(model, [(x, masks)], k=1, loss="ce", progress=False).num_sparse > 0  # one view: fine


def test_automatic_chunks_count_images_not_views(monkeypatch):
    from sparseft.selection import scores

    seen = []
    monkeypatch.setattr(scores, "auto_chunk", lambda model, forward, x, images, scored: seen.append(images))
    model = create_segmentation_model("test_vit", num_classes=3, img_size=32)
    x, masks = torch.randn(6, 3, 32, 32), torch.randint(0, 3, (6, 32, 32))
    sparseft.select(model, [([x, x.flip(-1)], [masks, masks.flip(-1)])], k=1, progress=False)
    assert seen == [6]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gps", "lora"])
def test_a_whole_run_on_segmentation_data(tmp_path, method):
    data = make_seg_task(tmp_path / "seg", size=40)  # the model runs at 32 px, scores are taken at the data's 40
    spec = RunSpec(model="test_vit", data=str(data), method=method, img_size=32, batch_size=4,
                   options={"k": 1} if method == "gps" else {"lora_r": 2},
                   train=TrainConfig(epochs=2, lr=3e-3, progress=False))
    summary = run(spec, tmp_path / "run")
    final = summary["final"]
    assert summary["task"] == "segmentation" and summary["metric"] == "mIoU"
    assert 0.0 <= final["test_mIoU"] <= 1.0 and 0.0 <= final["test_acc"] <= 1.0
    assert {"test_mDice", "test_mIoU_per_image", "test_mDice_per_image"} <= set(final)
    header = json.loads((tmp_path / "run" / "config.json").read_text())
    assert header["task"] == "segmentation"
    if method == "gps":
        assert summary["selected_entries"] > 0
    from sparseft.seg.figure import prediction_figure

    png = prediction_figure({method: tmp_path / "run" / "delta.safetensors"}, str(data), tmp_path / "fig.png",
                            n_images=2)
    assert png.stat().st_size > 1000
    # the task file alone rebuilds the model; evaluated merged it gives the run's numbers
    again = evaluate_task(tmp_path / "run" / "delta.safetensors", str(data), "test")
    assert again["mIoU"] == pytest.approx(final["test_mIoU"], abs=1e-6)
    assert again["acc"] == pytest.approx(final["test_acc"], abs=1e-6)
    with pytest.raises(ValueError, match="segmentation task"):
        evaluate_task(tmp_path / "run" / "delta.safetensors", str(data), "test", preprocessing="fgvc")
    model = sparseft.load(tmp_path / "run" / "delta.safetensors")
    assert model.class_names == SEG_CLASSES  # the metrics know the background class
    with pytest.raises(ValueError, match="predict gives the classes of whole images"):
        sparseft.predict(model, torch.randn(1, 3, 32, 32))
    # merged, the task gives the logits it gives applied; unmerged, the base comes back bit for bit
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        applied = model(x)
        sparseft.merge(model)
        merged = model(x)
        sparseft.unmerge(model)
        base_logits = model(x)
    torch.testing.assert_close(merged, applied, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base_logits, applied, atol=1e-4)  # the task changed something
    base = sparseft.unmerge(sparseft.load(tmp_path / "run" / "delta.safetensors"))
    assert model.state_dict().keys() == base.state_dict().keys()
    for name, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # `sparseft predict` writes one mask PNG per image; scored against the ground truth they give eval's mIoU
    from sparseft.cli import main
    from sparseft.seg import SegMetrics

    stems = (data / "test.txt").read_text().split()
    images = [str(data / "images" / f"{stem}.png") for stem in stems]
    task = str(tmp_path / "run" / "delta.safetensors")
    assert main(["predict", task, *images, "--out", str(tmp_path / "masks"), "--no-progress"]) == 0
    metrics = SegMetrics(3, class_names=SEG_CLASSES)
    for stem in stems:
        with Image.open(tmp_path / "masks" / f"{stem}.png") as png:
            assert png.mode == "P" and png.size == (40, 40)
            pred = torch.from_numpy(np.asarray(png).astype(np.int64))
        truth = torch.from_numpy(np.asarray(Image.open(data / "masks" / f"{stem}.png")).astype(np.int64))
        metrics.update(pred, truth)
    assert metrics.compute()["mIoU"] == pytest.approx(again["mIoU"], abs=1e-6)
    assert main(["predict", task, images[0], "--out", str(tmp_path / "masks"), "--no-progress"]) == 1  # exists
    assert main(["predict", task, images[0], "--no-progress"]) == 1  # no folder named
    with Image.open(images[0]) as img:  # a wide image gets a wide mask, at its own size
        img.convert("RGB").resize((52, 30)).save(tmp_path / "wide.png")
    assert main(["predict", task, str(tmp_path / "wide.png"), "--out", str(tmp_path / "wide"), "--no-progress"]) == 0
    with Image.open(tmp_path / "wide" / "wide.png") as png:
        assert png.mode == "P" and png.size == (52, 30)


@pytest.mark.slow
def test_a_segmentation_suite_tunes_on_val_miou_and_reports_it(tmp_path):
    from sparseft.bench import load_suite, run_suite, write_report

    data = make_seg_task(tmp_path / "seg")
    (tmp_path / "suite.yaml").write_text(f"""
name: tiny-seg
tasks: {{natural: ["{data}"]}}
backbones: [{{name: test_vit, img_size: 32}}]
train: {{epochs: 1, batch_size: 4, warmup_epochs: 0}}
grid: {{lr: [1.0e-3, 3.0e-3]}}
extend_edges: 0
methods: [{{label: gps, method: gps, options: {{k: 1}}}}]
seeds: [0]
""")
    (record,) = run_suite(load_suite(tmp_path / "suite.yaml"), tmp_path / "res", progress=False)
    final = json.loads((tmp_path / "res" / record["final_dir"] / "summary.json").read_text())["final"]
    assert record["metric"] == "mIoU" and record["test_acc"] == final["test_mIoU"]
    tune = [json.loads(p.read_text())["final"] for p in sorted((tmp_path / "res").glob("**/tune/*/summary.json"))]
    assert [t["point"] for t in record["tuning"]] == [{"lr": 1e-3}, {"lr": 3e-3}]
    assert [t["val_acc"] for t in record["tuning"]] == [t["val_mIoU"] for t in tune]
    text = write_report(tmp_path / "res").read_text()
    assert "mIoU (dataset-level, without a background class) (%) on each task's test split" in text
    assert record["test_scores"]["mDice"] == final["test_mDice"] and record["test_scores"]["acc"] == final["test_acc"]
    head = next(line for line in text.splitlines() if line.startswith("| method | params % | "))
    assert "| mDice |" in head and "| pixel acc |" in head and "| mIoU_per_image |" in head
    section = text[text.index("### Other test scores"):].splitlines()
    row = next(line for line in section if line.startswith("| gps | ")).split(" | ")
    assert row[head.split(" | ").index("mDice")] == f"{100 * final['test_mDice']:.1f}"  # one seed: no ± std
    (figure,) = (tmp_path / "res").glob("predictions_*.png")
    assert f"![{figure.name}]({figure.name})" in text


def test_mask_prediction_refusals(tmp_path):
    from pathlib import Path

    from sparseft.seg import predict_masks
    from sparseft.seg.predict import check_destinations, mask_file_names

    with pytest.raises(ValueError, match="would both write x.png"):
        mask_file_names([Path("a/x.png"), Path("b/x.jpg")])
    with pytest.raises(ValueError, match="would both write"):
        mask_file_names([Path("a/X.png"), Path("b/x.jpg")])  # one file on macOS and Windows
    photo = tmp_path / "photos" / "p.png"
    photo.parent.mkdir()
    Image.new("RGB", (8, 6)).save(photo)
    with pytest.raises(ValueError, match="is an input image"):
        check_destinations([photo], photo.parent, overwrite=True)
    with pytest.raises(ValueError, match="needs a segmentation model"):
        predict_masks(sparseft.create_model("test_vit", 3, img_size=32), [Image.new("RGB", (8, 8))])
    model = create_segmentation_model("test_vit", num_classes=3, img_size=32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = Image.new("RGB", (20, 12))
    preds = predict_masks(model, [good, broken, good], on_error="skip")
    assert [p.error is None for p in preds] == [True, False, True]  # input order kept
    assert preds[0].mask.shape == (12, 20) and preds[0].mask.dtype == np.uint8
    assert "broken.png" in preds[1].error
