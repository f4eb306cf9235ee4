"""The front door: sparseft.create_model, sparseft.load (any method), merge/unmerge, files of 0.1."""

import pkgutil

import pytest
import timm
import torch
from helpers import LEGACY, method_test_options, toy_base, toy_batches
from helpers import trained_model as _trained
from safetensors.torch import load_file

import sparseft
from sparseft.deltafile import DeltaFileError
from sparseft.methods import METHODS, MethodContext, get_method


def legacy_base() -> torch.nn.Module:
    """The base the 0.1 fixture files were written on (tests/fixtures/make_legacy_0_1.py)."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2)
    model.load_state_dict(load_file(str(LEGACY / "base.safetensors")))
    return model.eval()


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


LEGACY_METHODS = sorted(p.stem for p in LEGACY.glob("*.safetensors") if p.stem not in ("base", "expected_logits"))


def test_every_legacy_method_is_still_registered():
    assert set(LEGACY_METHODS) <= set(METHODS) and len(LEGACY_METHODS) >= 12


@pytest.mark.parametrize("method", LEGACY_METHODS)
def test_task_files_written_by_0_1_still_load_merge_and_unmerge(method):
    expected = load_file(str(LEGACY / "expected_logits.safetensors"))
    base = legacy_base()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [type(m) for m in base.modules()]
    model = sparseft.load(LEGACY / f"{method}.safetensors", model=legacy_base()).eval()
    x = expected["input"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected[method], atol=1e-6, rtol=0)
        if METHODS[method].mergeable:
            sparseft.merge(model)
            assert [type(m) for m in model.modules()] == modules and hooks(model) == 0
            torch.testing.assert_close(model(x), expected[method], atol=1e-5, rtol=0)
        else:
            with pytest.raises(sparseft.DeltaError, match="cannot be merged"):
                sparseft.merge(model)
    sparseft.unmerge(model)  # a loaded task keeps its base values, full fine-tuning's too
    assert not sparseft.delta.is_applied(model)
    assert [type(m) for m in model.modules()] == modules and hooks(model) == 0
    assert list(model.state_dict()) == list(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_load_rebuilds_the_base_from_the_header_for_every_method(method, tmp_path):
    model = _trained(method)
    path = get_method(method).save(model, tmp_path / "task.safetensors", extra={
        "model": "test_vit", "num_classes": 3, "img_size": 32, "init_seed": 0})
    x = toy_batches(1, batch=2, classes=3)[0][0]
    loaded = sparseft.load(path).eval()
    assert sparseft.delta.method_of(loaded) == method
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)
    other = sparseft.create_model("test_vit", num_classes=3, img_size=32)  # another random base
    keys = list(other.state_dict())
    with pytest.raises(DeltaFileError, match="another base model"):
        sparseft.load(path, model=other)
    assert not sparseft.delta.is_applied(other) and list(other.state_dict()) == keys and hooks(other) == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reuses_its_plan_when_a_run_resumes(method, tmp_path):
    first = _trained(method, run_dir=tmp_path)
    assert (tmp_path / "selection.safetensors").exists()

    def no_data(kind):
        raise AssertionError("a resumed run must not look at the data again")

    again = get_method(method, **method_test_options(method)).prepare(
        toy_base(), MethodContext(loader=no_data, progress=False, run_dir=tmp_path))
    assert sparseft.delta.structure_of(again) == sparseft.delta.structure_of(first)
    assert [n for n, p in again.named_parameters() if p.requires_grad] == [
        n for n, p in first.named_parameters() if p.requires_grad]


def test_load_needs_a_model_when_the_header_names_no_base(tmp_path):
    model = _trained("gps")
    path = sparseft.save_delta(model, tmp_path / "bare.safetensors")
    with pytest.raises(DeltaFileError, match="does not say which base model"):
        sparseft.load(path)


def test_create_model_knows_offline_backbones_and_timm_names():
    from sparseft.hub import cached_weights

    if cached_weights("mobilenetv2_100_offline") is None:
        pytest.skip("mobilenetv2_100_offline is not cached (make test fetches it)")
    model = sparseft.create_model("mobilenetv2_100_offline", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert model.pretrained_cfg["tag"] == "offline"
    vit = sparseft.create_model("test_vit", num_classes=5, img_size=32)
    assert vit.patch_embed.img_size == (32, 32) and vit.num_classes == 5
    cnn = sparseft.create_model("resnet10t", num_classes=5, img_size=64)  # CNNs take any size: ignored
    assert cnn.num_classes == 5
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        sparseft.create_model("no_such_net", num_classes=3)


def test_no_top_level_name_shadows_a_subpackage():
    import sparseft.selection

    modules = {m.name for m in pkgutil.iter_modules(sparseft.__path__)}
    assert not modules & set(sparseft.__all__)
    assert sparseft.selection.Selection is sparseft.Selection and callable(sparseft.select)


def test_a_plan_made_with_other_settings_is_replaced_not_reused(tmp_path):
    linear = _trained("linear", run_dir=tmp_path)
    assert sparseft.parameter_summary(linear)["trainable_backbone"] == 0
    gps = _trained("gps", run_dir=tmp_path)  # same folder, another method: a plan of its own
    assert sparseft.delta.selection_of(gps).num_sparse > 0
    assert sparseft.Selection.load(tmp_path / "selection.safetensors").meta["method"] == "gps"


def test_life_cycle_refuses_a_model_of_another_task(tmp_path):
    model = _trained("lora")
    with pytest.raises(sparseft.DeltaError, match="already has a task"):
        get_method("gps").prepare(model, MethodContext(loader=lambda kind: [], progress=False))
    with pytest.raises(sparseft.DeltaError, match="made by method 'lora'"):
        get_method("adapter").save(model, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


def test_weights_for_another_architecture_are_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    from sparseft.models import WeightsError

    other = sparseft.create_model("test_vit", num_classes=3, img_size=32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match=r"w.safetensors: tensors of another shape"):
        sparseft.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, weights=path)
