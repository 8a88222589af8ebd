"""Read an uncompressed little endian DICOM file into pydicom's data set without parsing its sequences.

pydicom's reader parses every sequence of a file as it reads it: a PET slice carries 8 of them (radiopharmaceutical,
energy windows, source images, coded attributes...), about 20 ``Dataset`` objects a slice, and they were more than
half of the time to read a 267-slice series (0.31 s of the command's 0.35 s load). This reader walks the top level
of the data set from the file's bytes and gives pydicom each element raw, sequences included: a sequence is parsed
by pydicom (its own ``convert_SQ``) the first time something reads it, and a header the loader only compares or
copies never pays for it. The result is the ``FileDataset`` pydicom's ``dcmread(path, defer_size=...)`` builds
(same elements, file meta, encodings, deferred values read from the file when asked for); tested element for
element against it.

Only the plain case is read here: a Part 10 file with a preamble, Implicit or Explicit VR Little Endian, and
nothing at the top level that needs a guess (a private element of undefined length, an item outside a sequence,
encapsulated pixel data). Anything else returns None and the caller reads the file with pydicom, which also says
what is wrong with a broken one.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_HEAD = struct.Struct("<HHI")
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_UINT = struct.Struct("<I")
_CHARSET = 0x00080005


class _NotPlain(Exception):
    """The file needs pydicom's reader."""


def _element_header(data: bytes, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value length, header length) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise _NotPlain
    if implicit:
        group, element, length = _HEAD.unpack_from(data, pos)
        return (group << 16) | element, None, length, 8
    group, element, raw_vr, length = _EXPLICIT_HEAD.unpack_from(data, pos)
    tag = (group << 16) | element
    if group == 0xFFFE:  # items and delimiters have no VR, whatever the transfer syntax
        return tag, None, _UINT.unpack_from(data, pos + 4)[0], 8
    try:
        vr = raw_vr.decode("ascii")
    except UnicodeDecodeError:
        raise _NotPlain from None
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _NotPlain
        return tag, vr, _UINT.unpack_from(data, pos + 8)[0], 12
    return tag, vr, length, 8


def _sequence_end(data: bytes, pos: int, implicit: bool) -> int:
    """Where the Sequence Delimitation Item of an undefined-length sequence whose value starts at ``pos`` is."""
    while True:
        tag, _, length, head = _element_header(data, pos, True)  # items have the implicit layout in every syntax
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _NotPlain
        pos += head
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the Item Delimitation Item
            tag, vr, length, head = _element_header(data, pos, implicit)
            if tag == _ITEM_END:
                pos += head
                break
            pos += head
            if length == _UNDEFINED:
                if not _is_sequence(tag, vr):
                    raise _NotPlain
                pos = _sequence_end(data, pos, implicit) + 8
            else:
                pos += length
        if pos > len(data):
            raise _NotPlain


def _is_sequence(tag: int, vr: str | None) -> bool:
    if vr is not None:
        return vr == "SQ"
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:  # private or unknown: pydicom guesses; so does this reader not
        return False


def _meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """The file meta group (always Explicit VR Little Endian) and where the data set starts."""
    elements: dict[BaseTag, RawDataElement] = {}
    pos = 132
    while pos + 8 <= len(data) and _HEAD.unpack_from(data, pos)[0] == 2:
        tag, vr, length, head = _element_header(data, pos, False)
        if length == _UNDEFINED or pos + head + length > len(data):
            raise _NotPlain
        key = BaseTag(tag)
        elements[key] = RawDataElement(key, vr, length, data[pos + head:pos + head + length], pos + head, False, True)
        pos += head + length
    return FileMetaDataset(elements), pos


def read_plain(path: Path | str, defer_size: int | None = None) -> FileDataset | None:
    """The file as pydicom's ``dcmread(path, defer_size=defer_size)`` reads it, sequences left raw; None when it
    is not the plain case (see the module doc)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[128:132] != b"DICM":
        return None
    try:
        meta, pos = _meta(data)
        syntax = meta.get("TransferSyntaxUID")
        if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
            return None
        implicit = syntax == _IMPLICIT_LE
        elements: dict[BaseTag, RawDataElement] = {}
        end = len(data)
        while pos < end:
            tag, vr, length, head = _element_header(data, pos, implicit)
            start = pos + head
            key = BaseTag(tag)
            if length == _UNDEFINED:
                if not _is_sequence(tag, vr):  # encapsulated pixel data, a private sequence: pydicom's call
                    return None
                stop = _sequence_end(data, start, implicit)
                elements[key] = RawDataElement(key, vr, length, data[start:stop], start, implicit, True, True, True)
                pos = stop + 8
                continue
            if tag >> 16 == 0xFFFE or start + length > end:
                return None
            value: bytes | None = data[start:start + length]
            if defer_size is not None and length > defer_size:
                value = None  # read from the file when asked for, as pydicom defers it
            elements[key] = RawDataElement(key, vr, length, value, start, implicit, True)
            pos = start + length
    except (_NotPlain, struct.error):
        return None
    dataset = Dataset(elements)
    encoding: Any = "iso8859"
    if _CHARSET in elements:
        from pydicom.charset import convert_encodings
        from pydicom.dataelem import convert_raw_data_element

        encoding = convert_encodings(convert_raw_data_element(elements[BaseTag(_CHARSET)]).value)
    dataset.set_original_encoding(implicit, True, encoding)
    ds = FileDataset(str(path), dataset, data[:128], meta, implicit, True)
    ds.set_original_encoding(implicit, True, encoding)
    return ds
