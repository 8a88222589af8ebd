"""Values read straight from a data set's undecoded (raw) elements, leaving them undecoded.

pydicom decodes an element the first time it is read (value conversion, hooks, a new DataElement written back
into the data set). For the few attributes that receive checks and loading read from every instance (UIDs,
Modality, image size, positions) that decoding was a fifth of the C-STORE handler's time, and it also broke the
sharing of equal raw elements between the slices of a series (:class:`dicom_node.series.ElementSharer`) and the
derived writer's copying of raw bytes. These readers parse the value bytes of an element that is still raw and
of a VR they understand; anything else (already decoded, another VR, big endian binary, unparsable text) goes
through pydicom exactly as before, so the values are the same either way (tested against pydicom).
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# VRs whose values are ASCII text by definition (PS3.5 6.2): their raw bytes decode without a character set.
_ASCII_VRS = (None, "UI", "CS", "IS", "DS", "AS", "DA", "TM")


@lru_cache(maxsize=None)
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return tag


def raw_element(ds: Dataset, keyword: str) -> RawDataElement | None:
    """The element if it is still undecoded and holds bytes (None otherwise, also when absent)."""
    store = getattr(ds, "_dict", None)
    elem = store.get(_tag(keyword)) if isinstance(store, dict) else None
    return elem if isinstance(elem, RawDataElement) and isinstance(elem.value, (bytes, type(None))) else None


def text(ds: Dataset, keyword: str) -> str | None:
    """An ASCII-text element's value as a string, trailing padding removed (None when absent).

    Multiple values come back joined with a backslash, as they are stored; pydicom's MultiValue would give a
    list here, which no caller of this function accepts anyway (UIDs, Modality and counts are single-valued).
    """
    elem = raw_element(ds, keyword)
    if elem is not None and elem.VR in _ASCII_VRS:
        value = elem.value or b""
        return value.decode("ascii", "replace").strip("\0 ")
    store = getattr(ds, "_dict", None)
    if isinstance(store, dict) and _tag(keyword) not in store:
        return None
    value = ds.get(keyword)
    return None if value is None else str(value)


def integer(ds: Dataset, keyword: str) -> int | None:
    """An IS or US element as an int (None when absent, empty or not an integer)."""
    elem = raw_element(ds, keyword)
    if elem is not None:
        value = elem.value or b""
        if elem.VR in (None, "US") and len(value) == 2 and elem.is_little_endian and _is_binary(keyword):
            return int(struct.unpack("<H", value)[0])
        if elem.VR in (None, "IS") and not _is_binary(keyword):
            try:
                return int(value.strip(b"\0 ")) if value.strip(b"\0 ") else None
            except ValueError:
                pass  # "267.0" and the like: pydicom's IS decides
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - an element pydicom cannot decode is not an integer either
        return None
    return _int_or_none(value)


def decimals(ds: Dataset, keyword: str) -> list[float] | None:
    """A Decimal String element's numbers read from its bytes; None when it is not raw DS of plain finite
    numbers (the caller then asks pydicom, which also reports what is wrong)."""
    elem = raw_element(ds, keyword)
    if elem is None or elem.VR not in ("DS", None) or not elem.value:
        return None
    try:
        numbers = [float(v) for v in elem.value.split(b"\\")]
    except ValueError:
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def value_length(ds: Dataset, keyword: str) -> int:
    """The byte length of an element's value (Pixel Data) without decoding it; raises as pydicom would."""
    elem = raw_element(ds, keyword)
    if elem is not None:
        return len(elem.value or b"")
    return len(ds[keyword].value)


@lru_cache(maxsize=None)
def _is_binary(keyword: str) -> bool:
    from pydicom.datadict import dictionary_VR

    return dictionary_VR(_tag(keyword)) == "US"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
