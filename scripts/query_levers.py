"""Query-time levers for sketch classification, measured on trained runs (none is in the engine).

For the validation and test sketches of a prepared dataset, the sketch top-1 / top-3 of:
- ``plain``: each run as the engine serves it (image and mirror image, features averaged);
- ``ensemble``: the mean of the runs' class probabilities (one model per run to serve);
- ``tta-N``: each run's probabilities averaged over the plain view and N views augmented like
  ``train``'s (zoom, shifts, shear, mirror, stroke width): N more backbone passes per query;
- ``knn``: each run's probabilities averaged with a vote of the query's 10 nearest training
  sketches in the 512-d space (weights exp(cosine / 0.1)).
Per-run rows are medians over the runs. Features come from ``train``'s cache where it has them.
It also lists the sketches that every run leaves out of its top 3 (as served): no lever that keeps
to these runs' features is likely to recover them, so they bound the split's reachable top-3.

    python scripts/query_levers.py --data data runs/g19-s0 runs/g19-s1 runs/g19-s2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sbir_engine.data import load_split
from sbir_engine.metrics import top_k_accuracy
from sbir_engine.model import SketchModel, load_model
from sbir_engine.train import backbone_features, contrastive_trainer

NEIGHBOURS = 10
VOTE_TEMPERATURE = 0.1


def sketch_features(model: SketchModel, data: Path, split: str, views: int = 0):
    """(features (n, dim) as the engine sees them, augmented (n, views, dim) or None, label ids,
    paths) of the split's readable sketches."""
    samples = load_split(data, split, ("sketch",))
    plain, kept = backbone_features(model, samples, 1, False, f"{split} sketches")
    augmented = None
    if views:
        augmented, kept_augmented = backbone_features(model, samples, views, True, f"{split} ×{views}")
        assert [s.path for s in kept_augmented] == [s.path for s in kept]
    labels = np.array([model.classes.index(s.label) for s in kept])
    return plain[:, 0], augmented, labels, [str(s.path) for s in kept]


def head_outputs(model: SketchModel, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and unit-length 512-d embeddings of backbone features."""
    outputs = contrastive_trainer(model).predict(features, verbose=0)
    return np.asarray(outputs["probabilities"]), np.asarray(outputs["unit_embedding"])


def neighbour_vote(queries: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, n_classes: int):
    """Class distribution of each query's nearest bank vectors, weighted by exp(cosine / T)."""
    similarity = queries @ bank.T
    nearest = np.argsort(-similarity, axis=1)[:, :NEIGHBOURS]
    votes = np.zeros((len(queries), n_classes))
    for row, columns in enumerate(nearest):
        np.add.at(votes[row], bank_labels[columns], np.exp(similarity[row, columns] / VOTE_TEMPERATURE))
    return votes / votes.sum(axis=1, keepdims=True)


def top3_misses(probabilities: np.ndarray, labels: np.ndarray, paths: list[str]) -> set[str]:
    """Paths of the sketches whose class is not among their three most probable."""
    top3 = np.argsort(-probabilities, axis=1)[:, :3]
    return {path for path, row, label in zip(paths, top3, labels, strict=True) if label not in row}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of `sbir-engine train`")
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--views", type=int, default=8, help="augmented views for tta (0: no tta)")
    args = parser.parse_args()

    models = [load_model(run) for run in args.runs]
    n_classes = len(models[0].classes)
    banks = []  # each run's training sketches for the vote: (unit embeddings, labels), both splits'
    for model in models:
        bank, _, bank_labels, _ = sketch_features(model, args.data, "train")
        banks.append((head_outputs(model, bank)[1], bank_labels))
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {}
    missed_by_all: dict[str, tuple[list[str], int]] = {}
    for split in ("val", "test"):
        table = scores[split] = {}
        ensemble = []
        missed: set[str] | None = None
        for model, (bank, bank_labels) in zip(models, banks, strict=True):
            plain, augmented, labels, paths = sketch_features(model, args.data, split, args.views)
            served, embeddings = head_outputs(model, plain)
            probabilities = {"plain": served}
            if args.views:
                views = np.asarray(model.head.predict(augmented.reshape(-1, plain.shape[-1]), verbose=0))
                views = views.reshape(len(plain), args.views, n_classes)
                probabilities[f"tta-{args.views}"] = (served + views.sum(1)) / (args.views + 1)
            vote = neighbour_vote(embeddings, bank, bank_labels, n_classes)
            probabilities["knn"] = (probabilities["plain"] + vote) / 2
            ensemble.append(probabilities["plain"])
            misses = top3_misses(served, labels, paths)
            missed = misses if missed is None else missed & misses
            for name, p in probabilities.items():
                table.setdefault(name, []).append(
                    (top_k_accuracy(p, labels, 1), top_k_accuracy(p, labels, 3))
                )
        mean = np.mean(ensemble, axis=0)
        table["ensemble"] = [(top_k_accuracy(mean, labels, 1), top_k_accuracy(mean, labels, 3))]
        missed_by_all[split] = sorted(missed or ()), len(labels)

    print(f"{len(models)} run(s); per-run levers: median over runs (each run's figures in brackets)")
    print(f"{'lever':<10} {'val top-1':>10} {'val top-3':>10} {'test top-1':>11} {'test top-3':>11}")
    for name in scores["val"]:
        cells = []
        for split in ("val", "test"):
            for k in (0, 1):
                values = [pair[k] for pair in scores[split][name]]
                cells.append(f"{np.median(values):.3f}")
        runs = " ".join("/".join(f"{a:.3f}" for a in pair) for pair in scores["test"][name])
        print(f"{name:<10} {cells[0]:>10} {cells[1]:>10} {cells[2]:>11} {cells[3]:>11}   [test {runs}]")
    for split, (paths, total) in missed_by_all.items():
        print(
            f"{split}: {len(paths)} sketch(es) out of every run's top 3, top-3 at most "
            f"{(total - len(paths)) / total:.3f}"
        )
        for path in paths:
            print(f"  {path}")


if __name__ == "__main__":
    main()
