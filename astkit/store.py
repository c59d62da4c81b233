"""astkit files: safetensors tensors plus JSON metadata, written atomically.

Every file astkit writes is a safetensors file (never pickle, so loading a
downloaded file cannot run code). Its string metadata holds one key,
``astkit``, a JSON document with at least ``kind`` (``trajectory``,
``distilled`` or ``checkpoint``), ``format`` (the file-format version) and
``astkit_version``. Writes go to a temporary file in the same folder that is
renamed over the target, so an interrupted write leaves the previous file.

Every write and folder creation of astkit goes through this module
(:func:`atomic_write`, :func:`make_dir`, :func:`append_line`), and
:func:`raise_write_error` is the one place that turns an OS or safetensors
error (permission denied, read-only file system, disk full, a file in the
way) into a one-line :class:`~astkit.errors.UserError`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from astkit._version import __version__
from astkit.errors import FileFormatError, UserError

FORMAT_VERSION = 1
KINDS = ("trajectory", "distilled", "checkpoint")


def astkit_version() -> str:
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


def require_file(path: str | Path, what: str, *, named: str = "",
                 fix: str = "pass a file (e.g. one of the .safetensors files in it)") -> Path:
    """``path`` as a Path if it is an existing regular file; else a one-line
    :class:`UserError` that says what it is instead (``named`` precedes the
    path in the message, ``fix`` follows a folder's)."""
    path = Path(path)
    label = f"{named} {path}" if named else str(path)
    if path.is_dir():
        raise UserError(f"{label} is a folder, not {what}; {fix}")
    if not path.exists():
        raise UserError(f"{label} does not exist (no such file); check the path")
    if not path.is_file():
        raise UserError(f"{label} is not a regular file; pass {what}")
    return path


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
    if isinstance(meta.get("format", 0), bool) or not isinstance(meta.get("format", 0), int):
        raise FileFormatError(f"{path}: astkit metadata has a format that is not an integer ({meta.get('format')!r}); the file is damaged, use an intact copy")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise FileFormatError(f"{path}: written by a newer astkit (format {meta['format']}); upgrade astkit")
    return meta


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``.

    The folder is made with :func:`make_dir`; an OS or safetensors error
    becomes a one-line :class:`UserError` (:func:`raise_write_error`), the
    temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise_write_error(path.parent, exc)
    os.close(fd)
    try:
        write(tmp)
        # after write(): safetensors replaces the file with its own 0600 one; mkstemp too makes 0600
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if write_errno(exc) is not None:
            raise_write_error(path, exc)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def make_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (and its parents) if missing; return it.

    Every folder astkit creates goes through here: a file in the way, no
    permission, a read-only file system or a full disk is a one-line
    :class:`UserError`.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise_write_error(path, exc)
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one whole line to ``path`` (created if missing), or nothing.

    The line goes out in as few ``os.write`` calls as the kernel allows on
    an ``O_APPEND`` descriptor; if one fails (a full disk) the file is cut
    back to its previous size, so it never ends in half a line. A tail
    without its newline (left by a crash of an older version) is dropped
    first. Errors become one-line :class:`UserError` errors.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except (OSError, ValueError) as exc:
        raise_write_error(path, exc)
    try:
        size = _drop_partial_line(fd)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except BaseException:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise_write_error(path, exc)
    finally:
        os.close(fd)


def _drop_partial_line(fd: int) -> int:
    """Cut the file after its last newline if it does not end in one; its size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":  # the usual case: one byte read
        return size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return size
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            break
        end = start
    os.ftruncate(fd, end)
    return end


def json_line(record: Any) -> str:
    """``record`` as strict JSON on one line: NaN and +-Infinity become ``null``."""
    return json.dumps(finite_json(record), allow_nan=False)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (recursively) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# ------------------------------------------------------------ write errors
#: errno of the problems :func:`raise_write_error` names (the rest are "cannot write ...: <strerror>");
#: an OSError with one of them is the user's environment, not a bug
WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                          errno.EEXIST, errno.EISDIR, errno.ENOTDIR})
_SAFETENSORS_TEXT = {"No space left": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                     "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS,
                     "Not a directory": errno.ENOTDIR, "Is a directory": errno.EISDIR}


def write_errno(exc: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or the one a
    safetensors ``SafetensorError`` names in its text; None for anything else."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno is not None else errno.EIO
    if isinstance(exc, SafetensorError) or type(exc).__name__ == "SafetensorError":
        text = str(exc)
        found = re.search(r"os error (\d+)|code: (\d+)", text)
        if found:
            return int(found.group(1) or found.group(2))
        for fragment, number in _SAFETENSORS_TEXT.items():
            if fragment in text:
                return number
        if "I/O error" in text or "IoError" in text:
            return errno.EIO
    return None


def raise_write_error(path: str | Path, exc: BaseException, *, writing: bool = True) -> NoReturn:
    """Raise the one-line :class:`UserError` for ``exc`` (OSError, SafetensorError
    or ValueError) met while writing or creating ``path``.

    The one place that turns write failures into messages. ``writing=False``
    (the CLI, for an OSError that escaped elsewhere and may come from a
    read) words the messages that could be either neutrally.
    """
    path = Path(path)
    number = write_errno(exc)
    if number in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(f"disk full while writing {path}; free space (or choose another --out) and run again (distillation continues with --resume)") from None
    if number == errno.EROFS:
        raise UserError(f"cannot write to {path}: read-only file system; choose a folder on a writable file system (--out)") from None
    blocker = _file_in_the_way(path) if number in (errno.EEXIST, errno.ENOTDIR) else None
    if writing:
        if number in (errno.EACCES, errno.EPERM):
            raise UserError(f"cannot write to {path}: permission denied; check the folder's permissions or choose another folder (--out)") from None
        if blocker is not None:
            raise UserError(f"cannot write to {path}: {blocker} is a file, not a folder; remove it or choose another folder (--out)") from None
        if number == errno.EISDIR:
            raise UserError(f"cannot write to {path}: it is a folder; remove it or choose another file name") from None
        if number is None and isinstance(exc, ValueError):
            raise UserError(f"cannot write to {path}: not a valid path ({exc}); choose another path") from None
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UserError(f"cannot write to {path}: {reason}; check the path, its permissions and the disk") from None
    if number in (errno.EACCES, errno.EPERM):
        raise UserError(f"{path}: permission denied; check its permissions or choose another path") from None
    if blocker is not None:
        raise UserError(f"{path}: {blocker} is a file, not a folder; remove it or choose another path") from None
    if number == errno.EISDIR:
        raise UserError(f"{path}: is a folder, a file was expected; pass a file") from None
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    raise UserError(f"{path}: {reason}; check the path, its permissions and the disk") from None


def _file_in_the_way(path: Path) -> Path | None:
    """``path`` or its nearest existing ancestor, if that is not a folder."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


def _umask() -> int:
    """The process's umask (read from /proc where it can be, so no other
    thread ever runs under a changed one)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
