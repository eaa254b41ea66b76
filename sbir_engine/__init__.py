"""sbir-engine: sketch-based image retrieval.

The public API, in the order data flows through it::

    from sbir_engine import SketchEngine
    engine = SketchEngine.load("index/default")          # index folder → its model, loaded once
    result = engine.query("my_sketch.png", k=10)           # label, probabilities, neighbours
    vectors = engine.embed(["a.png", "b.png"])             # L2-normalised 512-d embeddings
    neighbours = engine.search(vectors, k=5)               # raw nearest-neighbour search

Names are imported on first use, so ``import sbir_engine`` stays light (no TensorFlow, no FAISS).
``train`` and ``evaluate`` are the functions (``from sbir_engine import train``); the modules that
define them are imported by their full names (``from sbir_engine.train import make_augmenter``).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "EngineConfig": "config",
    "DEFAULT_CLASSES": "config",
    "prepare_data": "data",
    "load_split": "data",
    "DataError": "data",
    "normalize_sketch": "images",
    "open_image": "images",
    "render_strokes": "images",
    "ImageError": "images",
    "EmptySketchError": "images",
    "build_backbone": "backbones",
    "build_model": "model",
    "load_model": "model",
    "SketchModel": "model",
    "pretrain_backbone": "pretrain",
    "train": "train",
    "Embedder": "embed",
    "embed_images": "embed",
    "build_index": "build",
    "add_files": "build",
    "remove_files": "build",
    "BuildReport": "update",
    "IndexBusyError": "build",
    "IndexNotWritableError": "build",
    "GalleryIndex": "index",
    "IndexFormatError": "index",
    "ForeignIndexError": "index",
    "SketchEngine": "engine",
    "QueryResult": "engine",
    "Neighbour": "engine",
    "ModelMismatchError": "engine",
    "evaluate": "evaluate",
    "MilvusStore": "milvus",
    "export_to_milvus": "milvus",
}

__all__ = sorted(_EXPORTS)


# Functions named as the submodule that defines them: Python binds a submodule on its package when
# it is first imported, which would make `from sbir_engine import train` give the module.
_SHADOWED = {name for name, module in _EXPORTS.items() if name == module}


class _Package(types.ModuleType):
    """The package, binding the function where the import system binds a same-named submodule."""

    def __setattr__(self, name: str, value) -> None:
        if (
            name in _SHADOWED
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sbir_engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
