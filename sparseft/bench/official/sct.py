"""SCT (Zhao et al., 2023): the official settings, github.com/zhaohengyuan1/SCT.

run_model_sct.sh gives each VTAB-1k task its lr, weight decay and drop-path (`--dpr`) and K = 96
salient channels (`--topN`); configs/model_sct/vtab/<task>.yaml its batch size, epochs, warm-up,
label smoothing, augmentation (`train_aug`: timm's RandAugment rand-m9-mstd0.5-inc1 after a plain
resize) and the SCT module's output scale (`scale`, `scaleonx`), which sparseft's `sct` has no
option for (`extra` columns). train_model_sct.py: AdamW, timm's CosineLRScheduler stepped per
epoch (warm-up from 1e-6, min lr 1e-5), no EMA, no mixup, no amp; vtab.py drops the last partial
batch and normalises with the ImageNet mean/std. It evaluates every 10th epoch and reports the best.
"""

from __future__ import annotations

from sparseft.bench.official.table import GOOGLE_VIT_B16_IN21K, Row, Table

# task folder: (lr, weight decay, label smoothing, RandAugment, SCT scale, scale on x)
_TASKS = {
    "cifar": (0.013, 1.0, 0.1, False, 0.4, False),
    "caltech101": (0.006, 0.35, 0.1, False, 1.0, False),
    "dtd": (0.0032, 0.04, 0.1, True, 0.25, False),
    "oxford_flowers102": (0.05, 0.11, 0.1, False, 0.15, False),
    "oxford_iiit_pet": (0.0007, 0.8, 0.1, True, 0.2, False),
    "svhn": (0.075, 0.03, 0.1, True, 0.15, False),
    "sun397": (0.0017, 0.01, 0.1, False, 0.15, False),
    "patch_camelyon": (0.0072, 0.002, 0.1, True, 0.17, False),
    "eurosat": (0.06, 0.001, 0.1, True, 0.1, False),
    "resisc45": (0.01, 0.01, 0.1, True, 0.4, False),
    "diabetic_retinopathy": (0.004, 0.0003, 0.1, True, 0.75, False),
    "clevr_count": (0.0033, 0.01, 0.0, True, 0.52, True),
    "clevr_dist": (0.0018, 0.005, 0.0, True, 0.1, True),
    "dmlab": (0.009, 0.1, 0.0, True, 0.3, False),
    "kitti": (0.0072, 0.0001, 0.1, True, 0.5, False),
    "dsprites_loc": (0.003, 0.001, 0.0, False, 0.3, True),
    "dsprites_ori": (0.01, 0.05, 0.0, False, 0.5, True),
    "smallnorb_azi": (0.0062, 0.005, 0.0, False, 1.0, True),
    "smallnorb_ele": (0.0011, 0.0005, 0.0, False, 0.65, True),
}

_CONFIG = {"cifar": "cifar100"}  # the config files' names where they differ from the task folder's

_COMMON = {"drop_path": 0.1, "channels": 96, "batch_size": 64, "epochs": 100, "warmup_epochs": 10,
           "warmup_lr": 1e-6, "min_lr": 1e-5, "optimizer": "adamw", "ema_decay": None, "mixup": 0.0, "cutmix": 0.0,
           "amp": False, "drop_last": True, "backbone": "vit_base_patch16_224_in21k_sct",
           "pretrained": "ViT-B_16.npz"}

VTAB = Table(
    name="sct-vtab", paper="sct", benchmark="vtab-1k", repository="github.com/zhaohengyuan1/SCT",
    commit="01e8f1e39f2e2a486b2dfaca97acbb382eeedb9a",
    **GOOGLE_VIT_B16_IN21K,
    protocol="train800val200 -> test, best of the evaluations at epochs 10, 20, ..., 100",
    rows=tuple(Row(task=t, method="sct", source=f"run_model_sct.sh; configs/model_sct/vtab/{_CONFIG.get(t, t)}.yaml",
                   values={**_COMMON, "lr": lr, "weight_decay": wd, "smoothing": ls,
                           "augmentation": "resize-randaugment" if aug else "direct-resize",
                           "sct_scale": scale, "sct_scale_on_x": on_x})
               for t, (lr, wd, ls, aug, scale, on_x) in _TASKS.items()),
)
