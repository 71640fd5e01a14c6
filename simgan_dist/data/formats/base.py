"""What every real format of `simgan-dist ingest` is: a `Format`, the rows it yields, and shared helpers.

A format is a `Format` subclass with a `name`; defining it registers it in `FORMATS`, and
`simgan_dist.data.formats` imports every module of the package, so a new format is one new
file there. `scan` runs once in the driver and lists the work items (files, HDF5 keys, ...)
in a fixed natural order; `read_item` turns one item into `Row`s, or raises `Reject` to send
it to quarantine with a reason.

Label conventions are the simulator's (`render.py`):

* `gaze`: unit vector in the camera frame, x right, y down, z away from the camera
  ((0, 0, -1) looks into the camera).
* `pupil_xy`, `joints_uvd` u/v: pixels of the output image, x right, y down, pixel
  centres at integer coordinates. `joints_uvd` depth stays in millimetres.
* `head_pose`: radians, (0, 0, 0) for a head facing the camera where the source allows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from simgan_dist.config import Config
from simgan_dist.data.schema import Layout
from simgan_dist.errors import UserError


class IngestError(UserError, ValueError):
    """SRC or the options cannot be ingested at all; the message names the file or field."""


class Reject(Exception):
    """One item cannot be used: it goes to quarantine under `reason` (a short category)."""

    def __init__(self, reason: str, detail: str, path: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.path = reason, detail, path


@dataclass
class Row:
    id: str
    image: np.ndarray  # H×W×C
    labels: dict[str, Any]
    source: str  # the file (and part of it) the row came from, relative to SRC


@dataclass(frozen=True)
class Quarantined:
    source_path: str
    reason: str
    detail: str


def natural_key(text: str) -> list:
    """'imgs/10.jpg' sorts after 'imgs/9.jpg'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def open_image(path: Path, mode: str | None = None) -> Image.Image:
    """Decode the whole file now (truncated files fail here) and convert to `mode`."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Reject("corrupt image", f"{path.name}: {exc}") from None


def read_mat(path: Path, rel: str, **options: Any) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path, **options)
    except Exception as exc:  # scipy fails on damaged files with IndexError, struct.error, ...
        raise Reject("corrupt file", f"{rel}: not a readable .mat file ({type(exc).__name__}: {exc})") from None


def crop_box(points: np.ndarray, scale: float, out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer box (x0, y0, w, h) with the output's aspect, centred on the points' bounding box
    and `scale` times larger than it along its tighter side."""
    lo, hi = points.min(0), points.max(0)
    aspect = out_hw[1] / out_hw[0]
    width = max(hi[0] - lo[0], (hi[1] - lo[1]) * aspect, 1.0) * scale
    cx, cy = (lo + hi) / 2
    w, h = max(1, round(width)), max(1, round(width / aspect))
    return round(cx - w / 2 + 0.5), round(cy - h / 2 + 0.5), w, h


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], out_hw: tuple[int, int],
                resample: int) -> np.ndarray:
    """Cut `box` (zeros where it leaves the image) and resize to out_hw."""
    x0, y0, w, h = box
    return np.asarray(img.crop((x0, y0, x0 + w, y0 + h)).resize(out_hw[::-1], resample))


def to_crop(points: np.ndarray, box: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Source pixel coordinates → output pixel coordinates (both with pixel centres at integers)."""
    x0, y0, w, h = box
    scale = np.array([out_hw[1] / w, out_hw[0] / h])
    return (points + 0.5 - np.array([x0, y0])) * scale - 0.5


FORMATS: dict[str, type[Format]] = {}  # by name; filled as the family modules are imported


class Format:
    """One source format. Instances are pickled to the pool's workers: keep them small."""

    name: ClassVar[str]
    items_per_task: ClassVar[int] = 256

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.name in FORMATS:
            raise TypeError(f"two ingest formats are named {cls.name!r}: {FORMATS[cls.name]} and {cls}")
        FORMATS[cls.name] = cls

    def __init__(self, src: Path, kind: str | None, cfg: Config, labels_csv: Path | None):
        self.src = src
        self.kind = kind

    def scan(self) -> tuple[Layout, list[Any], list[Quarantined]]:
        """Driver side: the layout, the work items in order, and what is already known to be bad."""
        raise NotImplementedError

    def default_kind(self, layout: Layout) -> str:
        return "real"

    def where(self, item: Any) -> str:
        """The source path named in quarantine for an item that fails as a whole."""
        return str(item)

    def open(self) -> contextlib.AbstractContextManager:
        """Per-chunk resource handed to `read_item` (an open HDF5 file, ...)."""
        return contextlib.nullcontext()

    def read_item(self, item: Any, handle: Any) -> Iterable[Row | Quarantined]:
        raise NotImplementedError

    def read(self, items: list[Any]) -> Iterator[Row | Quarantined]:
        with self.open() as handle:
            for item in items:
                try:
                    yield from self.read_item(item, handle)
                except Reject as r:
                    yield Quarantined(r.path or self.where(item), r.reason, r.detail)

    def files(self, pattern: str) -> list[str]:
        """Paths under SRC matching `pattern` (a regex on the relative path), in natural order."""
        regex = re.compile(pattern, re.IGNORECASE)
        found = (p.relative_to(self.src).as_posix() for p in self.src.rglob("*") if p.is_file())
        return sorted((p for p in found if regex.search(p)), key=natural_key)
