"""Synthetic DICOM factories for tests: the same builders ``petnode simulate --dicom`` uses (one implementation)."""

from __future__ import annotations

from training.dicom_export import *  # noqa: F403
from training.dicom_export import __all__  # noqa: F401
