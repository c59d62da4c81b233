"""Reading a ``torch.save`` file without running code: ``weights_only=True`` only."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from astkit import store
from astkit.errors import FileFormatError

#: what torch names when a file asks for a global outside its allowed list
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
#: how a torch.save file begins: a zip archive, or a pickle (the legacy format)
_MAGIC = (b"PK", b"\x80")


def load_plain(path: str | Path, named: str = "", kind: str = "tensor file") -> Any:
    """The object in the ``torch.save`` file at ``path``, loaded with
    ``torch.load(map_location="cpu", weights_only=True)`` and nothing else.

    Tensors, numbers, strings, lists, tuples and dicts load; a file that needs
    full unpickling (an object of any other class) is refused in one line,
    without running its code. ``named`` (an option, ``"--labels"``) precedes
    the path in messages; ``kind`` is what the file should be (``"tensor buffer"``).
    """
    import torch

    path = store.require_file(path, "a file written by torch.save", named=named, fix="pass the .pt file")
    what = f"{named} {path}" if named else str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        store.raise_write_error(path, exc, writing=False)
    if not head.startswith(_MAGIC):
        raise FileFormatError(f"{what}: not a file torch.save wrote (neither a zip archive nor a pickle); "
                              "pass the .pt file itself")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        needs = f" (it needs {found.group(1)})" if found else ""
        raise FileFormatError(
            f"{what}: not a plain {kind}{needs}; astkit loads .pt files with weights_only=True only "
            "and never unpickles other objects: save plain tensors and lists of them"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not its own
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise FileFormatError(
            f"{what}: not a file torch.save wrote, or damaged ({type(exc).__name__}: {reason}); "
            "pass the .pt file itself"
        ) from None
