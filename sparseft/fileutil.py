"""Small file helpers: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sparseft.errors import InputError, SparseftError


class OutputPathError(InputError):
    """A path to write that cannot be written: a folder where a file goes, a file where a folder goes,
    a parent that is a file or a folder this process cannot write into (the message names the path)."""


def _named(path: str | Path, label: str | None) -> str:
    """How a message names an output path: `--out x.csv` on the command line, `x.csv` from Python."""
    return f"{label} {path}" if label else str(path)


def _check_parent(path: Path, name: str) -> None:
    """The folder `path` goes into, or the nearest existing folder above it (the missing ones are
    created on writing), is a folder this process may write into."""
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{name}: {parent} is {'a broken link' if parent.is_symlink() else 'a file'}, not a "
                              "folder to write into")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name}: cannot write into the folder {parent} (permission denied or a read-only "
                              "file system)")


def check_output_file(path: str | Path, *, overwrite: bool = True, source: str | Path | None = None,
                      source_is: str = "input file", label: str | None = None, what: str = "file") -> Path:
    """The file `path` names, checked before anything is computed or written; the one check of every
    output file, from the command line (`label="--out"`, `overwrite=args.overwrite`) and from Python
    (`sparseft.save_delta`, `save_merged`, `Selection.save`, `write_csv`, ...: `atomic_path` runs it).

    Refused, naming the path: an empty path, a folder or a path ending in '/'; the `source` file
    itself (`source_is` says what it is); an existing file unless
    `overwrite` (FileExistsError); a parent that is a file; a folder this process cannot write into.
    A missing parent is created on writing. `what` names the file in messages (".csv file").
    """
    raw = str(path)
    name = _named(raw, label)
    path = Path(path)
    if not raw.strip() or raw.endswith(("/", os.sep)) or path.is_dir():
        raise OutputPathError(f"{label + ' ' if label else ''}{raw!r} is a folder (or empty); name the {what} to "
                              "write")
    if source is not None and path.exists() and path.resolve() == Path(source).resolve():
        raise OutputPathError(f"{name} is the {source_is} itself; choose another path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{name} exists; pass --overwrite to replace it, or choose another path")
    _check_parent(path, name)
    return path


def check_output_folder(path: str | Path, *, label: str | None = None, what: str = "its files") -> Path:
    """The folder `path` names, checked before any work: not empty, not a file, and inside a folder
    this process may write into (a missing folder is created on writing). `what` says what goes in it."""
    raw = str(path)
    name = _named(raw, label)
    if not raw.strip():
        raise OutputPathError(f"{label + ' is empty' if label else 'an empty path'}; name a folder for {what}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{name} is a file; name a folder for {what}")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{name}: cannot write into this folder (permission denied or a read-only file "
                                  "system)")
    else:
        _check_parent(path, name)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or an exception leaves the old file (or no file) and never half a file. `path` is
    checked first (`check_output_file`: not a folder, a writable place); an OS error while writing
    names `path`, not the temporary file.
    """
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        give_umask_permissions(tmp)  # mkstemp (and safetensors' writer) make 0600: what open() would give
        os.replace(tmp, path)
    except OSError as err:
        if tmp not in (err.filename, err.filename2):
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_permissions(path: str | Path) -> None:
    """Give `path` the permissions the umask gives a new file (0666 & ~umask) or folder (0777 & ~umask), and so
    everything inside a folder: what `open()` and `mkdir()` would give, whoever wrote it. Every atomic write
    runs it before its rename: `tempfile.mkstemp` and `mkdtemp` make 0600 and 0700, and some writers
    (safetensors' `save_file`) make their files 0600 whatever the umask. A file with an execute bit keeps
    execute bits (0777 & ~umask); links are left as they are."""
    mask = _umask()

    def give(item: str | Path) -> None:
        if os.path.islink(item):
            return
        mode = os.stat(item).st_mode
        os.chmod(item, (0o777 if mode & 0o111 or os.path.isdir(item) else 0o666) & ~mask)

    give(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                give(os.path.join(root, name))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically, as UTF-8. A file name that is not UTF-8 (Python holds its bytes as
    surrogates, e.g. '\udcff') is written back as the bytes it has on disk, not refused mid-write."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def cache_dir() -> Path:
    """sparseft's cache folder: compiled kernels, fetched data sets and weights.

    ``$SPARSEFT_CACHE`` if set, else ``$XDG_CACHE_HOME/sparseft`` or ``~/.cache/sparseft``.
    """
    root = os.environ.get("SPARSEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparseft")
    return Path(root)


def read_tagged_safetensors(
        path: str | Path, fmt: str | tuple[str, ...], header_key: str, error: type[Exception], what: str, *,
        untagged: Callable[[Path, dict[str, str], dict[str, torch.Tensor]], str] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a safetensors file whose metadata holds `format` (`fmt`, or one of several) and a JSON `header_key`.

    Any problem (missing, truncated, corrupt, another kind of file, bad header) raises `error`
    with a message that names the file. A file that is none of sparseft's (no `format`, or one
    not `sparseft.*`: `"pt"` is what timm, Hugging Face, peft and `sparseft weights convert`
    write for a plain state dict) is described by `untagged(path, metadata, tensors)` when given.
    Returns (header, tensors).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise error(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from err
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if not str(metadata.get("format", "")).startswith("sparseft."):  # none of sparseft's files
        raise error(f"{path}: {untagged(path, metadata, tensors)}" if untagged is not None else
                    f"{path}: not a sparseft {what}: a safetensors file without sparseft's header ({len(tensors)} "
                    "tensors)")
    if metadata["format"] not in formats:
        raise error(f"{path}: not a sparseft {what} (format {metadata['format']!r}, expected "
                    f"{' or '.join(map(repr, formats))})")
    try:
        header = json.loads(metadata[header_key])
    except (KeyError, json.JSONDecodeError) as err:
        raise error(f"{path}: {what} header is missing or malformed") from err
    if not isinstance(header, dict):
        raise error(f"{path}: {what} header is not a JSON object")
    return header, tensors


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor's values, row-major, for hashing (no copy for a contiguous CPU tensor)."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_json(path: str | Path, error: type[Exception], what: str) -> Any:
    """The JSON in `path`; a file that does not parse raises `error` naming it and `what` it should be."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed {what} ({err})") from err


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


LOCK_FILE = ".sparseft.lock"


class FolderInUse(SparseftError, RuntimeError):
    """Another live process holds the folder's lock."""


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether a process of this host with this pid runs (one we may not signal counts as running);
    with `started` (its `process_start` when the lock was taken), a newer process that was given
    the same pid does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or process_start(pid) in (None, started)


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command name) "
    return fields[19] if len(fields) > 19 else None  # field 22 of the file: starttime


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder/.sparseft.lock` while the block runs, or raise FolderInUse naming the holder.

    The lock is the kernel's (`fcntl.flock` on the file): it ends with its process however that
    process ends, and of processes that try at once exactly one gets it. The file reads
    "host+flock start pid" so that a refusal can name the holder. A file written by the earlier
    scheme (the file's existence was the lock: "host start pid" or "host pid") counts while the
    process it names runs, or always when that process is on another host. One process cannot hold
    the same folder's lock twice. On network file systems the lock is as good as their `flock`.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    fd = _take_lock(folder, path)
    try:
        yield
    finally:
        try:
            with contextlib.suppress(OSError):  # a file left behind is free: nobody holds its flock
                path.unlink()  # before the lock ends, so that no one locks a removed file
        finally:
            os.close(fd)


#: marks a lock file written under `flock`; an earlier reader sees another host and never takes it over
LOCK_MARK = "+flock"
#: how long an unmarked, empty lock file may be still being written by the earlier scheme
LOCK_WRITE_GRACE_S = 2.0


def _take_lock(folder: Path, path: Path) -> int:
    import fcntl
    import socket

    host, me = socket.gethostname(), os.getpid()
    for _ in range(100):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            try:  # a file this call creates cannot be an earlier scheme's lock being written
                fd, created = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
            except FileExistsError:
                fd, created = os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # the folder or the file was removed meanwhile (a run cleaning up): again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(folder, path, "") from None
            except OSError as err:
                raise OSError(err.errno, f"cannot lock {path}: {err.strerror} (sparseft needs a file system with "
                                         "flock for its run and results folders)") from None
            if not _same_file(fd, path):  # its holder removed it between our open and flock: a new file
                os.close(fd)
                continue
            holder = None if created else _earlier_holder(fd, path)
            if holder is not None and (holder[0] != host or (holder[2] != me and process_alive(holder[2], holder[1]))):
                raise _in_use(folder, path, f" (if that process no longer runs, delete {path})")
            os.ftruncate(fd, 0)
            os.write(fd, " ".join([host + LOCK_MARK, process_start(me) or "-", str(me)]).encode())
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise OSError(f"cannot lock {path}: it was replaced 100 times in a row")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False


def _earlier_holder(fd: int, path: Path) -> tuple[str, str | None, int] | None:
    """The holder named by a lock file of the earlier scheme (no flock), or None. An empty file
    younger than LOCK_WRITE_GRACE_S may be one such being written: read it again until it is not."""
    while True:
        st = os.fstat(fd)
        if st.st_size or time.time() - st.st_mtime >= LOCK_WRITE_GRACE_S:
            break
        time.sleep(0.05)
    holder = _lock_holder(path)
    return holder[:3] if holder is not None and not holder[3] else None


def _in_use(folder: Path, path: Path, hint: str) -> FolderInUse:
    holder = _lock_holder(path)
    who = f"process {holder[2]} on {holder[0]}" if holder else "another process"
    return FolderInUse(f"{folder} is in use by {who}{hint}")


def _lock_holder(path: Path) -> tuple[str, str | None, int, bool] | None:
    """(host, start or None, pid, written under flock) of a lock file ("host+flock start pid", or the
    earlier "host start pid" and "host pid"); None if it is empty, unreadable or gone."""
    try:
        fields = path.read_text().split(" ")
        if len(fields) not in (2, 3):
            return None
        start = fields[1] if len(fields) == 3 and fields[1] != "-" else None
        host = fields[0].removesuffix(LOCK_MARK)
        return host, start, int(fields[-1]), host != fields[0]
    except (OSError, ValueError):
        return None
