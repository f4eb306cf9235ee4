"""Converters from the weight files found in PyPI packages to timm / torchvision state dicts.

Two kinds of conversion are needed:

* Ordered renaming (`map_by_order`): torchvision's MobileNetV2 and efficientnet_pytorch's
  EfficientNet-Lite0 register their layers in the same order as timm's counterparts, so the
  i-th tensor of one is the i-th tensor of the other. A renaming by position is only safe
  when every pair agrees, so each pair is checked for shape *and* for the tensor's kind
  (the last name component: weight, bias, running_mean, ...); a single disagreement aborts.
* Reading a DINOv2 ViT-S/14 out of an exported ONNX graph (`dinov2_from_onnx_graph`): the
  exporter kept the names of biases and norms but gave the attention/MLP matrices anonymous
  names, so each matrix is identified by the named bias added right after its MatMul.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparseft.weights import WeightsError

_COUNTER = "num_batches_tracked"


def _shape(value: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _prefix(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def map_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor | Sequence[int]],
                 *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename `source` tensors to the names of `target` by position, checking every pair.

    `target` maps names to tensors or shapes, in the target model's registration order
    (`model.state_dict()`). BatchNorm `num_batches_tracked` counters are left out of the
    pairing on both sides (one side may lack them) and filled afterwards from the paired
    source module, or with 0. Raises `WeightsError` when the counts differ or any pair
    disagrees in shape or kind (weight/bias/running_mean/...), listing the first offenders.
    Returns a new dict in the target's order.
    """
    src_keys = [k for k in source if _leaf(k) != _COUNTER]
    tgt_keys = [k for k in target if _leaf(k) != _COUNTER]
    if len(src_keys) != len(tgt_keys):
        raise WeightsError(f"{what}: {len(src_keys)} tensors (without BN counters) but the target model has "
                           f"{len(tgt_keys)}; cannot map them in order")
    problems = []
    for i, (s, t) in enumerate(zip(src_keys, tgt_keys)):
        s_shape, t_shape = _shape(source[s]), _shape(target[t])
        if s_shape != t_shape:
            problems.append(f"#{i} {s} {list(s_shape)} vs {t} {list(t_shape)}")
        elif _leaf(s) != _leaf(t):
            problems.append(f"#{i} {s} vs {t} (different kinds: {_leaf(s)} / {_leaf(t)})")
    if problems:
        shown = "; ".join(problems[:5])
        raise WeightsError(f"{what}: {len(problems)} of {len(src_keys)} tensors do not pair up in order "
                           f"with the target model: {shown}{' ...' if len(problems) > 5 else ''}")
    renamed = dict(zip(tgt_keys, src_keys))
    module_source = {_prefix(t): _prefix(s) for t, s in renamed.items()}
    out: dict[str, torch.Tensor] = {}
    for t in target:
        if t in renamed:
            out[t] = source[renamed[t]]
            continue
        counter = f"{module_source.get(_prefix(t), '<none>')}.{_COUNTER}"
        out[t] = source[counter] if counter in source else torch.zeros((), dtype=torch.long)
    return out


# -- DINOv2 out of an ONNX graph -----------------------------------------------------------

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_QKV = ("query", "key", "value")
_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_IGNORED = {"embeddings.mask_token"}  # used only for masked pre-training, absent from timm


def import_onnx() -> Any:
    """The `onnx` module, or a clear error saying how to get it (only the DINOv2 conversion needs it)."""
    try:
        import onnx
    except ImportError as err:
        raise WeightsError("converting the DINOv2 backbone needs the 'onnx' package: pip install onnx "
                           "(or pip install 'sparseft[convert]')") from err
    return onnx


