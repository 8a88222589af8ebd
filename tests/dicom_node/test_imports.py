"""What importing petnode loads: pydicom's optional ``requests`` stays out, and stays importable."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import dicom_node
from dicom_node.series import load_pet_series  # pydicom with its pixel handlers, as every command loads it
from pydicom.data import download
seen = {"requests_loaded": "requests" in sys.modules, "pydicom_has_requests": download.HAVE_REQUESTS,
        "hook_left": any(type(f).__name__ == "_WithoutOptional" for f in sys.meta_path)}
import requests  # anything that needs it still gets the real module
seen["requests_works"] = callable(requests.get)
print(json.dumps(seen))
"""


@pytest.mark.skipif(importlib.util.find_spec("requests") is None, reason="requests is not installed here")
def test_pydicom_loads_without_requests_which_stays_importable() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"requests_loaded": False, "pydicom_has_requests": False, "hook_left": False,
                    "requests_works": True}
