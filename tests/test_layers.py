"""`sparseft layers MODEL` and the layer groups behind it; LoRA's refusal names the model and real targets."""

import pytest
from helpers import TIMM_TINY, tiny_model

import sparseft
from sparseft.anatomy import layer_groups, model_name
from sparseft.cli import main
from sparseft.layers import layer_rows
from sparseft.methods import MethodContext, NotApplicable, get_method
from sparseft.methods.lora import find_targets, suggested_groups

CTX = MethodContext(loader=lambda kind: [], progress=False)


def _rows(model):
    return {(r["target"], r["type"]): r for r in layer_rows(model)}


def test_a_vit_lists_its_attention_and_mlp_layers_as_lora_targets(vit):
    rows = _rows(vit)  # tiny ViT: 2 blocks
    for target, path in (("qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
        row = rows[(target, "Linear")]
        assert row["layers"] == 2 and row["lora"] == "yes" and row["gps"] == "weight top-K, bias full"
        assert row["names"] == [f"blocks.{i}.{path}" for i in range(2)]
    # `proj` alone would also take the patch embedding (an 8x8 conv): its own row and target
    patch = rows[("patch_embed.proj", "Conv2d 8x8")]
    assert patch["lora"] == "lora with --lora-conv" and patch["layers"] == 1
    assert rows[("head", "Linear")]["head"] and rows[("head", "Linear")]["lora"] == "head: trained in full"
    assert rows[("norm1", "LayerNorm")]["lora"] == "no"
    assert sum(r["params"] for r in layer_rows(vit)) == sum(p.numel() for n, p in vit.named_parameters()
                                                           if n.count(".") > 0)  # every layer's, none twice
    assert [g.target for g in suggested_groups(vit)[0]] == ["qkv", "attn.proj", "fc1", "fc2"]


def test_mobilenetv2_lists_its_pointwise_convs_and_suggests_them():
    model = tiny_model("mobilenetv2")
    rows = _rows(model)
    assert rows[("conv_pw", "Conv2d 1x1")]["layers"] == 17 and rows[("conv_pw", "Conv2d 1x1")]["lora"] == "yes"
    assert rows[("conv_pwl", "Conv2d 1x1")]["layers"] == 16
    assert rows[("conv_dw", "Conv2d 3x3 depthwise")]["lora"] == "no (grouped conv)"
    assert rows[("conv_stem", "Conv2d 3x3")]["lora"] == "lora with --lora-conv"
    picked, needs_conv = suggested_groups(model)
    assert [g.target for g in picked] == ["conv_pw", "conv_pwl"] and not needs_conv


@pytest.mark.parametrize("family", [*TIMM_TINY, "tv_mobilenet_v2", "mlp"])
def test_every_target_selects_exactly_the_layers_of_its_row(family):
    model = tiny_model(family)
    groups = layer_groups(model)
    names = [n for g in groups for n in g.names]
    assert len(names) == len(set(names))  # each layer in one row
    assert set(names) == {n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
    for g in groups:
        if g.kind in ("linear", "conv") and not g.in_head:
            chosen, _ = find_targets(model, [g.target], conv=True)
            assert chosen == g.names, g.target
        assert not g.target.split(".")[0].isdigit() or g.target == g.names[0]  # no bare Sequential index


def test_the_command_prints_the_table_and_a_suggestion(capsys):
    assert main(["layers", "mobilenetv2_050"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mobilenetv2_050 (EfficientNet): ") and "head: classifier" in lines[0]
    assert lines[1].split() == ["TARGET", "LAYERS", "TYPE", "PARAMS", "LORA", "/", "ROSA", "(--lora-targets)", "GPS"]
    conv_pw = next(line for line in lines if line.startswith("conv_pw "))
    assert conv_pw.split()[:4] == ["conv_pw", "17", "Conv2d", "1x1"]
    assert lines[-1] == "suggested: --lora-targets conv_pw,conv_pwl"
    assert main(["layers", "test_vit", "--img-size", "32"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "suggested: --lora-targets qkv,attn.proj,fc1,fc2"


def test_an_unknown_model_is_one_line(capsys):
    assert main(["layers", "no_such_model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'no_such_model'" in err[0]


@pytest.mark.parametrize("method", ["lora", "rosa"])
def test_lora_on_mobilenetv2_names_the_model_and_suggests_real_targets(method):
    model = tiny_model("mobilenetv2")
    keys = list(model.state_dict())
    with pytest.raises(NotApplicable) as err:
        get_method(method).prepare(model, CTX)
    message = str(err.value)
    assert "mobilenetv2_050" in message and "EfficientNet" not in message
    assert "--lora-targets conv_pw,conv_pwl;" in message and "conv_pw (17 Conv2d 1x1)" in message
    assert "--lora-conv" not in message and "`sparseft layers mobilenetv2_050`" in message
    assert not sparseft.delta.is_applied(model) and list(model.state_dict()) == keys  # untouched
    get_method("lora", lora_targets="conv_pw,conv_pwl").check(model)  # the suggestion is taken


def test_a_model_outside_timm_is_named_by_its_class():
    model = tiny_model("tv_mobilenet_v2")
    assert model_name(model) == "MobileNetV2"
    with pytest.raises(NotApplicable, match=r"no layer of MobileNetV2 .*--lora-targets conv\.0\.0,conv\.2; "
                                            r"`sparseft layers MODEL`"):
        get_method("lora").check(model)
