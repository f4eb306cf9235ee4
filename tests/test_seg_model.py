"""Segmentation models: timm backbones through their intermediate features, the FPN decoder as the head,
GPS roles as for classification, sparse training of the backbone, weight loading."""

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TIMM_TINY, random_selection

import sparseft
from sparseft.data.transforms import data_config
from sparseft.models import WeightsError, head_module_name, head_parameter_names
from sparseft.seg import SegmentationModel, create_segmentation_model, evenly_spaced
from sparseft.selection import Eligibility, parameter_roles

#: the tiny SAM image encoder of the research notes (0.3 M parameters)
SAM_TINY = ("samvit_base_patch16", dict(img_size=64, depth=2, embed_dim=96, num_heads=2, global_attn_indexes=[1],
                                        window_size=4, neck_chans=32))
BACKBONES = {"vit": (*TIMM_TINY["vit"], 32), "resnet": (*TIMM_TINY["resnet"], 32),
             "mobilenetv2": (*TIMM_TINY["mobilenetv2"], 32), "sam": (*SAM_TINY, 64)}


def seg_model(family: str, num_classes: int = 3, seed: int = 0) -> tuple[SegmentationModel, int]:
    """A tiny segmentation model of `family` and its input size."""
    name, kwargs, size = BACKBONES[family]
    torch.manual_seed(seed)
    return create_segmentation_model(name, num_classes, **kwargs), size


def classifier(family: str) -> torch.nn.Module:
    name, kwargs, _ = BACKBONES[family]
    return timm.create_model(name, num_classes=4, **kwargs)


