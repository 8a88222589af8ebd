"""Byte-level C-STORE messages (dicom_node/fastdimse.py): the same fragments as pynetdicom's encoder, the same
primitive as its decoder, its own path for anything else, and real associations in both directions."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import split_dataset

from dicom_node import fastdimse, reactor, scu
from tests.factories import make_pet_series, write_series

PET = "1.2.840.10008.5.1.4.1.1.128"
FIELDS = ("MessageIDBeingRespondedTo", "Status", "AffectedSOPClassUID", "AffectedSOPInstanceUID")


@pytest.fixture
def pet_file(tmp_path: Path) -> Path:
    return write_series(make_pet_series(shape=(1, 16, 16), seed=3), tmp_path / "pet")[0]


def _pdvs(pdus: Any) -> list[Any]:
    return [p.presentation_data_value_list for p in pdus]


def _request(path: Path, instance: str, message_id: int = 7, priority: int = 2) -> C_STORE:
    meta, offset = split_dataset(path)
    req = C_STORE()
    req.MessageID, req.Priority = message_id, priority
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = meta.MediaStorageSOPClassUID, instance
    req._dataset_path = (path, offset)
    return req


def _response(instance: str, status: int = 0x0000) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = PET, instance
    return rsp


@pytest.mark.parametrize("max_pdu", [0, 16382, 1000, 60])
@pytest.mark.parametrize("instance", ["1.2.3", "1.2.34", "2.25.123456789012345678901234567890123"])
def test_requests_and_responses_are_pynetdicoms_bytes(pet_file: Path, max_pdu: int, instance: str) -> None:
    """60 bytes a PDU splits the command set itself into fragments; 0 is no limit."""
    for message_id, priority in ((1, 2), (65535, 0)):
        req = _request(pet_file, instance, message_id, priority)
        stock = C_STORE_RQ()
        stock.primitive_to_message(req)
        assert _pdvs(fastdimse.encode_pdus(req, 3, max_pdu)) == _pdvs(stock.encode_msg(3, max_pdu))
    for status in (0x0000, 0xB000, 0xA700):
        rsp = _response(instance, status)
        stock = C_STORE_RSP()
        stock.primitive_to_message(rsp)
        assert _pdvs(fastdimse.encode_pdus(rsp, 5, max_pdu)) == _pdvs(stock.encode_msg(5, max_pdu))


@pytest.mark.parametrize("instance", ["1.2.3", "1.2.34"])
def test_a_response_decodes_to_pynetdicoms_primitive(instance: str) -> None:
    stock_msg = C_STORE_RSP()
    stock_msg.primitive_to_message(_response(instance, 0xB007))
    (pdata,) = list(stock_msg.encode_msg(9, 16382))
    ours = fastdimse.decode_store_rsp(pdata)
    message = DIMSEMessage()
    assert message.decode_msg(pdata)
    theirs = message.message_to_primitive()
    assert ours is not None and ours._context_id == theirs._context_id == 9
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name) and type(getattr(ours, name)) is type(getattr(theirs,
                                                                                                           name))
    assert ours.is_valid_response


def test_anything_else_is_left_to_pynetdicom(pet_file: Path) -> None:
    moved = _request(pet_file, "1.2.3")
    moved.MoveOriginatorApplicationEntityTitle, moved.MoveOriginatorMessageID = "MOVER", 3
    assert fastdimse.encode_pdus(moved, 1, 16382) is None
    in_memory = _request(pet_file, "1.2.3")
    in_memory._dataset_path = None
    assert fastdimse.encode_pdus(in_memory, 1, 16382) is None
    commented = _response("1.2.3", 0xA700)
    commented.ErrorComment = "out of resources"
    assert fastdimse.encode_pdus(commented, 1, 16382) is None
    assert fastdimse.encode_pdus(_request(pet_file, "1.2.3"), 1, 6) is None  # no room for a value: pynetdicom's error
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0
    assert fastdimse.encode_pdus(echo, 1, 16382) is None
    # Responses the decoder does not take: an error comment, a C-ECHO-RSP, a command set split in two.
    stock_msg = C_STORE_RSP()
    stock_msg.primitive_to_message(commented)
    (pdata,) = list(stock_msg.encode_msg(1, 16382))
    assert fastdimse.decode_store_rsp(pdata) is None
    echo_msg = C_ECHO_RSP()
    echo_msg.primitive_to_message(echo)
    assert fastdimse.decode_store_rsp(next(echo_msg.encode_msg(1, 16382))) is None
    stock_msg = C_STORE_RSP()
    stock_msg.primitive_to_message(_response("1.2.3"))
    first, _second = list(stock_msg.encode_msg(1, 60))
    assert fastdimse.decode_store_rsp(first) is None


def test_command_sets_that_do_not_parse_whole_are_refused() -> None:
    good = fastdimse.command_set([(0x00000100, struct.pack("<H", 0x8001)), (0x00000900, b"\0\0")])
    assert fastdimse.parse_command_set(good) == {0: struct.pack("<I", len(good) - 12), 0x100: b"\x01\x80",
                                                 0x900: b"\0\0"}
    assert fastdimse.parse_command_set(good[:-1]) is None  # truncated
    assert fastdimse.parse_command_set(good + b"\0\0\0\0\0\0\0\0") is None  # group length no longer matches
    wrong_group = good[:12] + struct.pack("<HHI", 8, 0x100, 2) + good[20:]
    assert fastdimse.parse_command_set(wrong_group) is None


class _Server:
    """A storage SCP (petnode's event-driven AE or pynetdicom's own) answering each instance with the next status."""

    def __init__(self, statuses: list[Any], petnode_ae: bool) -> None:
        self.statuses = statuses
        ae = AE(ae_title="FAST")
        ae.supported_contexts = StoragePresentationContexts
        if petnode_ae:
            assert reactor.enable(ae)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> Any:
        return self.statuses.pop(0)


@pytest.mark.parametrize("petnode_scp", [True, False])
def test_real_associations_carry_every_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              petnode_scp: bool) -> None:
    """petnode's SCU against petnode's SCP (both sides byte-level) and pynetdicom's own SCP (the SCU side only):
    success, a warning and a failure with an error comment (that response goes pynetdicom's way) all arrive."""
    used: list[str] = []
    encode, decode = fastdimse.encode_pdus, fastdimse.decode_store_rsp

    def spy_encode(primitive: Any, context_id: int, max_pdu: int) -> Any:
        out = encode(primitive, context_id, max_pdu)
        used.append(("rq" if primitive.MessageIDBeingRespondedTo is None else "rsp") + ("" if out else "-stock"))
        return out

    def spy_decode(pdata: Any) -> Any:
        out = decode(pdata)
        used.append("decoded" if out is not None else "decoded-stock")
        return out

    monkeypatch.setattr(fastdimse, "encode_pdus", spy_encode)
    monkeypatch.setattr(fastdimse, "decode_store_rsp", spy_decode)
    failure = Dataset()
    failure.Status, failure.ErrorComment = 0xA700, "no room"
    server = _Server([0x0000, 0xB000, failure], petnode_scp)
    try:
        files = write_series(make_pet_series(shape=(3, 8, 8), seed=5), tmp_path / "pet")
        stored: list[str] = []
        report = scu.send_files(files, "FAST", "127.0.0.1", server.port, timeout_s=10, on_stored=stored.append)
    finally:
        server.server.shutdown()
    assert report.error is None and report.sent == 2 and len(stored) == 2
    assert list(report.failures.values()) == ["status 0xA700"]
    assert used.count("rq") == 3  # every request went out byte-level
    assert used.count("decoded") == 2 and used.count("decoded-stock") == 1  # the commented failure: pynetdicom's
    assert used.count("rsp") == (2 if petnode_scp else 0)  # the SCP's plain answers
    assert used.count("rsp-stock") == (1 if petnode_scp else 0)


def test_a_bound_dimse_handler_gets_pynetdicoms_messages(pet_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler on EVT_DIMSE_SENT / EVT_DIMSE_RECV (pynetdicom's debug logging, a recorder) sees real messages."""
    calls: list[Any] = []
    monkeypatch.setattr(fastdimse, "encode_pdus", lambda *a: calls.append(a))
    sent: list[str] = []
    received: list[str] = []
    server = _Server([0x0000], False)
    try:
        ae = scu._make_ae("PETNODE", 10.0)
        ae.add_requested_context(PET, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="FAST", evt_handlers=[
            (evt.EVT_DIMSE_SENT, lambda e: sent.append(type(e.message).__name__)),
            (evt.EVT_DIMSE_RECV, lambda e: received.append(type(e.message).__name__))])
        assert assoc.is_established
        try:
            assert assoc.send_c_store(pet_file).Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.server.shutdown()
    assert sent == ["C_STORE_RQ"] and received == ["C_STORE_RSP"] and calls == []


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_pynetdicoms_logging_handlers_stay_only_while_its_logger_shows_info(level: int) -> None:
    from pynetdicom import _handlers

    pynetdicom_logger = logging.getLogger("pynetdicom")
    before = pynetdicom_logger.level
    pynetdicom_logger.setLevel(level)
    server = _Server([], False)
    try:
        ae = scu._make_ae("PETNODE", 10.0)
        ae.add_requested_context(PET, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="FAST")
        assert assoc.is_established
        try:
            bound = [h for h, _ in assoc.get_handlers(evt.EVT_DIMSE_SENT)]
            pdu_bound = [h for h, _ in assoc.get_handlers(evt.EVT_PDU_RECV)]
        finally:
            assoc.release()
    finally:
        server.server.shutdown()
        pynetdicom_logger.setLevel(before)
    shown = level <= logging.INFO
    assert (_handlers.standard_dimse_sent_handler in bound) is shown
    assert (_handlers.standard_pdu_recv_handler in pdu_bound) is shown
