"""Shared fixtures: the onnx package's light zoo and the torch models of `tests.models`.

Builders and assertions live in `tests.kit`; fixtures only parametrize over them.

The speed guard (`slimgraph.runtime.speed_guard`) is off for the suite: hundreds of tests write
models, and timing each against its input would cost seconds apiece. Its own tests
(`tests/runtime/test_speed_guard.py`, `tests/tools/test_tools_speed_guard.py`) turn it back on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import models as test_models
from tests.kit.data import ZOO_FILES, ZOO_IDS

os.environ.setdefault("SLIMGRAPH_NO_SPEED_CHECK", "1")  # speed_guard.ENV_SKIP


@pytest.fixture(params=ZOO_FILES, ids=ZOO_IDS)
def zoo_path(request: pytest.FixtureRequest) -> Path:
    """Each ONNX file that ships in the onnx package (ResNet-50, DenseNet-121, VGG-19, ...)."""
    return request.param


@pytest.fixture(params=sorted(test_models.TORCH_MODELS))
def torch_model_name(request: pytest.FixtureRequest) -> str:
    """The name of each torch model of `tests.models.TORCH_MODELS`."""
    return request.param
