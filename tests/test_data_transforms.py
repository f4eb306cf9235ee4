"""Preprocessing per protocol and the two-view transform GPS uses."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from helpers import make_vtab
from PIL import Image
from torch.utils.data import DataLoader

from sparseft.data import TwoViews, build_transform, data_config, load_split

CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
       "crop_pct": 0.875}


def _img(w: int = 40, h: int = 30, value: int | None = None) -> Image.Image:
    if value is not None:
        return Image.new("RGB", (w, h), (value, value, value))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_data_config_from_model_uses_its_real_input_size():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=2)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    from_cfg = data_config(model.pretrained_cfg)
    assert from_cfg["input_size"] == (3, 224, 224) and from_cfg["crop_pct"] == pytest.approx(0.9)
    assert data_config()["mean"] == (0.485, 0.456, 0.406)


def test_vtab_resizes_to_square_without_augmentation():
    t_train = build_transform(CFG, "vtab", train=True)
    t_test = build_transform(CFG, "vtab", train=False)
    img = _img()
    a, b = t_train(img), t_test(img)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and torch.equal(a, t_train(img))  # deterministic, same for train and test
    assert build_transform(CFG, "vtab", train=True, img_size=16)(img).shape == (3, 16, 16)
    assert build_transform(CFG, "vtab", train=True, img_size=(8, 12))(img).shape == (3, 8, 12)


def test_normalisation_uses_the_backbone_mean_std():
    grey = _img(value=255)
    out = build_transform(CFG, "vtab", train=False)(grey)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)  # (1 - 0.5) / 0.5
    cfg = {**CFG, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    out = build_transform(cfg, "fgvc", train=False)(_img(value=0))
    expected = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)


def test_fgvc_train_is_random_and_test_is_centre_crop():
    img = _img(80, 60)
    train = build_transform(CFG, "fgvc", train=True)
    torch.manual_seed(0)
    views = [train(img) for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert not all(torch.equal(views[0], v) for v in views[1:])
    test = build_transform(CFG, "fgvc", train=False)
    out = test(img)
    assert out.shape == (3, 32, 32) and torch.equal(out, test(img))
    # resize shorter side to 32 / 0.875 = 36, then centre crop 32: compare with doing it by hand
    from torchvision.transforms import functional as F

    by_hand = F.center_crop(F.resize(img, 36, interpolation=F.InterpolationMode.BICUBIC), [32, 32])
    ref = (F.to_tensor(by_hand) - 0.5) / 0.5
    assert torch.allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="protocol"):
        build_transform(CFG, "imagenet", train=True)  # type: ignore[arg-type]


def test_two_views_are_different_and_batch_as_a_pair(tmp_path):
    two = TwoViews.from_config(CFG, img_size=16)
    torch.manual_seed(0)
    v1, v2 = two(_img())
    assert v1.shape == v2.shape == (3, 16, 16) and not torch.equal(v1, v2)
    task = make_vtab(tmp_path / "task")
    ds = load_split(str(task), "train800val200", two)
    views, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert isinstance(views, list) and len(views) == 2
    assert views[0].shape == views[1].shape == (4, 3, 16, 16) and labels.shape == (4,)


def test_two_views_colour_jitter_and_greyscale_happen():
    two = TwoViews(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    img = Image.new("RGB", (16, 16), (200, 40, 40))  # flat red: crops and flips cannot change it
    torch.manual_seed(1)
    outs = [v for _ in range(20) for v in two(img)]
    changed = [not torch.allclose(o, outs[0]) for o in outs]
    grey = [torch.allclose(o[0], o[1]) and torch.allclose(o[1], o[2]) for o in outs]
    assert any(changed) and any(grey) and not all(grey)
