"""Segmentation metrics against hand-computed cases: dataset-level and per-image IoU / Dice, empty masks,
absent classes, ignore pixels, the binary foreground-only mean, merging accumulators."""

import math

import pytest
import torch

from sparseft.seg import SegMetrics


def t(rows):
    return torch.tensor(rows)


def approx(value):
    return pytest.approx(value, abs=1e-12)


def test_perfect_prediction():
    m = SegMetrics(2)
    target = t([[[0, 1], [1, 1]], [[0, 0], [0, 1]]])
    m.update(target.clone(), target)
    r = m.compute()
    assert r["mIoU"] == r["mDice"] == r["mIoU_per_image"] == r["mDice_per_image"] == r["pixel_acc"] == 1.0
    assert r["per_class"]["0"] == {"iou": 1.0, "dice": 1.0, "iou_per_image": 1.0, "dice_per_image": 1.0}
    assert r["pixels"] == 8


def test_all_wrong():
    m = SegMetrics(2)
    m.update(t([[0, 0], [1, 1]]), t([[1, 1], [0, 0]]))  # one [H, W] map is one image
    r = m.compute()
    assert r["mIoU"] == r["mDice"] == r["mIoU_per_image"] == r["mDice_per_image"] == r["pixel_acc"] == 0.0


def test_empty_mask_and_empty_prediction_is_skipped_per_image():
    m = SegMetrics(2)
    m.update(t([[0, 0], [0, 0]]), t([[0, 0], [0, 0]]))  # no foreground anywhere: union 0, skipped
    r = m.compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["mIoU_per_image"]) and math.isnan(r["mDice_per_image"])
    assert r["pixel_acc"] == 1.0 and r["per_class"]["0"]["iou"] == 1.0
    m.update(t([[1, 0], [0, 0]]), t([[1, 1], [0, 0]]))  # I=1, |P|=1, |G|=2, U=2
    r = m.compute()
    assert r["mIoU_per_image"] == approx(0.5) and r["mDice_per_image"] == approx(2 / 3)  # the empty image adds nothing
    assert r["mIoU"] == approx(0.5) and r["mDice"] == approx(2 / 3)


def test_empty_mask_with_a_prediction_scores_zero_on_that_image():
    m = SegMetrics(2, class_names=["background", "polyp"])
    pred = t([[[0, 1], [0, 0]], [[1, 0], [0, 0]]])
    target = t([[[0, 0], [0, 0]], [[1, 1], [0, 0]]])
    m.update(pred, target)
    r = m.compute()
    # image 0: polyp I=0, U=1 -> IoU 0, Dice 0; image 1: I=1, U=2, |P|+|G|=3 -> IoU 1/2, Dice 2/3
    assert r["mIoU_per_image"] == approx(0.25) and r["mDice_per_image"] == approx(1 / 3)
    # dataset-level: I=1, U=3, |P|=2, |G|=2
    assert r["mIoU"] == approx(1 / 3) and r["mDice"] == approx(0.5)
    # binary: the mean is the foreground's only; background (I=3+2, U=4+3) is listed but not averaged
    assert r["classes_in_mean"] == ["polyp"]
    assert r["per_class"]["background"]["iou"] == approx(5 / 7)
    assert r["per_class"]["background"]["iou_per_image"] == approx((3 / 4 + 2 / 3) / 2)
    assert r["pixel_acc"] == approx(6 / 8)


def test_a_class_absent_from_one_image_and_a_class_never_present():
    m = SegMetrics(4, class_names=["bg", "a", "b", "never"])
    pred = t([[[0, 1], [0, 0]], [[2, 2], [0, 0]]])
    target = t([[[0, 1], [1, 0]], [[2, 2], [2, 0]]])
    m.update(pred, target)
    r = m.compute()
    per = r["per_class"]
    # a: only in image 0 (I=1, |P|=1, |G|=2, U=2); b: only in image 1 (I=2, |P|=2, |G|=3, U=3)
    assert per["a"]["iou_per_image"] == approx(1 / 2) and per["a"]["dice_per_image"] == approx(2 / 3)
    assert per["b"]["iou_per_image"] == approx(2 / 3) and per["b"]["dice_per_image"] == approx(4 / 5)
    assert per["a"]["iou"] == approx(1 / 2) and per["b"]["dice"] == approx(4 / 5)
    # "never": union 0 everywhere -> NaN, left out of the mean over classes 1..3
    assert all(math.isnan(v) for v in per["never"].values())
    assert r["classes_in_mean"] == ["a", "b", "never"]
    assert r["mIoU"] == approx(7 / 12) and r["mIoU_per_image"] == approx(7 / 12)
    assert r["mDice"] == approx(11 / 15) and r["mDice_per_image"] == approx(11 / 15)
    # background: image 0 I=2, U=3; image 1 I=1, U=2; summed I=3, |P|=5, |G|=3, U=5
    assert per["bg"]["iou"] == approx(3 / 5) and per["bg"]["dice"] == approx(6 / 8)
    assert per["bg"]["iou_per_image"] == approx((2 / 3 + 1 / 2) / 2)
    assert r["pixel_acc"] == approx(6 / 8)


