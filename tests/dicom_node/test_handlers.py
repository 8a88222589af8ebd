"""Pure parts of the receive handlers: UID checks and what counts as undecodable."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.handlers import _undecodable, uid_problem


def test_uid_problem_refuses_non_uids_and_warns_on_leading_zeros():
    assert uid_problem("1.2.840.10008.5.1.4.1.1.128") == (None, None)
    assert uid_problem("0.1") == (None, None)  # a lone zero component is valid
    assert uid_problem("../../x")[0] is not None
    assert uid_problem("1..2")[0] is not None and uid_problem("1.2.")[0] is not None
    assert uid_problem("")[0] == "empty"
    assert "64" in (uid_problem("1." + "2" * 63)[0] or "")
    assert uid_problem("1.2.03.4") == (None, "a component has a leading zero")


def test_undecodable_tells_garbage_from_a_dataset_missing_attributes():
    ds = Dataset()
    ds.PatientID = "x"
    assert _undecodable(ds) is None  # a DICOM data set, missing UIDs: that is 0xA900's business
    assert _undecodable(Dataset()) == "empty data set"
    junk = Dataset()
    junk.add_new(0x7FE00010, "OB", np.zeros(4, np.uint8).tobytes())
    assert "no SOP Common" in (_undecodable(junk) or "")


@pytest.mark.parametrize(("sop_class", "sop_uid", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.128", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even-length UIDs
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2"),  # odd lengths: padded
    ("1.2.840.10008.5.1.4.1.1.88.67", "2.25.1", "1.2.840.10008.1.2.4.80"),
])
def test_part10_header_is_what_pynetdicom_writes(sop_class: str, sop_uid: str, syntax: str) -> None:
    """The file meta header receive builds directly is byte for byte pynetdicom's encoded_dataset() header."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_node.spool import part10_header

    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=syntax)
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    assert part10_header(sop_class, sop_uid, syntax, PYNETDICOM_IMPLEMENTATION_UID,
                         PYNETDICOM_IMPLEMENTATION_VERSION) == expected
