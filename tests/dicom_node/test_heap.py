"""The node's long-lived heap is kept out of the garbage collector's full passes (dicom_node/heap.py)."""

from __future__ import annotations

import gc
import sys
import types

import pytest

from dicom_node import heap


def test_the_heap_is_frozen_once_and_again_only_after_imports_grew_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_modules_at_freeze", 0)
    assert heap.freeze_if_grown()  # the first time always
    assert gc.get_freeze_count() > 1000  # the interpreter's, pydicom's, pynetdicom's ... objects
    assert not heap.freeze_if_grown()  # nothing imported since
    for i in range(heap.MIN_NEW_MODULES):
        monkeypatch.setitem(sys.modules, f"_petnode_test_module_{i}", types.ModuleType(f"m{i}"))
    assert heap.freeze_if_grown()


def test_frozen_objects_are_still_freed_when_nothing_refers_to_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    class Holder:
        pass

    obj = Holder()
    ref = weakref.ref(obj)
    monkeypatch.setattr(heap, "_modules_at_freeze", 0)
    assert heap.freeze_if_grown()
    del obj  # reference counting, not the collector, frees it
    assert ref() is None
