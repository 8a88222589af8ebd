"""A running node freezes its heap at start, and again when imports grew it, only while it is idle."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Callable

import pytest
from pynetdicom import AE

from dicom_node import heap
from dicom_node.node import Node
from tests.conftest import wait_until
from tests.factories import make_pet_series


def test_the_node_freezes_at_start_and_again_when_idle_after_imports(start_node: Callable[..., Node],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_modules_at_freeze", 0)
    node = start_node([{"name": "keep", "match": {"modality": ["PT"]}, "drop": True}])
    assert gc.get_freeze_count() > 0 and heap._modules_at_freeze > 0  # frozen by start()
    assert not node.freeze_heap()  # nothing imported since
    for i in range(heap.MIN_NEW_MODULES):  # as torch's import at a first CNN series would
        monkeypatch.setitem(sys.modules, f"_petnode_node_test_module_{i}", types.ModuleType(f"m{i}"))
    ds = make_pet_series(shape=(1, 8, 8), seed=17)[0]
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PETNODE")
    try:
        assert assoc.is_established
        assert not node.freeze_heap()  # a scanner is connected: the full collection waits
    finally:
        assoc.release()
    assert wait_until(lambda: node._server is not None and node._server.guard.connections == 0, timeout=10)
    assert node.freeze_heap()  # idle now
