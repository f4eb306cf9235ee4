"""SPT (He et al., ICCV 2023): the official scripts' settings, github.com/ziplab/SPT.

configs/vtab_supervised_spt_{lora,adapter}.sh run every VTAB-1k task with the same settings and
sweep the trainable budget (`param_req_0.2` ... `param_req_1.0`: 0.2 M to 1.0 M parameters; the
README: "we sweep different trainable parameter budgets to seek potential better results").
Flags a script does not pass take train_spt.py's defaults: 10 warm-up epochs from 1e-6, min lr
1e-5, drop-path 0.1, no EMA (the script never builds one), no amp (`--amp` is off unless given).
train_spt.py trains `--epochs` epochs (no cool-down), keeps the last partial batch, evaluates at
epochs 0, 10, 20, ... and every one of the last ten, and reports the best of those.
"""

from __future__ import annotations

from sparseft.bench.official.table import GOOGLE_VIT_B16_IN21K, Row, Table

TASKS = ("cifar", "caltech101", "dtd", "oxford_flowers102", "svhn", "sun397", "oxford_iiit_pet", "patch_camelyon",
         "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
         "dsprites_ori", "smallnorb_azi", "smallnorb_ele")

_COMMON = {"lr": 1e-3, "batch_size": 64, "epochs": 100, "warmup_epochs": 10, "warmup_lr": 1e-6, "min_lr": 1e-5,
           "optimizer": "adamw", "weight_decay": 1e-4, "drop_path": 0.1, "rank": 8, "spt_alpha": 10.0,
           "budgets": [1_000_000, 800_000, 600_000, 400_000, 200_000], "augmentation": "direct-resize",
           "ema_decay": None, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0, "amp": False, "drop_last": False,
           "pretrained": "ViT-B_16.npz"}

VTAB = Table(
    name="spt-vtab", paper="spt", benchmark="vtab-1k", repository="github.com/ziplab/SPT",
    commit="e385f67ef0cba524b44072d52ec0650a7022f4e2",
    **GOOGLE_VIT_B16_IN21K,
    protocol="train800val200 -> test, best of the evaluated epochs, best over the budget sweep",
    rows=tuple(Row(task=t, method=f"spt-{kind}", source=f"configs/vtab_supervised_spt_{kind}.sh",
                   values={**_COMMON, "backbone": "vit_base_patch16_224_in21k_spt"})
               for kind in ("lora", "adapter") for t in TASKS),
)
