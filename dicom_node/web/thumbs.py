"""Thumbnails for the status page: the central slice of a series' input and derived output side by side, and of
its stability or uncertainty map when the route wrote one.

Only the central slice's files are read (two or three files, not the series): the input's central slice is found
from the positions the state database recorded at receipt, the derived and SC map files are written in the
volume's slice order (``0000.dcm`` ...), so the middle file is the central slice. Input and output share one
window (the input's), so the denoising shows; the map has its own. PNGs are cached per (series, output, map,
revision): a page that refreshes every few seconds does not render again.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from dicom_node.state import StateDB

logger = logging.getLogger(__name__)

PANEL_MIN_PX = 160  # small series (tests, 32x32 synthetic slices) are enlarged to at least this height
PANEL_MAX_FACTOR = 8
GAP_PX = 4


def central_input_path(db: StateDB, series_uid: str) -> Path | None:
    """The received file holding the series' central slice (by position along the slice normal)."""
    rows = [r for r in db.instances(series_uid) if r.get("path")]
    if not rows:
        return None
    placed = [r for r in rows if r.get("ipp") and r.get("iop") and len(r["ipp"]) == 3 and len(r["iop"]) == 6]
    if len(placed) == len(rows):
        iop = np.asarray(placed[0]["iop"], dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        rows = sorted(placed, key=lambda r: float(np.dot(np.asarray(r["ipp"], dtype=float), normal)))
    return Path(rows[len(rows) // 2]["path"])


def _slice(path: Path) -> np.ndarray:
    """The (central, for multi-frame) 2D image of a file in stored-value units times the rescale."""
    ds = dcmread(path)
    pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]
    elif pixels.ndim == 3:  # a colour image: its luminance is enough for a thumbnail
        pixels = pixels.mean(axis=-1)
    elif pixels.ndim == 4:
        pixels = pixels[pixels.shape[0] // 2].mean(axis=-1)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels * slope + intercept


def _scaled(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """0..1 within the window (values outside clipped)."""
    span = high - low if high > low else 1.0
    return np.clip((image - low) / span, 0.0, 1.0)


def _gray_inverted(unit: np.ndarray) -> np.ndarray:
    """PET's usual reading display: activity dark on white."""
    v = np.round(255.0 * (1.0 - unit)).astype(np.uint8)
    return np.stack([v, v, v], axis=-1)


def _colour(unit: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return np.round(colormaps["magma"](unit)[..., :3] * 255.0).astype(np.uint8)


def _enlarge(rgb: np.ndarray, height: int) -> np.ndarray:
    factor = max(1, min(PANEL_MAX_FACTOR, -(-PANEL_MIN_PX // max(1, height))))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def _panel_row(panels: list[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    padded = []
    for k, p in enumerate(panels):
        canvas = np.full((height, p.shape[1], 3), 255, dtype=np.uint8)
        canvas[:p.shape[0]] = p
        padded.append(canvas)
        if k < len(panels) - 1:
            padded.append(np.full((height, GAP_PX, 3), 255, dtype=np.uint8))
    return np.concatenate(padded, axis=1)


def render(input_path: Path, output_path: Path, map_path: Path | None = None) -> bytes:
    """PNG bytes: input | output (one window, inverted gray) [| map (its own window, magma)]."""
    from PIL import Image

    source = _slice(input_path)
    derived = _slice(output_path)
    low, high = 0.0, float(np.percentile(source, 99.5)) if source.size else 1.0
    if high <= low:
        high = float(source.max()) if source.size and source.max() > low else low + 1.0
    panels = [_gray_inverted(_scaled(source, low, high)), _gray_inverted(_scaled(derived, low, high))]
    if map_path is not None:
        values = _slice(map_path)
        finite = values[np.isfinite(values)]
        m_low = float(finite.min()) if finite.size else 0.0
        m_high = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        panels.append(_colour(_scaled(np.nan_to_num(values, nan=m_low), m_low, m_high)))
    base = max(p.shape[0] for p in panels)
    row = _panel_row([_enlarge(p, base) for p in panels])
    buffer = io.BytesIO()
    Image.fromarray(row, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def pick_map(outputs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The map series a thumbnail shows: the Secondary Capture (one small file per slice) before the Parametric
    Map (one file holding every frame), stability before uncertainty."""
    maps = sorted((o for o in outputs if o["payload"] == "maps"),
                  key=lambda o: (o["format"] != "sc", o["kind"] != "stability", o["output_series_uid"]))
    return maps[0] if maps else None


def _middle_file(directory: Path) -> Path | None:
    files = sorted(directory.glob("*.dcm")) if directory.is_dir() else []
    return files[len(files) // 2] if files else None


class Thumbnails:
    """Thumbnail PNGs per source series, rendered once per output (a small LRU cache)."""

    def __init__(self, db: StateDB, max_entries: int = 32) -> None:
        self.db = db
        self.max_entries = max_entries
        self.renders = 0  # how many were rendered (the rest came from the cache)
        self._cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def sources(self, series_uid: str) -> dict[str, Any] | None:
        """What a thumbnail of ``series_uid`` shows: the files and the key they are cached under (None: no
        derived output on disk yet)."""
        row = self.db.series(series_uid)
        if row is None or row.get("purged_at"):
            return None
        outputs = self.db.outputs(series_uid)
        derived = next((o for o in outputs if o["payload"] == "derived"), None)
        out_dir = Path(derived["dir"]) if derived else Path(row["output_dir"]) if row.get("output_dir") else None
        output_uid = derived["output_series_uid"] if derived else row.get("output_series_uid")
        if out_dir is None or not output_uid:
            return None
        map_row = pick_map(outputs)
        return {"series_uid": series_uid, "output_uid": output_uid, "output_dir": out_dir,
                "map": map_row, "key": (series_uid, output_uid, int(row.get("revision") or 0),
                                        map_row["output_series_uid"] if map_row else None)}

    def png(self, series_uid: str) -> bytes | None:
        """The thumbnail of ``series_uid`` (None when it has no derived output to show)."""
        src = self.sources(series_uid)
        if src is None:
            return None
        key = src["key"]
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        input_path = central_input_path(self.db, series_uid)
        output_path = _middle_file(src["output_dir"])
        if input_path is None or output_path is None:
            return None
        map_path = _middle_file(Path(src["map"]["dir"])) if src["map"] is not None else None
        png = render(input_path, output_path, map_path)
        with self._lock:
            self.renders += 1
            self._cache[key] = png
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return png
