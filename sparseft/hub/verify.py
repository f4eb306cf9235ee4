"""Checks that converted weights compute what their source computes.

`check_image` runs one photo through a converted classifier (`sparseft weights convert`).
The DINOv2 weights come out of an ONNX graph that is not kept after conversion, so the
conversion is checked right away: the converted timm model's final-norm tokens are compared
with the graph's own backbone output (`backbone.layernorm`) on the same inputs. The graph is
run with onnxruntime when it is installed, else with the pure-numpy `onnx.reference`
evaluator that ships with the `onnx` package (slow, but dependency-free).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparseft.errors import InputError
from sparseft.hub.convert import import_onnx
from sparseft.weights import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled photos (HWC uint8): a cat (`chelsea`) and an espresso (`coffee`).

    Raises ImportError when scikit-image is not installed.
    """
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


def preprocess(images: Sequence[np.ndarray], data_config: Mapping[str, Any]) -> torch.Tensor:
    """A batch [B, 3, H, W] made with timm's evaluation transform for `data_config`."""
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**{k: data_config[k] for k in
                                    ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                                    if k in data_config})
    return torch.stack([transform(Image.fromarray(np.asarray(im)).convert("RGB")) for im in images])


def _squash(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size (no crop) and normalise with the ImageNet statistics: [3, size, size]."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)


def _graph_output_of(graph: Any, initializer: str) -> str:
    nodes = [n for n in graph.node if initializer in n.input]
    if len(nodes) != 1:
        raise WeightsError(f"ONNX graph: expected one node using {initializer}, found {len(nodes)}")
    return nodes[0].output[0]


def run_onnx(model: Any, feeds: Mapping[str, np.ndarray], output: str) -> tuple[np.ndarray, str]:
    """Evaluate tensor `output` of an ONNX `model` (a ModelProto, whose outputs this replaces).

    Returns (value, engine used): onnxruntime when installed, else `onnx.reference`.
    """
    import onnx

    model.graph.ClearField("output")
    model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        warnings.warn("onnxruntime is not installed: checking the conversion with onnx's pure-numpy evaluator, "
                      "which takes minutes (pip install onnxruntime makes it seconds)", stacklevel=2)
        return ReferenceEvaluator(model).run([output], dict(feeds))[0], "onnx.reference"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], dict(feeds))[0], f"onnxruntime {ort.__version__}"


def compare_vit_with_onnx(onnx_path: str | Path, model: nn.Module, *, tolerance: float = 1e-4,
                          prefix: str = "backbone.") -> dict[str, Any]:
    """Max |difference| between `model.forward_features` and the ONNX graph's backbone output.

    Inputs: scikit-image's photos when available plus one seeded random image, at the graph's
    fixed input size; `model` must already take that size. Raises `WeightsError` above
    `tolerance`; returns a record of what was compared for the weights' sidecar file.
    """
    onnx = import_onnx()
    graph_model = onnx.load(str(onnx_path))
    graph_input = graph_model.graph.input[0]
    size = graph_input.type.tensor_type.shape.dim[-1].dim_value or 224
    images: dict[str, np.ndarray] = {}
    try:
        images.update({k: _squash(v, size) for k, v in sample_photos().items()})
    except ImportError:
        pass
    images["random"] = np.random.default_rng(0).standard_normal((3, size, size)).astype(np.float32)
    x = np.stack(list(images.values()))
    output = _graph_output_of(graph_model.graph, f"{prefix}layernorm.bias")
    expected, engine = run_onnx(graph_model, {graph_input.name: x}, output)
    model.eval()
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    if got.shape != expected.shape:
        raise WeightsError(f"converted model gives tokens {got.shape}, the ONNX graph {expected.shape}")
    diff = float(np.abs(got - expected).max())
    record = {"compared": f"forward_features vs ONNX tensor {output}", "engine": engine, "img_size": size,
              "inputs": list(images), "max_abs_diff": diff, "max_abs_value": float(np.abs(expected).max()),
              "tolerance": tolerance}
    if not diff <= tolerance:
        raise WeightsError(f"converted DINOv2 differs from its ONNX source by {diff:.3g} (> {tolerance})")
    return record


# -- a check image for a converted classifier --------------------------------------------------

def imagenet_names() -> list[str]:
    """ImageNet-1k class descriptions, index order (timm's bundled copy; no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def class_index(value: str | int, num_classes: int) -> int:
    """A class given as an index or, for a 1000-class head, an ImageNet name ('espresso', 'Egyptian cat')."""
    text = str(value).strip()
    if text.isdigit():
        if int(text) >= num_classes:
            raise InputError(f"--check-class {text}: the head has {num_classes} classes (0 to {num_classes - 1})")
        return int(text)
    if num_classes != 1000:
        raise InputError(f"--check-class {text!r}: names are known for ImageNet's 1000 classes only; "
                         f"this head has {num_classes}: give an index")
    names = imagenet_names()
    wanted = text.lower()
    exact = [i for i, n in enumerate(names) if wanted in [p.strip() for p in n.lower().split(",")]]
    word = re.compile(rf"\b{re.escape(wanted)}\b")
    found = exact or [i for i, n in enumerate(names) if word.search(n.lower())]
    if len(found) != 1:
        shown = "; ".join(f"{i} {names[i]}" for i in found[:5])
        raise InputError(f"--check-class {text!r}: " + (f"matches {len(found)} ImageNet classes ({shown}); "
                                                        "give an index" if found else "matches no ImageNet class"))
    return found[0]


def check_image(model: nn.Module, image: str | Path, data_config: Mapping[str, Any],
                expect: str | int | None = None) -> dict[str, Any]:
    """Run one image through the converted model: its top-5, and top-1 == `expect` when given.

    A model without head only shows that its features are finite. Raises `WeightsError` when
    the top-1 class is not `expect` (the conversion or the data config is wrong).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            pixels = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"--check-image {image}: not a readable image ({err})") from err
    classes = int(getattr(model, "num_classes", 0))
    if expect is not None and classes == 0:
        raise InputError("--check-class needs a classifier head; the converted model has none (a backbone: "
                         "features only); leave --check-class out to see that its features are finite")
    target = class_index(expect, classes) if expect is not None else None
    with torch.no_grad():
        out = model.eval()(preprocess([pixels], data_config))[0]
    if not torch.isfinite(out).all():
        raise WeightsError(f"--check-image {image}: the converted model gives non-finite outputs")
    record: dict[str, Any] = {"image": Path(image).name}
    if classes == 0:
        record["features"] = list(out.shape)
        return record
    probs = out.softmax(-1)
    names = imagenet_names() if classes == 1000 else [str(i) for i in range(classes)]
    top = probs.topk(min(5, classes))
    record["top5"] = [[int(i), names[int(i)], round(float(p), 4)] for p, i in zip(top.values, top.indices)]
    if target is not None:
        record["expected"] = [target, names[target]]
        first, name, prob = record["top5"][0]
        if first != target:
            raise WeightsError(f"--check-image {image}: top-1 is {first} {name} ({prob:.3f}), not {target} "
                               f"{names[target]}; the tensors are paired wrongly or the data config (mean/std, "
                               "size) does not fit these weights; nothing written")
    return record
