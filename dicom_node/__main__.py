"""``python -m dicom_node`` is the same as the ``petnode`` command."""

from __future__ import annotations

from dicom_node.cli import run

run()
