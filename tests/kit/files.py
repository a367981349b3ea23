"""Writing models to disk, and proving that a folder was left alone."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx_ir as ir

__all__ = ["save_proto", "write", "save_ir", "folder_state"]


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    """Serialize `proto` to `path` without any check (bad models must reach the loader as
    they are)."""
    path.write_bytes(proto.SerializeToString())
    return path


def write(folder: Path, proto: onnx.ModelProto, name: str = "model.onnx") -> Path:
    """`save_proto` to `folder / name`."""
    return save_proto(proto, folder / name)


def save_ir(model: ir.Model, path: Path, **kwargs: object) -> Path:
    """Save with the package's own writer (`slimgraph.ir.save`, keyword options passed on)."""
    from slimgraph.ir import save

    save(model, path, **kwargs)  # type: ignore[arg-type]
    return path


def folder_state(folder: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below `folder` (symlinks not followed): a link's target, or a file's content
    hash, size and mtime (ns), so that equal states before and after prove nothing was written,
    rewritten or touched."""
    result: dict[str, tuple[object, ...]] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                result[key] = ("link", os.readlink(path))
            elif path.is_file():
                stat = path.stat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                result[key] = ("file", digest, stat.st_size, stat.st_mtime_ns)
            else:
                result[key] = ("other",)
    return result
