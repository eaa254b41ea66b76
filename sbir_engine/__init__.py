"""sbir-engine: sketch-based image retrieval.

The public API, in the order data flows through it::

    from sbir_engine import SketchEngine
    engine = SketchEngine.load("index/default")          # index folder → its model, loaded once
    result = engine.query("my_sketch.png", k=10)           # label, probabilities, neighbours
    vectors = engine.embed(["a.png", "b.png"])             # L2-normalised 512-d embeddings
    neighbours = engine.search(vectors, k=5)               # raw nearest-neighbour search

Names are imported on first use, so ``import sbir_engine`` stays light (no TensorFlow, no FAISS).
"""

from __future__ import annotations

import importlib

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
    "BuildReport": "build",
    "IndexBusyError": "build",
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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sbir_engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