def hf_dinov2_tensors(graph: Any, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2 tensors (names without `prefix`) recovered from an ONNX graph.

    Named initializers under `prefix` are taken as they are. Each anonymous MatMul weight is
    named after the bias of the Add that consumes the MatMul's output (`...query.bias` ->
    `...query.weight`) and transposed to PyTorch's [out, in] layout. The two anonymous
    position-embedding pieces ([1, 1, D] for the class token, [1, N, D] for the patch grid)
    come back as `embeddings.position_embeddings`, concatenated. MatMuls whose bias lies
    outside `prefix` (a decoder) are ignored; anything ambiguous raises `WeightsError`.
    """
    from onnx import numpy_helper

    arrays = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy())

    out = {name[len(prefix):]: tensor(name) for name in arrays if name.startswith(prefix)}
    used_anonymous: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i != node.output[0]]
        if len(adds) != 1 or len(biases) != 1 or biases[0] not in arrays:
            raise WeightsError(f"ONNX MatMul {node.name or node.output[0]}: expected exactly one Add with a "
                               f"named bias after it, found {[n.name for n in adds]}")
        bias = biases[0]
        if not bias.startswith(prefix):
            continue
        if not bias.endswith(".bias"):
            raise WeightsError(f"ONNX MatMul {node.name}: the Add after it uses {bias!r}, not a bias")
        weight_name = bias[len(prefix):-len(".bias")] + ".weight"
        if weight_name in out:
            raise WeightsError(f"ONNX graph: two matrices claim the bias {bias!r}")
        weight = tensor(node.input[1])
        if weight.ndim != 2 or weight.shape[1] != out[bias[len(prefix):]].shape[0]:
            raise WeightsError(f"ONNX graph: matrix {node.input[1]} {list(weight.shape)} does not fit {bias!r}")
        out[weight_name] = weight.t().contiguous()
        used_anonymous.add(node.input[1])

    if "embeddings.position_embeddings" not in out:
        dim = out["embeddings.cls_token"].shape[-1] if "embeddings.cls_token" in out else None
        pieces = [name for name, init in arrays.items()
                  if not name.startswith(prefix) and name not in used_anonymous
                  and list(init.dims[:1]) == [1] and len(init.dims) == 3 and init.dims[2] == dim]
        cls = [n for n in pieces if arrays[n].dims[1] == 1]
        grid = [n for n in pieces if arrays[n].dims[1] > 1 and math.isqrt(arrays[n].dims[1]) ** 2 == arrays[n].dims[1]]
        if len(cls) != 1 or len(grid) != 1:
            raise WeightsError(f"ONNX graph: cannot identify the position embedding (class-token candidates {cls}, "
                               f"grid candidates {grid})")
        out["embeddings.position_embeddings"] = torch.cat([tensor(cls[0]), tensor(grid[0])], dim=1)
    return out


def dinov2_hf_to_timm(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face Dinov2 backbone tensors to timm's `vit_*_patch14_dinov2` names.

    q, k and v are concatenated into `qkv`; layer-scale `lambda1` becomes `ls1/ls2.gamma`;
    `embeddings.position_embeddings` (class token first) becomes `pos_embed`. Every input
    tensor must be used (except the pre-training `mask_token`): leftovers raise `WeightsError`.
    """
    out: dict[str, torch.Tensor] = {}
    left = set(hf) - _IGNORED
    for name, new in _TOP_NAMES.items():
        if name in hf:
            out[new] = hf[name]
            left.discard(name)
    if "embeddings.position_embeddings" in hf:
        out["pos_embed"] = hf["embeddings.position_embeddings"]
        left.discard("embeddings.position_embeddings")
    layers = sorted({int(m.group(1)) for k in hf if (m := _LAYER.match(k))})
    for i in layers:
        src = f"encoder.layer.{i}."
        for name, new in _LAYER_NAMES.items():
            if src + name in hf:
                out[f"blocks.{i}.{new}"] = hf[src + name]
                left.discard(src + name)
        for kind in ("weight", "bias"):
            parts = [f"{src}attention.attention.{p}.{kind}" for p in _QKV]
            missing = [p for p in parts if p not in hf]
            if missing:
                raise WeightsError(f"DINOv2 conversion: layer {i} lacks {missing}")
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([hf[p] for p in parts], dim=0)
            left.difference_update(parts)
    if left:
        raise WeightsError(f"DINOv2 conversion: {len(left)} tensors have no timm counterpart: {sorted(left)[:8]}")
    return out


def dinov2_from_onnx_graph(graph: Any, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """timm `vit_*_patch14_dinov2` state dict (no head) from the DINOv2 part of an ONNX graph."""
    return dinov2_hf_to_timm(hf_dinov2_tensors(graph, prefix))
