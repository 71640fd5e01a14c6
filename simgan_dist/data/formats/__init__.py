"""The real dataset formats `simgan-dist ingest` reads, found by name in `FORMATS`.

Every module here but `base` is a family of formats; importing this package imports them
all, and each `Format` subclass registers itself under its `name`. A new format is one new
file in this folder.
"""

import importlib
import pkgutil

from simgan_dist.data.formats.base import FORMATS, Format

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FORMATS", "Format"]
