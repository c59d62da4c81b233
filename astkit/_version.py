"""astkit's version: the one place it is written.

``pyproject.toml`` reads it from here (``[tool.setuptools.dynamic]``), and
``astkit``, :mod:`astkit.store` (file metadata) and the report import it
from here, so no module needs the package face for it.
"""

__version__ = "0.1.0"
