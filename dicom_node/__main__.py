"""``python -m dicom_node`` is the same as the ``petnode`` command."""

from __future__ import annotations

import sys

from dicom_node.cli import main

sys.exit(main())
