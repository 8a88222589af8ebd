"""Derived DICOM objects petnode writes (denoised PET series; maps later) and their deterministic UIDs.

Importing this package stays cheap: pydicom and numpy only (no torch, no highdicom, no pynetdicom).
"""

from __future__ import annotations

from dicom_node.outputs.derived_pet import (
    Provenance,
    derived_series_uid,
    is_petnode_output,
    write_derived_pet,
)
from dicom_node.outputs.uids import derive_uid

__all__ = ["Provenance", "derive_uid", "derived_series_uid", "is_petnode_output", "write_derived_pet"]
