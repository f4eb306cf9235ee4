"""GPS (Zhang et al., CVPR 2024): the official scripts' settings, github.com/FightingFighting/GPS.

Per task: train_scripts/vit/<benchmark>/<task>/train_gps.sh. Flags a script does not pass take
args.py's defaults: mixup 0.8 and cutmix 1.0 on FGVC (its scripts pass no `--mixup 0`), label
smoothing 0.1 (applied through mixup's soft targets), the selection views' crop scale 0.08-1
(`--scale`). train_gps.py: Adam from optim_factory, timm's ModelEmaV2 when `--model-ema`, the
selection pass under the same fp16 autocast as training (`--amp`); data/loader.py drops the last
partial batch of every training loader (the selection's included). timm 0.6.5's create_scheduler
adds 10 cool-down epochs at min-lr after the 100 cosine epochs (`--cooldown-epochs` default).
"""

from __future__ import annotations

from sparseft.bench.official.table import Row, Table

REPOSITORY = "github.com/FightingFighting/GPS"
COMMIT = "72e0c31564f46b6b6a166b54a28f2a8f48cec031"

_COMMON = {"epochs": 100, "cooldown_epochs": 10, "warmup_epochs": 10, "warmup_lr": 1e-7, "min_lr": 1e-8,
           "optimizer": "adam", "weight_decay": 0.0, "amp": True, "drop_last": True,
           "selection_crop_scale": [0.08, 1.0], "backbone": "vit_base_patch16_224_in21k"}
_VTAB = {**_COMMON, "augmentation": "direct-resize", "eval_direct_resize": True, "ema_decay": None,
         "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0}
_FGVC = {**_COMMON, "augmentation": "simple-aug", "eval_direct_resize": False, "mixup": 0.8, "cutmix": 1.0,
         "smoothing": 0.1}

# task folder: (script folder, lr, batch size, drop-path, K = --times_para, classes)
_VTAB_TASKS = {
    "caltech101": ("caltech101", 2e-3, 16, 0.0, 1, 102),
    "cifar": ("cifar_100", 1e-2, 32, 0.0, 1, 100),
    "clevr_count": ("clevr_count", 3e-4, 16, 0.1, 1, 8),
    "clevr_dist": ("clevr_dist", 2e-3, 16, 0.1, 1, 6),
    "diabetic_retinopathy": ("diabetic_retinopathy", 2e-3, 32, 0.2, 1, 5),
    "dmlab": ("dmlab", 1.5e-3, 16, 0.1, 1, 6),
    "dsprites_loc": ("dsprites_loc", 7e-3, 32, 0.0, 1, 16),
    "dsprites_ori": ("dsprites_ori", 5e-4, 16, 0.2, 1, 16),
    "dtd": ("dtd", 2e-3, 16, 0.0, 1, 47),
    "eurosat": ("eurosat", 2e-3, 16, 0.0, 1, 10),
    "oxford_flowers102": ("flowers102", 2e-3, 16, 0.0, 1, 102),
    "kitti": ("kitti", 1e-3, 16, 0.0, 1, 4),
    "patch_camelyon": ("patch_camelyon", 4e-3, 32, 0.0, 2, 2),
    "oxford_iiit_pet": ("pets", 3e-3, 32, 0.0, 1, 37),
    "resisc45": ("resisc45", 1.5e-3, 16, 0.1, 1, 45),
    "smallnorb_azi": ("smallnorb_azi", 3e-3, 32, 0.1, 1, 18),
    "smallnorb_ele": ("smallnorb_ele", 3e-4, 32, 0.2, 1, 9),
    "sun397": ("sun397", 2.5e-3, 16, 0.0, 1, 397),
    "svhn": ("svhn", 5e-3, 32, 0.0, 1, 10),
}

# task folder: (script folder, lr, batch size, drop-path, K, EMA decay, classes)
_FGVC_TASKS = {
    "CUB_200_2011": ("cub_2011", 3e-3, 32, 0.0, 2, 0.9998, 200),
    "nabirds": ("nabirds", 1e-4, 32, 0.1, 20, 0.9998, 555),
    "OxfordFlower": ("oxford_flowers", 1e-3, 32, 0.1, 1, 0.99, 102),
    "Stanford-cars": ("stanford_cars", 5e-4, 32, 0.0, 15, 0.9998, 196),
    "Stanford-dogs": ("stanford_dogs", 1e-4, 64, 0.0, 1, 0.9998, 120),
}

_NOTES = (
    "the paper reports the best test accuracy over the epochs (train_gps.py evaluates after every epoch; with "
    "--model-ema its checkpoint saver ranks the EMA's)",
    "train_scripts/vit/vtab/flowers102/train_gps.sh ends in '--contrastiveve', which argparse refuses; read as "
    "--contrastive like every other script",
)

VTAB = Table(
    name="gps-vtab", paper="gps", benchmark="vtab-1k", repository=REPOSITORY, commit=COMMIT,
    backbone="vit_base_patch16_224.augreg_in21k", backbone_file="B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-"
                                                               "sd_0.0.npz (models/vision_transformer.py)",
    protocol="train800val200 -> test, best test top-1 over 110 epochs", notes=_NOTES,
    rows=tuple(Row(task=t, source=f"train_scripts/vit/vtab/{d}/train_gps.sh",
                   values={**_VTAB, "lr": lr, "batch_size": b, "drop_path": dp, "k": k, "num_classes": c})
               for t, (d, lr, b, dp, k, c) in sorted(_VTAB_TASKS.items(), key=lambda kv: kv[1][0])),
)

FGVC = Table(
    name="gps-fgvc", paper="gps", benchmark="fgvc", repository=REPOSITORY, commit=COMMIT,
    backbone=VTAB.backbone, backbone_file=VTAB.backbone_file,
    protocol="train + val -> test, best test top-1 (the EMA's) over 110 epochs", notes=_NOTES,
    rows=tuple(Row(task=t, source=f"train_scripts/vit/fgvc/{d}/train_gps.sh",
                   values={**_FGVC, "lr": lr, "batch_size": b, "drop_path": dp, "k": k, "ema_decay": ema,
                           "num_classes": c})
               for t, (d, lr, b, dp, k, ema, c) in sorted(_FGVC_TASKS.items(), key=lambda kv: kv[1][0])),
)