def test_which_classes_are_averaged():
    pred = t([[[0, 1], [2, 2]]])
    target = t([[[0, 1], [2, 0]]])  # IoU: class 0 1/2, class 1 1, class 2 1/2
    named = SegMetrics(3, class_names=["background", "cat", "dog"])
    unnamed = SegMetrics(3)  # no background class (Cityscapes style): every class, as mmseg
    road = SegMetrics(3, class_names=["road", "car", "sky"])
    forced = SegMetrics(3, background=2)
    for m in (named, unnamed, road, forced):
        m.update(pred, target)
    assert named.compute()["classes_in_mean"] == ["cat", "dog"] and named.compute()["mIoU"] == approx(3 / 4)
    assert unnamed.compute()["classes_in_mean"] == ["0", "1", "2"] and unnamed.compute()["mIoU"] == approx(2 / 3)
    assert road.compute()["classes_in_mean"] == ["road", "car", "sky"]
    assert forced.compute()["classes_in_mean"] == ["0", "1"] and forced.compute()["mIoU"] == approx(3 / 4)
    assert SegMetrics(2).compute()["classes_in_mean"] == ["1"]  # binary without names: the foreground
    assert SegMetrics(2, background=None).compute()["classes_in_mean"] == ["0", "1"]
    with pytest.raises(ValueError, match="background"):
        SegMetrics(3, background=3)


def test_ignored_pixels_count_for_nothing():
    m = SegMetrics(2)
    m.update(t([[1, 1], [1, 0]]), t([[1, 255], [0, 255]]))
    r = m.compute()
    # valid pixels: (0,0) target 1 pred 1, (1,0) target 0 pred 1 -> I=1, |P|=2, |G|=1, U=2
    assert r["mIoU"] == approx(0.5) and r["mDice"] == approx(2 / 3)
    assert r["pixel_acc"] == approx(0.5) and r["pixels"] == 2
    assert r["per_class"]["0"]["iou"] == 0.0
    other = SegMetrics(2, ignore_index=None)
    with pytest.raises(ValueError, match="outside the classes"):
        other.update(t([[1, 1], [1, 0]]), t([[1, 255], [0, 255]]))


def test_dataset_level_and_per_image_mean_differ():
    big_target = torch.zeros(4, 4, dtype=torch.long)
    big_target[:2] = 1                      # 8 foreground pixels, predicted exactly: IoU 1, Dice 1
    small_target = torch.zeros(4, 4, dtype=torch.long)
    small_target[0, 0] = 1                  # 1 pixel, missed; one wrong pixel predicted: IoU 0, Dice 0
    small_pred = torch.zeros(4, 4, dtype=torch.long)
    small_pred[3, 3] = 1
    m = SegMetrics(2)
    m.update(torch.stack([big_target, small_pred]), torch.stack([big_target, small_target]))
    r = m.compute()
    assert r["mIoU_per_image"] == approx(0.5) and r["mDice_per_image"] == approx(0.5)
    # summed: I=8, |P|=9, |G|=9, U=10
    assert r["mIoU"] == approx(0.8) and r["mDice"] == approx(16 / 18)


def test_merge_and_state_add_up():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (6, 5, 7), generator=g)
    target = torch.randint(0, 3, (6, 5, 7), generator=g)
    target[0, 0] = 255
    whole = SegMetrics(3)
    whole.update(pred, target)
    first, second = SegMetrics(3), SegMetrics(3)
    first.update(pred[:2], target[:2])
    second.update(pred[2:], target[2:])
    first.merge(second.state())
    assert torch.equal(first.areas, whole.areas)  # integer counts: exact
    assert torch.allclose(first.per_image, whole.per_image, rtol=0, atol=1e-12)
    assert first.compute()["mIoU_per_image"] == approx(whole.compute()["mIoU_per_image"])
    again = SegMetrics(3).merge(whole)
    assert again.sync().compute() == whole.compute()  # one process: sync changes nothing
    with pytest.raises(ValueError, match="merge"):
        SegMetrics(3).merge(SegMetrics(4))
    whole.reset()
    assert whole.areas.sum() == 0 and whole.per_image.sum() == 0


def test_bad_input_is_refused():
    m = SegMetrics(2)
    with pytest.raises(TypeError, match="argmax"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one shape"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[3\]"):
        m.update(torch.zeros(2, 2, dtype=torch.long), t([[0, 3], [1, 0]]))
    with pytest.raises(ValueError, match="pred holds"):
        m.update(t([[0, 2], [1, 0]]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="void"):
        SegMetrics(2, ignore_index=0)
    with pytest.raises(ValueError, match="class names"):
        SegMetrics(2, class_names=["x"])
