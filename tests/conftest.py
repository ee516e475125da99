"""Fixtures: real Loom stacks (broker, worker and API processes) on free loopback ports."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import BUNDLED, Stack, start_stack

TOY = "toy-llama"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A directory of generated models that servers may load by name."""
    from loom.toy_models import make_llama

    root = tmp_path_factory.mktemp("models")
    # Long context so a stream can run for many seconds (disconnect tests).
    make_llama(root / TOY, max_positions=8192)
    return root


@pytest.fixture(scope="session")
def default_model(model_dir) -> str:
    """The bundled chat model when it is there, else the generated one."""
    return str(BUNDLED) if (BUNDLED / "config.json").is_file() else str(model_dir / TOY)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, model_dir, default_model) -> Stack:
    # With the bundled model present, `loom serve` runs with no --model at all:
    # the out-of-the-box default is what gets tested.
    model = None if default_model == str(BUNDLED) else default_model
    s = start_stack(tmp_path_factory.mktemp("stack"), model, [model_dir])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ref(default_model):
    """The default model run by transformers itself in this process: the reference for activation tests."""
    from tests.reference import Reference

    return Reference(default_model)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_tests:
            item.add_marker(skip)
