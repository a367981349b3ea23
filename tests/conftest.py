"""Shared fixtures: third-party ONNX architectures and torch models exported once per session."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from tests import models as test_models

ZOO_DIR = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
ZOO_FILES = sorted(Path(p) for p in glob.glob(str(ZOO_DIR / "*.onnx")))
ZOO_IDS = [p.stem.removeprefix("light_") for p in ZOO_FILES]


def exported_model(name: str) -> ir.Model:
    """A fresh copy of the torch model `name` exported to ONNX (exported once per session)."""
    if name not in _EXPORTED:
        from slimgraph.ir import from_torch

        _EXPORTED[name] = ir.to_proto(
            from_torch(test_models.build(name), test_models.example_input(name))
        )
    return ir.from_proto(_EXPORTED[name])


_EXPORTED: dict[str, object] = {}


@pytest.fixture(params=ZOO_FILES, ids=ZOO_IDS)
def zoo_path(request: pytest.FixtureRequest) -> Path:
    """Each ONNX file that ships in the onnx package (ResNet-50, DenseNet-121, VGG-19, ...)."""
    return request.param


@pytest.fixture(params=sorted(test_models.TORCH_MODELS))
def torch_model_name(request: pytest.FixtureRequest) -> str:
    return request.param
