"""The remembered UID checks of association negotiation (dicom_node/uidcache.py) and the server's logging handlers."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom import _handlers, evt, presentation
from pynetdicom import utils as pynetdicom_utils
from pynetdicom.sop_class import PositronEmissionTomographyImageStorage, Verification

from dicom_node import uidcache
from dicom_node.scp import GuardedAssociationServer, make_ae
from dicom_node.settings import load_settings

PET = "1.2.840.10008.5.1.4.1.1.128"


class _Counting:
    """pynetdicom's own set_uid, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = getattr(pynetdicom_utils.set_uid, "__wrapped__", pynetdicom_utils.set_uid)

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.original(*args)


def test_a_clean_uid_is_checked_once_and_given_back_equal() -> None:
    counting = _Counting()
    memo = uidcache.make_memo(counting)
    first = memo(PET, "Abstract Syntax Name")
    assert isinstance(first, UID) and first == PET and counting.calls == 1
    for value in (PET, PET.encode(), UID(PET)):
        again = memo(value, "Abstract Syntax Name")
        assert again == PET and isinstance(again, UID)
    # the bytes form is its own entry (pynetdicom decodes it), the str and UID forms share one
    assert counting.calls == 2
    # the arguments that change the check are part of the key
    memo(PET, "x", False, False, True)
    assert counting.calls == 3


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
def test_what_must_log_or_raise_still_does_every_time(caplog: pytest.LogCaptureFixture) -> None:
    counting = _Counting()
    memo = uidcache.make_memo(counting)
    for _ in range(2):
        with pytest.raises(ValueError):
            memo("1.2.3." + "4" * 70, "Abstract Syntax Name")  # over 64 characters
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        for _ in range(2):
            assert memo("1.2.03.4", "Abstract Syntax Name") == "1.2.03.4"  # non-conformant: a warning each time
    assert sum("Non-conformant" in r.getMessage() for r in caplog.records) == 2
    assert memo(None, "x") is None and memo("", "x") == ""
    assert counting.calls == 2 + 2 + 2  # none of these was remembered


def test_a_private_transfer_syntax_keeps_its_own_encoding() -> None:
    counting = _Counting()
    memo = uidcache.make_memo(counting)
    private = UID("1.2.3.4.5")
    private.set_private_encoding(False, True)
    for _ in range(2):
        got = memo(private, "Transfer Syntax Name")
        assert got._PRIVATE_TS_ENCODING == (False, True)
    assert counting.calls == 2


def test_the_memo_stays_bounded() -> None:
    memo = uidcache.make_memo(_Counting(), max_entries=8)
    for i in range(20):
        memo(f"1.2.3.{i + 1}", "x")
    assert 0 < len(memo.memo) <= 8  # type: ignore[attr-defined]


def test_install_puts_one_memo_in_every_negotiation_module_and_not_in_dimse() -> None:
    from pynetdicom import dimse_primitives, pdu_items, pdu_primitives

    assert uidcache.install() and uidcache.install()  # idempotent
    memo = pynetdicom_utils.set_uid
    assert hasattr(memo, "memo")
    assert pdu_items.set_uid is memo and pdu_primitives.set_uid is memo and presentation.set_uid is memo
    assert dimse_primitives.set_uid is memo.__wrapped__  # type: ignore[attr-defined]


@pytest.mark.parametrize("level, bound", [(logging.WARNING, False), (logging.DEBUG, True)])
def test_the_server_binds_pynetdicoms_logging_handlers_only_when_they_would_log(level: int, bound: bool) -> None:
    pynetdicom_logger = logging.getLogger("pynetdicom")
    before = pynetdicom_logger.level
    pynetdicom_logger.setLevel(level)
    try:
        server = GuardedAssociationServer.__new__(GuardedAssociationServer)
        server._handlers = {}
        server._bind_defaults()
        recv = server._handlers.get(evt.EVT_PDU_RECV, [])
        names = [getattr(h[0] if isinstance(h, tuple) else h, "__name__", "") for h in recv]
        assert (_handlers.standard_pdu_recv_handler.__name__ in names) is bound
        # the intervention defaults (what answers C-ECHO and friends) are bound either way
        assert evt.EVT_C_ECHO in server._handlers
    finally:
        pynetdicom_logger.setLevel(before)


def test_storescus_128_contexts_are_accepted_as_the_node_supports_them(tmp_path: Path) -> None:
    """A real association: DCMTK's storescu proposes its 128 contexts to the node's AE (memo installed, logging
    handlers off) and stores a PET instance; every accepted context is a supported one."""
    received: list[tuple[str, str]] = []
    settings = load_settings(None, port=0, bind_address="127.0.0.1", data_dir=tmp_path / "d")
    ae = make_ae(settings)

    def on_store(event: Any) -> int:
        received.append((event.context.abstract_syntax, event.context.transfer_syntax))
        return 0x0000

    accepted: list[list[tuple[str, str]]] = []

    def on_accepted(event: Any) -> None:
        accepted.append(sorted((c.abstract_syntax, c.transfer_syntax[0]) for c in event.assoc.accepted_contexts))

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)])
    try:
        port = server.socket.getsockname()[1]
        source = _pet_file(tmp_path)
        result = subprocess.run(["storescu", "-aec", settings.ae_title, "127.0.0.1", str(port), str(source)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
    assert received and received[0][0] == PositronEmissionTomographyImageStorage
    assert accepted and len(accepted[0]) > 100
    # every accepted context is one the node supports, with one of its transfer syntaxes for that SOP class
    supported = {c.abstract_syntax: set(c.transfer_syntax) for c in ae.supported_contexts}
    assert Verification in supported
    for abstract, syntax in accepted[0]:
        assert syntax in supported[abstract], (abstract, syntax)


def _pet_file(tmp_path: Path) -> Path:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = PET
    ds.SOPClassUID = PET
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "PT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    path = tmp_path / "pet.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
