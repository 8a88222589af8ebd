"""A slow method on one series never blocks a Gaussian route on another (separate worker lanes)."""

from __future__ import annotations

import threading
from typing import ClassVar

import pytest

from denoisers import registry
from denoisers.base import DenoiseInputs, DenoiseResult, Denoiser, DenoiserParams, DenoiserSpec, InputKind
from tests.dicomtools import StoreSCP
from tests.e2e.conftest import pet_rule, send_datasets, wait_state
from tests.factories import make_pet_series

pytestmark = pytest.mark.network

RELEASE = threading.Event()
STARTED = threading.Event()


class BlockingParams(DenoiserParams):
    pass


class BlockingDenoiser(Denoiser[BlockingParams]):
    """Test-only: blocks until the test releases it (stands for NLM or a CNN on a big series)."""

    name: ClassVar[str] = "blocking"
    Params: ClassVar[type[DenoiserParams]] = BlockingParams

    @property
    def spec(self) -> DenoiserSpec:
        return DenoiserSpec(requires=frozenset({InputKind.PET}))

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        STARTED.set()
        RELEASE.wait(60)
        return DenoiseResult(denoised=inputs.pet.copy())


def test_slow_route_does_not_block_gaussian(start_node, storescp_sink: StoreSCP, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(registry._BUILTIN, "blocking", f"{__name__}:BlockingDenoiser")
    RELEASE.clear()
    STARTED.clear()
    sink = [{"peer": "sink"}]
    node = start_node(
        [pet_rule(sink, name="slow", match={"modality": ["PT"], "series_description": "SLOW"},
                  denoiser={"name": "blocking"}),
         pet_rule(sink, name="fast", match={"modality": ["PT"]})],
        peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}],
        workers={"cpu": 1},  # even with one worker per lane
    )
    slow = make_pet_series(shape=(4, 8, 8), seed=41, series_description="SLOW")
    fast = make_pet_series(shape=(4, 8, 8), seed=42)
    try:
        assert send_datasets(slow, node.port) == [0] * 4
        assert STARTED.wait(30)
        assert send_datasets(fast, node.port) == [0] * 4
        assert wait_state(node, str(fast[0].SeriesInstanceUID), ["delivered"]) == "delivered"
        assert node.db.series(str(slow[0].SeriesInstanceUID))["state"] == "processing"
    finally:
        RELEASE.set()
    assert wait_state(node, str(slow[0].SeriesInstanceUID), ["delivered"]) == "delivered"
