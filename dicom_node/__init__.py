"""petnode's DICOM service: receive, store durably, route, denoise, send derived series back.

Importing this package must stay cheap: no torch, no highdicom, no pynetdicom at import time.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
