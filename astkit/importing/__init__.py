"""Importing files made by the reference scripts (MTT, AST, FTD, DATM).

* :func:`import_buffers`: ``replay_buffer_N.pt`` expert buffers into astkit
  trajectory files, one per trajectory;
* :func:`import_distilled`: published ``images``/``labels``/``lr`` tensors
  into an astkit distilled file.

Every ``.pt`` file is read by :func:`load_plain`, with
``torch.load(weights_only=True)`` only: plain tensors, numbers and lists load,
anything that needs full unpickling is refused without running it.
"""

from astkit.importing.buffers import BufferImport, import_buffers, read_buffer
from astkit.importing.convnet import reference_names, resolve_convnet
from astkit.importing.distilled import DEFAULT_LR_NOTE, import_distilled
from astkit.importing.torch_files import load_plain

__all__ = [
    "DEFAULT_LR_NOTE", "BufferImport", "import_buffers", "import_distilled", "load_plain", "read_buffer",
    "reference_names", "resolve_convnet",
]
