"""Shared fixtures: real data location, external tools (DCMTK, Orthanc, dciodvfy), a node on loopback."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dicomtools import in_ci, orthanc, orthanc_server, storescp_sink  # noqa: F401 - fixtures
from tests.pg import postgres_server, postgres_url  # noqa: F401 - fixtures (a real PostgreSQL server)

REPO = Path(__file__).resolve().parents[1]


def realdata_root() -> Path:
    return Path(os.environ.get("PETNODE_REALDATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The shared real DICOM; skipped locally when absent, a failure in CI (which must run these tests)."""
    root = realdata_root()
    if not root.is_dir():
        if in_ci():
            pytest.fail(f"real data not found at {root} (set PETNODE_REALDATA)")
        pytest.skip(f"real data not found at {root}")
    return root


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Wait for ``predicate()`` to be truthy and return it; None on timeout (no bare sleeps in tests)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        pause.wait(interval)


@pytest.fixture(autouse=True)
def _quiet_libraries() -> None:
    """APScheduler logs every job run at INFO; the CLI silences it too (see dicom_node.cli.configure_logging)."""
    import logging

    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main()`` configures logging (basicConfig(force=True) on the root logger, with a handler on this test's
    captured stderr); undo it so later tests do not log into a closed capture stream at WARNING level."""
    names = ("", "pynetdicom", "apscheduler")
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in names}
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(level)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run when CUDA is present and are skipped (with the reason) otherwise."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in gpu_items:
            item.add_marker(skip)
