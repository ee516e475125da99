"""loom/heap.py: frozen objects stay out of collections, and an unload's collection still frees them."""
from __future__ import annotations

import gc
import weakref

import pytest

from loom.heap import collect_all, freeze_heap
from tests.conftest import TOY
from workers.model_store import load_model


@pytest.fixture(autouse=True)
def _unfreeze():
    yield
    gc.unfreeze()  # the rest of the test process keeps its collector as it was


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


def test_a_frozen_cycle_is_skipped_by_collections_and_freed_by_collect_all():
    node = Node()
    ref = weakref.ref(node)
    freeze_heap()
    del node
    gc.collect()
    assert ref() is not None, "a frozen object was collected: freezing did nothing"
    collect_all()
    assert ref() is None
    assert gc.get_freeze_count() > 0, "collect_all leaves the survivors frozen again"


def test_an_unloaded_model_in_a_cycle_is_freed_although_its_load_froze_it(model_dir):
    lm = load_model(TOY, str(model_dir / TOY), "float32", "cpu")
    ref = weakref.ref(lm.model)
    lm.model.loader_ref = lm  # a cycle, as hooks and closures can make
    freeze_heap()  # what the engine does after a load
    del lm
    gc.collect()
    assert ref() is not None
    collect_all()  # what the engine does after an unload
    assert ref() is None
