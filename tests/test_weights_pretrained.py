"""Numeric checks of the real offline backbones; each runs only when its weights are cached.

Fetch them first, e.g. `sparseft weights fetch all` (the DINOv2 ONNX comparison also needs
`--keep-source` and the `onnx` package). Uses the default cache ($SPARSEFT_CACHE).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from sparseft.hub import cached_weights, offline_model, read_sidecar, weights_dir

pytestmark = pytest.mark.slow  # end-to-end runs

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")

CAT = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup
CLASSIFIERS = ["mobilenetv2_100_offline", "mobilenetv2_tv_offline", "efficientnet_lite0_offline"]


def _need(name: str) -> None:
    if cached_weights(name) is None:
        pytest.skip(f"{name} is not cached in {weights_dir()}; run `sparseft weights fetch {name}`")


@functools.cache
def _model(name: str, num_classes: int = 1000, img_size: int | None = None) -> torch.nn.Module:
    """Built once per module: several tests look at the same backbone."""
    return offline_model(name, num_classes, img_size=img_size, fetch=False).eval()


def _photos(*names: str) -> list[np.ndarray]:
    out = []
    for name in names:
        image = getattr(skimage_data, name)()
        out.append(np.stack([image] * 3, -1) if image.ndim == 2 else image)
    return out


def _batch(model: torch.nn.Module, images: list[np.ndarray]) -> torch.Tensor:
    from timm.data import resolve_data_config

    from sparseft.hub.verify import preprocess

    return preprocess(images, resolve_data_config(model=model))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_recognises_the_photos(name: str) -> None:
    _need(name)
    model = _model(name)
    with torch.no_grad():
        probs = model(_batch(model, _photos("chelsea", "coffee"))).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert top[0] in CAT, f"chelsea (a cat) classified as {top[0]}"
    assert top[1] in COFFEE, f"coffee classified as {top[1]}"
    assert probs[0, sorted(CAT)].sum() > 0.9 and probs[1, sorted(COFFEE)].sum() > 0.9


def test_timm_and_torchvision_mobilenetv2_agree() -> None:
    _need("mobilenetv2_100_offline")
    _need("mobilenetv2_tv_offline")
    timm_model, tv_model = _model("mobilenetv2_100_offline"), _model("mobilenetv2_tv_offline")
    x = _batch(timm_model, _photos("chelsea", "astronaut"))
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), tv_model(x), atol=1e-4, rtol=1e-4)


def test_efficientnet_lite0_uses_its_own_normalisation() -> None:
    from timm.data import resolve_data_config

    _need("efficientnet_lite0_offline")
    cfg = resolve_data_config(model=offline_model("efficientnet_lite0_offline", 5, fetch=False))
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 224, 224)


def test_dinov2_conversion_was_verified_against_onnx() -> None:
    _need("dinov2_vits14_offline")
    meta = read_sidecar("dinov2_vits14_offline")
    check = meta["verification"]
    assert check["max_abs_diff"] <= 1e-4 and check["img_size"] == 224
    assert meta["weights"]["parameters"] == 22_056_192


def test_dinov2_features_find_the_other_view_of_each_photo() -> None:
    """kNN sanity at 112 px (resampled position grid): each photo's flipped crop is its nearest neighbour.

    A randomly initialised ViT-S collapses all eight images onto nearly one direction and fails this.
    """
    _need("dinov2_vits14_offline")
    model = _model("dinov2_vits14_offline", 0, 112)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    views = []
    for image in _photos("chelsea", "coffee", "astronaut", "rocket"):
        h, w = image.shape[:2]
        views += [image, np.ascontiguousarray(image[h // 10: h - h // 10, w // 10: w - w // 10][:, ::-1])]
    with torch.no_grad():
        features = torch.nn.functional.normalize(model(_batch(model, views)), dim=-1)
    sim = features @ features.T
    sim.fill_diagonal_(-2)
    assert sim.argmax(1).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]


def test_dinov2_matches_the_onnx_graph_when_the_source_is_kept() -> None:
    _need("dinov2_vits14_offline")
    pytest.importorskip("onnx", reason="the ONNX comparison needs the onnx package")
    source = weights_dir() / "sources" / "vit_s_focus.onnx"
    if not source.is_file():
        pytest.skip("ONNX source not kept; run `sparseft weights fetch dinov2_vits14_offline --keep-source`")
    from sparseft.fileutil import sha256_file
    from sparseft.hub import get_spec
    from sparseft.hub.verify import compare_vit_with_onnx

    assert sha256_file(source) == get_spec("dinov2_vits14_offline").sha256
    model = _model("dinov2_vits14_offline", 0)
    record = compare_vit_with_onnx(source, model, tolerance=1e-4)
    assert record["max_abs_diff"] <= 1e-4
