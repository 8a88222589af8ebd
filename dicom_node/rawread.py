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

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
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


def _meta_elements(data: bytes) -> tuple[dict[int, tuple[str | None, int, int]], int]:
    """The file meta group (always Explicit VR Little Endian) of a Part 10 file's bytes: {tag: (VR, where its
    value starts, its length)}, and where the group ends. Stops where the bytes do (a caller that read only the
    file's head checks it saw the group end)."""
    found: dict[int, tuple[str | None, int, int]] = {}
    pos = 132
    while pos + 8 <= len(data) and _HEAD.unpack_from(data, pos)[0] == 2:
        tag, vr, length, head = _element_header(data, pos, False)
        if length == _UNDEFINED or pos + head + length > len(data):
            raise _NotPlain
        found[tag] = (vr, pos + head, length)
        pos += head + length
    return found, pos


def _meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """The file meta group as pydicom reads it, and where the data set starts."""
    found, pos = _meta_elements(data)
    elements = {BaseTag(tag): RawDataElement(BaseTag(tag), vr, length, data[start:start + length], start, False,
                                             True) for tag, (vr, start, length) in found.items()}
    return FileMetaDataset(elements), pos


_META_HEAD = 4096  # a file meta group is a few hundred bytes; a longer one is left to pydicom
_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX = 0x00020002, 0x00020003, 0x00020010


def file_meta_uids(path: Path | str) -> tuple[str, str, str] | None:
    """(Media Storage SOP Class, Transfer Syntax, Media Storage SOP Instance) UIDs from a Part 10 file's meta
    group, read from the file's first bytes; None when it is not the plain case (no preamble, a meta group longer
    than a few KB, a UID missing): the caller then asks pydicom, which also says what is wrong."""
    with open(path, "rb") as f:
        head = f.read(_META_HEAD)
    if head[128:132] != b"DICM":
        return None
    try:
        found, end = _meta_elements(head)
    except (_NotPlain, struct.error):
        return None
    if end + 8 > len(head):  # the group may go on past what was read
        return None
    uids: list[str] = []
    for tag in (_MEDIA_SOP_CLASS, _TRANSFER_SYNTAX, _MEDIA_SOP_INSTANCE):
        if tag not in found:
            return None
        _, start, length = found[tag]
        try:
            uids.append(head[start:start + length].decode("ascii").rstrip("\0 "))
        except UnicodeDecodeError:
            return None
    return uids[0], uids[1], uids[2]


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
    encoding: Any = default_encoding
    if _CHARSET in elements:
        encoding = convert_encodings(convert_raw_data_element(elements[BaseTag(_CHARSET)]).value)
    dataset.set_original_encoding(implicit, True, encoding)
    ds = FileDataset(str(path), dataset, data[:128], meta, implicit, True)
    ds.set_original_encoding(implicit, True, encoding)
    return ds
