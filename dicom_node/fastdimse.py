"""The C-STORE messages petnode exchanges most, encoded and decoded without building pydicom datasets.

pynetdicom turns every DIMSE command set (six or seven small elements, always Implicit VR Little Endian) into a
pydicom ``Dataset``: a C-STORE request is built element by element from a template, encoded once to compute its
group length and again to send; the response is parsed back through pydicom's reader and value converters. For a
267-slice series that was about a third of the sending CPU (a yappi profile of petnode's SCU; see
docs/bench/data-path.md), on the critical path of every derived series.

For petnode's own associations (the AEs :func:`dicom_node.reactor.enable` is given), :func:`attach` routes three
messages through the byte-level code here:

- C-STORE-RQ sent from a file (the SCU): the command set packed with ``struct``, then the same P-DATA fragments
  pynetdicom makes (the command, then the data set read from the file in PDU-sized pieces);
- C-STORE-RSP received in one fragment (the SCU): parsed into pynetdicom's ``C_STORE`` primitive;
- C-STORE-RSP sent with a plain status (the SCP).

Anything else (another message, a Move Originator, a response carrying an error comment or offending element, a
command set split over several fragments, an element this code does not know) and any association with a
handler bound to ``EVT_DIMSE_SENT`` / ``EVT_DIMSE_RECV`` (pynetdicom's own debug logging, a test's recorder) takes
pynetdicom's path unchanged. The bytes on the wire are pynetdicom's (tested against it fragment for fragment), and
:func:`unbind_standard_handlers` takes pynetdicom's per-message logging handlers off these associations while its
logger would drop what they format anyway.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA


_US = struct.Struct("<H")
_HEADER = struct.Struct("<HHI")  # group, element, value length (Implicit VR Little Endian)

# Command Set tags (PS3.7 E.1) as plain ints.
_GROUP_LENGTH = 0x00000000
_AFFECTED_SOP_CLASS = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_RESPONDED_TO = 0x00000120
_PRIORITY = 0x00000700
_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_AFFECTED_SOP_INSTANCE = 0x00001000

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_DATA_SET_PRESENT = 0x0001
_NO_DATA_SET = 0x0101
# A C-STORE-RSP with exactly these elements is read here; anything more goes to pynetdicom.
_PLAIN_RSP_TAGS = frozenset({_GROUP_LENGTH, _AFFECTED_SOP_CLASS, _COMMAND_FIELD, _RESPONDED_TO, _DATA_SET_TYPE,
                             _STATUS, _AFFECTED_SOP_INSTANCE})


def unbind_standard_handlers(assoc: Any) -> None:
    """Unbind pynetdicom's per-message logging handlers from this association while its logger hides INFO.

    They format every PDU and DIMSE message (about a tenth of a send's CPU) for a logger petnode sets to WARNING
    unless asked for DEBUG (dicom_node.cli). Only this association changes (pynetdicom's own switch,
    ``_config.LOG_HANDLER_LEVEL``, is process-wide).
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    from pynetdicom import _handlers  # private: internals_problem checks it has these

    for event, handler in ((evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
                           (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
                           (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
                           (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler)):
        assoc.unbind(event, handler)


def _element(tag: int, value: bytes) -> bytes:
    return _HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: Any) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # UI is padded with a NUL to even length


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """An Implicit VR Little Endian command set: the group length, then ``elements`` (in tag order)."""
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(_GROUP_LENGTH, struct.pack("<I", len(body))) + body


def parse_command_set(data: bytes) -> dict[int, bytes] | None:
    """The elements of an Implicit VR Little Endian command set by tag, or None when it does not parse whole."""
    out: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _HEADER.unpack_from(data, offset)
        offset += 8
        if group != 0 or length == 0xFFFFFFFF or offset + length > end:
            return None
        out[element] = data[offset:offset + length]
        offset += length
    group_length = out.get(_GROUP_LENGTH)
    if group_length is None or len(group_length) != 4 or struct.unpack("<I", group_length)[0] != end - 12:
        return None
    return out


def _command_pdus(context_id: int, command: bytes, max_pdu: int) -> list[Any]:
    """A command set as P-DATA, fragmented as pynetdicom does (``_generate_pdv_fragments``): 0x01 before each
    fragment but the last, 0x03 before the last."""
    if max_pdu == 0:
        return [_p_data(context_id, b"\x03" + command)]
    size = max_pdu - 6
    pieces = [command[i:i + size] for i in range(0, len(command), size)]
    return [_p_data(context_id, b"\x01" + p) for p in pieces[:-1]] + [_p_data(context_id, b"\x03" + pieces[-1])]


def _p_data(context_id: int, value: bytes) -> Any:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, value))
    return pdata


def _store_rq_pdus(primitive: Any, context_id: int, max_pdu: int) -> list[Any] | None:
    """The P-DATA primitives of a C-STORE-RQ whose data set is sent from a file, or None (pynetdicom's path)."""
    path = getattr(primitive, "_dataset_path", None)
    if (path is None or primitive.MoveOriginatorApplicationEntityTitle is not None
            or primitive.MoveOriginatorMessageID is not None or primitive.AffectedSOPClassUID is None
            or primitive.AffectedSOPInstanceUID is None or primitive.MessageID is None
            or primitive.Priority is None):
        return None
    command = command_set([
        (_AFFECTED_SOP_CLASS, _uid(primitive.AffectedSOPClassUID)),
        (_COMMAND_FIELD, _US.pack(_C_STORE_RQ)),
        (_MESSAGE_ID, _US.pack(primitive.MessageID)),
        (_PRIORITY, _US.pack(primitive.Priority)),
        (_DATA_SET_TYPE, _US.pack(_DATA_SET_PRESENT)),
        (_AFFECTED_SOP_INSTANCE, _uid(primitive.AffectedSOPInstanceUID)),
    ])
    pdus = _command_pdus(context_id, command, max_pdu)
    file_path, offset = path
    with open(file_path, "rb") as f:  # as pynetdicom reads it: from the data set's offset, PDU-sized pieces
        end = f.seek(0, 2)
        length = end - f.seek(offset)
        if max_pdu == 0:
            count, size = 1, length
        else:
            size = max_pdu - 6
            count = math.ceil(length / size)
        for _ in range(count - 1):
            pdus.append(_p_data(context_id, b"\x00" + f.read(size)))
        pdus.append(_p_data(context_id, b"\x02" + f.read(size)))
    return pdus


def _store_rsp_pdus(primitive: Any, context_id: int, max_pdu: int) -> list[Any] | None:
    """The P-DATA primitive(s) of a C-STORE-RSP with a plain status, or None (pynetdicom's path)."""
    if (primitive.Status is None or primitive.MessageIDBeingRespondedTo is None
            or any(getattr(primitive, k, None) is not None for k in primitive.STATUS_OPTIONAL_KEYWORDS)):
        return None
    elements: list[tuple[int, bytes]] = []
    if primitive.AffectedSOPClassUID is not None:
        elements.append((_AFFECTED_SOP_CLASS, _uid(primitive.AffectedSOPClassUID)))
    elements += [(_COMMAND_FIELD, _US.pack(_C_STORE_RSP)),
                 (_RESPONDED_TO, _US.pack(primitive.MessageIDBeingRespondedTo)),
                 (_DATA_SET_TYPE, _US.pack(_NO_DATA_SET)),
                 (_STATUS, _US.pack(primitive.Status))]
    if primitive.AffectedSOPInstanceUID is not None:
        elements.append((_AFFECTED_SOP_INSTANCE, _uid(primitive.AffectedSOPInstanceUID)))
    return _command_pdus(context_id, command_set(elements), max_pdu)


def encode_pdus(primitive: Any, context_id: int, max_pdu: int) -> list[Any] | None:
    """The P-DATA primitives for a C-STORE request (from a file) or plain response, or None for anything else."""
    if type(primitive) is not C_STORE or 0 < max_pdu < 7:  # a PDU too small for any value: pynetdicom says so
        return None
    if primitive.MessageIDBeingRespondedTo is None:
        return _store_rq_pdus(primitive, context_id, max_pdu)
    return _store_rsp_pdus(primitive, context_id, max_pdu)


def _text(value: bytes) -> str:
    return value.decode("ascii").rstrip("\0 ")


def decode_store_rsp(pdata: Any) -> Any | None:
    """A C-STORE-RSP that came whole in one P-DATA as pynetdicom's ``C_STORE`` primitive, or None (not one, or
    not plain: pynetdicom's path)."""
    pdvs = pdata.presentation_data_value_list
    if len(pdvs) != 1:
        return None
    context_id, value = pdvs[0]
    if value[:1] != b"\x03":  # the last (and only) fragment of a command set
        return None
    elements = parse_command_set(value[1:])
    if (elements is None or not elements.keys() <= _PLAIN_RSP_TAGS or elements.get(_COMMAND_FIELD) != _US.pack(
            _C_STORE_RSP) or elements.get(_DATA_SET_TYPE) != _US.pack(_NO_DATA_SET)
            or len(elements.get(_RESPONDED_TO, b"")) != 2 or len(elements.get(_STATUS, b"")) != 2):
        return None
    try:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = _US.unpack(elements[_RESPONDED_TO])[0]
        rsp.Status = _US.unpack(elements[_STATUS])[0]
        if _AFFECTED_SOP_CLASS in elements:
            rsp.AffectedSOPClassUID = _text(elements[_AFFECTED_SOP_CLASS])
        if _AFFECTED_SOP_INSTANCE in elements:
            rsp.AffectedSOPInstanceUID = _text(elements[_AFFECTED_SOP_INSTANCE])
    except (ValueError, TypeError, UnicodeDecodeError):  # a value pynetdicom's setters refuse: its path says so
        return None
    rsp._context_id = context_id
    return rsp


def attach(assoc: Any) -> None:
    """Send and receive this association's plain C-STORE messages through this module (see the module doc)."""
    unbind_standard_handlers(assoc)
    dimse = assoc.dimse
    stock_send: Callable[[Any, int], None] = dimse.send_msg
    stock_receive: Callable[[Any], None] = dimse.receive_primitive
    settled: list[bool] = []

    def settle() -> None:
        # An SCP's server binds its own copies of the logging handlers after the association is made: once more
        # at the first message.
        if not settled:
            settled.append(True)
            unbind_standard_handlers(assoc)

    def send_msg(primitive: Any, context_id: int) -> None:
        settle()
        pdus = None if assoc.get_handlers(evt.EVT_DIMSE_SENT) else encode_pdus(primitive, context_id,
                                                                              dimse.maximum_pdu_size)
        if pdus is None:
            stock_send(primitive, context_id)
            return
        for pdu in pdus:
            dimse.dul.send_pdu(pdu)

    def receive_primitive(pdata: Any) -> None:
        settle()
        rsp = None
        # Responses come to the requestor (petnode's SCU); an SCP's incoming requests go straight to pynetdicom.
        if dimse.message is None and assoc.is_requestor and not assoc.get_handlers(evt.EVT_DIMSE_RECV):
            rsp = decode_store_rsp(pdata)
        if rsp is None:
            stock_receive(pdata)
            return
        dimse.msg_queue.put((rsp._context_id, rsp))

    dimse.send_msg = send_msg
    dimse.receive_primitive = receive_primitive


def internals_problem() -> str | None:
    """What of pynetdicom this module relies on is missing (None when all is there)."""
    try:
        from pynetdicom import _handlers, dimse
        from pynetdicom.association import Association
    except ImportError as exc:
        return f"pynetdicom cannot be imported ({exc})"
    for cls, attr in ((dimse.DIMSEServiceProvider, "send_msg"), (dimse.DIMSEServiceProvider, "receive_primitive"),
                      (dimse.DIMSEServiceProvider, "maximum_pdu_size"), (C_STORE, "STATUS_OPTIONAL_KEYWORDS"),
                      (Association, "unbind"), (Association, "get_handlers"), (Association, "is_requestor")):
        if not hasattr(cls, attr):
            return f"pynetdicom has no {cls.__name__}.{attr}"
    if not isinstance(getattr(P_DATA(), "presentation_data_value_list", None), list):
        return "pynetdicom's P_DATA has no presentation_data_value_list"
    if not hasattr(evt, "EVT_DIMSE_SENT") or not hasattr(evt, "EVT_DIMSE_RECV"):
        return "pynetdicom has no EVT_DIMSE_SENT / EVT_DIMSE_RECV"
    names = ("standard_dimse_recv_handler", "standard_dimse_sent_handler", "standard_pdu_recv_handler",
             "standard_pdu_sent_handler")
    if not all(hasattr(_handlers, name) for name in names):
        return "pynetdicom's standard logging handlers moved"
    return None