def seg_batches(size: int, n: int = 3, batch: int = 2, classes: int = 3, seed: int = 0):
    """Images whose class map shows in the first channel, with a void (255) border."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, classes, (batch, size // 8, size // 8), generator=g)
        y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        x = torch.randn(batch, 3, size, size, generator=g)
        x[:, 0] += y.float()
        y[:, :2] = 255
        out.append((x, y))
    return out


@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv2", "sam"])
def test_logits_have_the_input_size(family):
    model, size = seg_model(family, num_classes=5)
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 5, size, size)
    feats = model.features(x)
    assert feats.shape[:2] == (2, model.channels[-1])
    assert feats.shape[-1] == size // model.reductions[-1]


def test_hierarchical_and_plain_levels():
    assert evenly_spaced(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced(2, 4) == [0, 1]
    resnet, _ = seg_model("resnet")
    assert resnet.reductions == [4, 8, 16, 32] and resnet.upsample_steps == 0
    sam, _ = seg_model("sam")
    assert sam.channels == [96, 32]  # the last level is the neck's output
    assert sam.upsample_steps == 2   # stride 16 -> 4
    cnn = resnet(torch.randn(1, 3, 40, 56))  # any size a CNN takes
    assert cnn.shape == (1, 3, 40, 56)


@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv2", "sam"])
def test_the_decoder_is_the_head(family):
    model, _ = seg_model(family)
    decoder = {n for n, _ in model.named_parameters() if n.startswith("decode_head.")}
    assert head_module_name(model) == "decode_head"
    assert set(head_parameter_names(model)) == decoder and decoder
    assert model.get_classifier() is model.decode_head


@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv2", "sam"])
def test_roles_are_the_classifiers_under_the_backbone_prefix(family):
    model, _ = seg_model(family)
    roles = parameter_roles(model)
    plain = classifier(family)
    plain_roles = parameter_roles(plain)
    plain_head = set(head_parameter_names(plain))
    backbone = {n.removeprefix("backbone."): r for n, r in roles.items() if n.startswith("backbone.")}
    assert set(roles) == {f"backbone.{n}" for n in backbone} | set(head_parameter_names(model))
    assert set(backbone) <= set(plain_roles) - plain_head  # the classification model's names, no classifier
    assert backbone == {n: plain_roles[n] for n in backbone}
    assert {r for n, r in roles.items() if n.startswith("decode_head.")} == {"full"}
    assert {"select", "frozen"} <= set(backbone.values())  # (ResNet convs have no biases to train in full)


def test_sam_neck_norms_are_frozen_by_type():
    model, _ = seg_model("sam")
    roles = parameter_roles(model)
    assert type(model.backbone.neck[1]).__name__ == "LayerNorm2d"  # named neck.1: no "norm" in the name
    assert {n: r for n, r in roles.items() if ".neck." in n} == {
        "backbone.neck.0.weight": "select", "backbone.neck.1.weight": "frozen", "backbone.neck.1.bias": "frozen",
        "backbone.neck.2.weight": "select", "backbone.neck.3.weight": "frozen", "backbone.neck.3.bias": "frozen"}
    assert roles["backbone.pos_embed"] == "frozen"
    rel_pos = sorted(n for n in roles if ".rel_pos_" in n)
    assert rel_pos and {roles[n] for n in rel_pos} == {"frozen"}  # as the official GPS SAM code ("pos")
    eligible = parameter_roles(model, Eligibility(freeze_embeddings=False))  # --train-embeddings
    assert {eligible[n] for n in rel_pos} == {"select"}


def test_relative_position_mlps_of_classifiers_keep_their_roles():
    """Only SAM's rel_pos_h / rel_pos_w tables are position encodings: the MLP of timm's `rel_pos` modules
    (relpos ViTs, MaxViT) are weights selected from and biases trained in full, as before."""
    model = timm.create_model("vit_relpos_small_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2,
                              num_classes=3)
    roles = {n: r for n, r in parameter_roles(model).items() if ".rel_pos." in n}
    assert roles and {r for n, r in roles.items() if n.endswith(".weight")} == {"select"}
    assert {r for n, r in roles.items() if n.endswith(".bias")} == {"full"}


@pytest.mark.parametrize("family", ["vit", "resnet", "mobilenetv2", "sam", "swin", "convnext", "efficientnet"])
def test_every_parameter_gets_a_gradient(family):
    if family in BACKBONES:
        model, size = seg_model(family)
    else:
        name, kwargs = TIMM_TINY[family]
        torch.manual_seed(0)
        model, size = create_segmentation_model(name, 3, **kwargs), 32
    x, y = seg_batches(size, n=1)[0]
    F.cross_entropy(model(x), y, ignore_index=255).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # classifier, final 1x1 conv and unused norms were pruned
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("backbone."))
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("decode_head."))


@pytest.mark.parametrize("family", ["vit", "resnet", "sam"])
def test_sparse_training_leaves_frozen_backbone_weights_bit_identical(family):
    model, size = seg_model(family)
    roles = parameter_roles(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    selection = random_selection(model, k=2)
    sparseft.apply(model, selection)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for x, y in seg_batches(size):
        opt.zero_grad()
        F.cross_entropy(model(x), y, ignore_index=255).backward()
        opt.step()
    params = dict(model.named_parameters())
    frozen = [n for n, r in roles.items() if r == "frozen"]
    assert frozen and all(torch.equal(params[n], before[n]) for n in frozen)
    changed = 0
    for name, index in selection.indices.items():
        flat, base = params[name].detach().reshape(-1), before[name].reshape(-1)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[index] = False
        assert torch.equal(flat[keep], base[keep]), name  # entries outside the selection never move
        changed += int((flat[index] != base[index]).any())
    assert changed > 0
    assert not torch.equal(params["decode_head.classifier.weight"], before["decode_head.classifier.weight"])


@pytest.mark.parametrize("family", ["vit", "resnet", "sam"])
def test_eval_mode_is_deterministic(family):
    model, size = seg_model(family)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    again, _ = seg_model(family)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))  # same seed, same model


def test_data_config_and_reset_classifier():
    model, _ = seg_model("vit")
    assert data_config(model)["input_size"] == (3, 32, 32)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7, 32, 32) and model.num_classes == 7
    with pytest.raises(ValueError, match="num_classes"):
        create_segmentation_model("resnet10t", 0)


def test_a_torchvision_backbone_is_refused():
    import torchvision

    with pytest.raises(TypeError, match="timm"):
        SegmentationModel(torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25), 2)


# -- weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "mobilenetv2"])
def test_backbone_weights_from_a_classifier_checkpoint(tmp_path, family):
    name, kwargs, _ = BACKBONES[family]
    source = classifier(family)  # with its classifier (and MobileNet's final conv_head / bn2)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    model = create_segmentation_model(name, 2, weights=path, **kwargs)
    reference = source.state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in model.backbone.state_dict().items())
    other, okw = TIMM_TINY["resnet"]
    with pytest.raises(WeightsError, match="backbone"):
        create_segmentation_model(other, 2, weights=path, **okw)


def test_segmentation_state_round_trip(tmp_path):
    name, kwargs, size = BACKBONES["resnet"]
    model, _ = seg_model("resnet", num_classes=3)
    path = tmp_path / "seg.pth"
    torch.save(model.state_dict(), path)
    same = create_segmentation_model(name, 3, weights=path, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(same(x), model.eval()(x))
    fewer = create_segmentation_model(name, 2, weights=path, **kwargs)  # another class count: new decoder layer
    assert torch.equal(fewer.backbone.conv1[0].weight, model.backbone.conv1[0].weight)


def test_sam_checkpoint_loads_offline(tmp_path):
    """An official-style SAM file (image_encoder.*, mlp.lin*, prompt encoder and mask decoder) maps onto timm."""
    name, kwargs, size = BACKBONES["sam"]
    torch.manual_seed(3)
    source = timm.create_model(name, num_classes=0, **kwargs)
    state = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in source.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 16)
    state["mask_decoder.output_upscaling.0.weight"] = torch.randn(4, 4, 2, 2)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(state, path)
    model = create_segmentation_model(name, 2, weights=path, **kwargs)
    reference = source.state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in model.backbone.state_dict().items())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)  # smaller images than built for


def test_evaluation_scores_at_the_masks_own_size():
    """A model run at 32 px is scored against masks of their own sizes (logits resized bilinearly),
    whether the batch's masks share a size (stacked) or not (a list)."""
    from sparseft.data.segmentation import collate_pairs
    from sparseft.seg import SegMetrics
    from sparseft.train import evaluate

    model, size = seg_model("vit", num_classes=3)
    model.class_names = ["background", "a", "b"]
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, size, size, generator=g), torch.randint(0, 3, hw, generator=g))
             for hw in [(48, 40), (48, 40), (20, 56)]]
    items[0][1][:4] = 255  # ignored pixels
    model.eval()
    with torch.no_grad():
        expected = SegMetrics(3, class_names=model.class_names)
        for x, y in items:
            logits = F.interpolate(model(x[None]), size=tuple(y.shape), mode="bilinear", align_corners=False)
            expected.update(logits.argmax(1), y[None])
    want = expected.compute()
    for batch in (1, 2, 3):  # stacked masks, a stacked pair then a single mask, a list of mixed sizes
        loader = torch.utils.data.DataLoader(items, batch_size=batch, collate_fn=collate_pairs)
        got = evaluate(model, loader)
        assert got["n"] == 3
        for key in ("mIoU", "mDice", "mIoU_per_image", "mDice_per_image"):
            assert got[key] == pytest.approx(want[key]), (batch, key)
        assert got["acc"] == pytest.approx(want["pixel_acc"])
