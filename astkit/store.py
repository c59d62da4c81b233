"""astkit files: safetensors tensors plus JSON metadata, written atomically.

Every file astkit writes is a safetensors file (never pickle, so loading a
downloaded file cannot run code). Its string metadata holds one key,
``astkit``, a JSON document with at least ``kind`` (``trajectory``,
``distilled`` or ``checkpoint``), ``format`` (the file-format version) and
``astkit_version``. Writes go to a temporary file in the same folder that is
renamed over the target, so an interrupted write leaves the previous file.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from astkit.errors import FileFormatError, UserError

FORMAT_VERSION = 1
KINDS = ("trajectory", "distilled", "checkpoint")


def astkit_version() -> str:
    from astkit import __version__

    return __version__


def save(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` to ``path`` atomically; return the path."""
    path = Path(path)
    header = {**meta, "kind": kind, "format": FORMAT_VERSION, "astkit_version": astkit_version()}
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(payload, tmp, metadata={"astkit": json.dumps(header)}))
    return path


def load(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an astkit file; check it is one (of ``kind`` if given)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file; check the path")
    meta = read_metadata(path)
    if kind is not None and meta.get("kind") != kind:
        raise FileFormatError(f"{path}: expected an astkit {kind} file, this one holds a {meta.get('kind')}; pass a {kind} file (astkit show FILE tells what a file holds)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: corrupt or truncated astkit file ({exc}); use an intact copy or rerun the stage that wrote it") from None
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an astkit file, without loading its tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size_bytes = fh.read(8)
            if len(size_bytes) < 8:
                raise ValueError("shorter than a safetensors header")
            size = int.from_bytes(size_bytes, "little")
            if size <= 0 or size > 100_000_000 or size + 8 > path.stat().st_size:
                raise ValueError("bad header length")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path}: not an astkit file (not safetensors: {exc}); astkit reads only the .safetensors files it wrote") from None
    raw = (header.get("__metadata__") or {}).get("astkit") if isinstance(header, dict) else None
    if raw is None:
        raise FileFormatError(f"{path}: a safetensors file, but not one astkit wrote (no astkit metadata); astkit reads only files it wrote")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise FileFormatError(f"{path}: astkit metadata is not valid JSON; the file is damaged, use an intact copy") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise FileFormatError(f"{path}: astkit metadata has no known kind; the file is damaged or from another tool")
    if int(meta.get("format", 0)) > FORMAT_VERSION:
        raise FileFormatError(f"{path}: written by a newer astkit (format {meta['format']}); upgrade astkit")
    return meta


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write to {path.parent}: {exc.strerror}; check its permissions or choose another folder") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; free space and resume with --resume") from None
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
