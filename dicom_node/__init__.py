"""petnode's DICOM service: receive, store durably, route, denoise, send derived series back.

Importing this package must stay cheap: no torch, no highdicom, no pynetdicom at import time.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


class _WithoutOptional(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Load one module (``target``) as if an optional dependency it tries to import (``hidden``) were absent.

    pydicom loads ``pydicom.data.download`` with its pixel handlers, which every command and the node do, and that
    module imports ``requests`` if it can, only to download pydicom's test files (it falls back to ``urllib``):
    ``requests`` with ``urllib3`` and ``charset_normalizer`` is about 60 ms of the 0.33 s a command spends
    importing its libraries here, in a Gaussian ``petnode denoise`` of 0.8 s (``petnode bench receive``). Only that
    one module sees ``requests`` missing while it runs; any other import of ``requests`` works as before.
    """

    def __init__(self, target: str, hidden: str) -> None:
        self.target, self.hidden = target, hidden
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.target or self._loader is not None:
            return None
        sys.meta_path.remove(self)  # once: find the real spec, then step aside
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or self.hidden in sys.modules:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self._loader is not None
        sys.modules[self.hidden] = None  # type: ignore[assignment]  # "import requests" raises ImportError
        try:
            self._loader.exec_module(module)
        finally:
            if sys.modules.get(self.hidden, 0) is None:
                del sys.modules[self.hidden]


if "pydicom.data.download" not in sys.modules:
    sys.meta_path.insert(0, _WithoutOptional("pydicom.data.download", "requests"))
