"""Delta files: round trip, small size, and refusal of anything that does not fit."""

import copy
import json
import struct

import pytest
import torch
from helpers import random_selection, tiny_model, toy_batches, train_steps
from safetensors.torch import save_file

import sparseft
from sparseft import DeltaError, DeltaFileError


def trained(family="vit", seed=0):
    base = tiny_model(family, seed=seed)
    model = copy.deepcopy(base)
    sparseft.apply(model, random_selection(model, k=1), batchnorm="update")
    train_steps(model)
    model.eval()
    return base, model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv2"])
def test_round_trip_reproduces_the_trained_model(tmp_path, family):
    base, model = trained(family)
    x = toy_batches(1)[0][0]
    expected = model(x)
    path = sparseft.save_delta(model, tmp_path / "task.safetensors", extra={"model": family})
    fresh = copy.deepcopy(base).eval()
    sparseft.load_delta(fresh, path)
    assert torch.equal(fresh(x), expected)
    header, _ = sparseft.read_delta(path)
    assert header["extra"] == {"model": family}
    merged = sparseft.load_delta(copy.deepcopy(base).eval(), path, merge=True)
    assert torch.equal(merged(x), expected)
    assert not any("sparse_delta" in n for n, _ in merged.named_modules())


def test_batchnorm_statistics_travel_with_the_delta(tmp_path):
    base, model = trained("resnet")
    changed = [n for n, b in model.named_buffers() if "running_mean" in n
               and not torch.equal(b, dict(base.named_buffers())[n])]
    assert changed, "training in train mode should have moved BatchNorm statistics"
    _, tensors = sparseft.read_delta(sparseft.save_delta(model, tmp_path / "d.safetensors"))
    assert all(f"buffer/{n}" in tensors for n in changed)


def test_file_is_small(tmp_path):
    _, model = trained("vit")
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    trainable = sparseft.trainable_parameters(model)
    sel = sparseft.delta.selection_of(model)
    expected = sel.num_sparse * 8 + (trainable - sel.num_sparse) * 4  # int32 index + fp32 value; fp32 full
    size = path.stat().st_size
    assert expected <= size < expected + 64 * 1024  # plus the JSON header
    assert size < sum(p.numel() for p in model.parameters()) * 4 / 10


def test_a_delta_for_another_base_is_refused_and_the_model_untouched(tmp_path):
    _, model = trained("vit", seed=0)
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    other = tiny_model("vit", seed=1)
    before = state(other)
    with pytest.raises(DeltaFileError, match="another base model"):
        sparseft.load_delta(other, path)
    assert same(before, state(other)) and not sparseft.delta.is_applied(other)
    nudged = tiny_model("vit", seed=0)
    with torch.no_grad():
        nudged.blocks[1].mlp.fc1.weight[3, 4] += 1e-6
    with pytest.raises(DeltaFileError, match="another base model"):
        sparseft.load_delta(nudged, path)
    wrong_arch = tiny_model("convnext")
    with pytest.raises(DeltaFileError):
        sparseft.load_delta(wrong_arch, path, check_base=False)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    base, model = trained("vit")
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.safetensors"
    corrupt = bytearray(data)
    corrupt[-10] ^= 0xFF
    flipped.write_bytes(bytes(corrupt))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    for bad, message in [(truncated, "truncated or corrupt"), (flipped, "checksum"), (garbage, "truncated or corrupt"),
                         (tmp_path / "absent.safetensors", "not found")]:
        target = copy.deepcopy(base)
        before = state(target)
        with pytest.raises(DeltaFileError, match=message) as info:
            sparseft.load_delta(target, bad)
        assert bad.name in str(info.value)
        assert same(before, state(target))


def _rewrite(path, out, edit_tensors=None, edit_header=None):
    header, tensors = sparseft.read_delta(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    save_file(tensors, str(out), metadata={"format": "sparseft.delta/1", "header": json.dumps(header)})
    return out


def test_missing_extra_or_mismatched_tensors_are_refused(tmp_path):
    base, model = trained("vit")
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    key = next(k for k in sparseft.read_delta(path)[1] if k.endswith("/values"))
    cases = {
        "missing tensors": lambda t: t.pop(key),
        "not in its manifest": lambda t: t.__setitem__("sparse/extra/values", torch.zeros(1)),
        "dtype or shape": lambda t: t.__setitem__(key, torch.zeros(t[key].numel() + 1)),
    }
    for message, edit in cases.items():
        bad = _rewrite(path, tmp_path / "bad.safetensors", edit_tensors=edit)
        target = copy.deepcopy(base)
        with pytest.raises(DeltaFileError, match=message):
            sparseft.load_delta(target, bad)
        assert not sparseft.delta.is_applied(target)


def test_non_delta_files_and_busy_models_are_refused(tmp_path):
    base, model = trained("vit")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(DeltaFileError, match=r"plain.safetensors: a plain safetensors file \(1 tensor, no sparseft "
                                             "header"):
        sparseft.load_delta(copy.deepcopy(base), plain)
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    with pytest.raises(DeltaError, match="already has sparseft deltas"):
        sparseft.load_delta(model, path)
    with pytest.raises(DeltaFileError, match="no sparseft deltas"):
        sparseft.save_delta(copy.deepcopy(base), tmp_path / "none.safetensors")


def test_header_is_plain_json_with_what_users_need(tmp_path):
    _, model = trained("vit")
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    meta = json.loads(path.read_bytes()[8:8 + n])["__metadata__"]
    header = json.loads(meta["header"])
    for key in ("fingerprint", "head", "shapes", "full", "selection", "manifest", "checksum", "sparseft_version"):
        assert key in header


def test_saving_is_atomic_on_failure(tmp_path, monkeypatch):
    _, model = trained("mlp")
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sparseft.deltafile.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        sparseft.save_delta(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_weights_with_an_empty_selection_round_trip(tmp_path):
    base = tiny_model("mlp")
    model = copy.deepcopy(base)
    sel = sparseft.select(model, None, k=1, level="net", criterion="magnitude", progress=False)
    sel.indices["3.weight"] = torch.zeros(0, dtype=torch.long)  # a weight that got no entries at net level
    sparseft.apply(model, sel)
    train_steps(model, steps=1)
    model.eval()
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    x = toy_batches(1)[0][0]
    assert torch.equal(sparseft.load_delta(copy.deepcopy(base).eval(), path)(x), model(x))


def test_tampered_headers_and_non_finite_values_are_refused(tmp_path):
    base, model = trained("mlp")
    path = sparseft.save_delta(model, tmp_path / "d.safetensors")
    header, tensors = sparseft.read_delta(path)
    header["fingerprint"] = "0" * 64
    bad = tmp_path / "header.safetensors"
    save_file(tensors, str(bad), metadata={"format": "sparseft.delta/1", "header": json.dumps(header)})
    with pytest.raises(DeltaFileError, match="header checksum"):
        sparseft.read_delta(bad)
    header, tensors = sparseft.read_delta(path)
    key = next(k for k in tensors if k.startswith("full/"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] = float("nan")
    from sparseft.deltafile import _header_hash, _tensor_checksum

    header["checksum"] = _tensor_checksum(tensors)
    header["header_sha256"] = _header_hash(header)
    save_file(tensors, str(bad), metadata={"format": "sparseft.delta/1", "header": json.dumps(header)})
    with pytest.raises(DeltaFileError, match="NaN or infinite"):
        sparseft.load_delta(copy.deepcopy(base), bad)
