"""Classification and retrieval metrics, and the plots a run folder keeps. Pure numpy + matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The share of rows whose true class is among the k most probable (by ``true_class_ranks``,
    so that a report's top-k and its per-query ranks agree; an unknown label is a miss)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(top_k_hits(true_class_ranks(probabilities, labels), k)))


def top_k_hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """Which rows (by ``true_class_ranks``) have their class among the k most probable."""
    ranks = np.asarray(ranks)
    return (ranks >= 1) & (ranks <= k)


def true_class_ranks(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's rank of its true class (1 = the most probable; rank <= k is a top-k hit),
    0 where the label is negative (a class the model does not know). A class tied with the true
    one ranks ahead of it: a model that cannot tell them apart gets no credit for the tie."""
    labels = np.asarray(labels)
    own = probabilities[np.arange(len(labels)), np.maximum(labels, 0)]
    ranks = np.sum(probabilities >= own[:, None], axis=1)
    return np.where(labels >= 0, ranks, 0)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % at z = 1.96): unlike the normal
    approximation it stays inside [0, 1] and is honest near 0 and 1, where accuracies live."""
    if total == 0:
        return (float("nan"), float("nan"))
    p, z2 = successes / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * np.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of per-query values (mAP, P@k): queries are the
    sample, so the interval says how much another draw of as many queries could move the figure."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # In chunks of resamples, so that a large query set does not need resamples × queries at once.
    chunks = [min(200, resamples - start) for start in range(0, resamples, 200)]
    draws = (rng.integers(0, len(values), (chunk, len(values))) for chunk in chunks)
    means = np.concatenate([values[rows].mean(axis=1) for rows in draws])
    tail = (1 - level) / 2
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of two classifiers on the same queries, from the queries
    only one of them gets right: how often a fair coin splits them at least this unevenly."""
    n, low = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def average_precision(relevant_in_rank_order: np.ndarray) -> float:
    """AP of one ranking over the whole gallery: the mean of P@k over the ranks k of the relevant items.

    This is the non-interpolated AP of TREC (and of most SBIR papers' mAP@all); a query with no
    relevant item in the gallery has AP 0.
    """
    relevant = np.asarray(relevant_in_rank_order, dtype=bool)
    total = relevant.sum()
    if total == 0:
        return 0.0
    hits = np.cumsum(relevant)
    ranks = np.flatnonzero(relevant) + 1
    return float(np.mean(hits[relevant] / ranks))


def retrieval_metrics(
    scores: np.ndarray, query_labels: Sequence[str], gallery_labels: Sequence[str], cutoffs=(10, 100)
) -> dict:
    """mAP@all and P@k of each query's full ranking of the gallery (higher score = nearer).

    Returns overall numbers, per-class numbers (by query class) and the per-query values
    (``per_query``: AP and P@k of each query, in query order).
    """
    gallery = np.asarray(gallery_labels)
    queries = np.asarray(query_labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = gallery[order] == queries[:, None]
    ap = np.array([average_precision(row) for row in relevant])
    precision = {k: relevant[:, :k].mean(axis=1) for k in cutoffs}
    result = {"queries": int(len(queries)), "gallery": int(len(gallery)), "mAP@all": float(ap.mean())}
    result.update({f"P@{k}": float(p.mean()) for k, p in precision.items()})
    per_class = {}
    for label in sorted(set(queries.tolist())):
        mask = queries == label
        per_class[label] = {"mAP@all": float(ap[mask].mean())}
        per_class[label].update({f"P@{k}": float(p[mask].mean()) for k, p in precision.items()})
    result["per_class"] = per_class
    result["per_query"] = {"AP": ap.tolist(), **{f"P@{k}": p.tolist() for k, p in precision.items()}}
    return result


def hub_share(scores: np.ndarray, query_labels: Sequence[str], gallery_labels: Sequence[str], k: int = 10):
    """For each query class, the largest share of its top-k taken by photos of one *other* class
    (an unlabelled photo is of no class)."""
    gallery = np.asarray(gallery_labels)
    queries = np.asarray(query_labels)
    top = gallery[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
    worst = {}
    for label in sorted(set(queries.tolist())):
        neighbours = top[queries == label].ravel()
        others = np.array([n for n in neighbours.tolist() if n is not None and n != label])
        if len(others) == 0:
            worst[label] = ("-", 0.0)
            continue
        names, counts = np.unique(others, return_counts=True)
        worst[label] = (str(names[counts.argmax()]), float(counts.max() / len(neighbours)))
    return worst


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            colour = "white" if value > matrix.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    """Loss and accuracy, train and validation, side by side like the original report's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(history.get(metric, []), label=f"train {metric}")
        ax.plot(history.get(f"val_{metric}", []), label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_queries(baseline: dict, candidate: dict) -> tuple[list[dict], list[dict]]:
    """The per-query records of two ``evaluate`` reports for the queries both scored (and whose
    class both models know), in the same order. A query is its ``<class>/<image>`` name, so two
    runs from other working directories, or on copies of the query folder, still pair up."""
    records = []
    for name, report in (("baseline", baseline), ("candidate", candidate)):
        if "per_query" not in report:
            raise ValueError(f"the {name} report has no per-query records: run `sbir-engine evaluate` again")
        by_name = {Path(q["path"]).parent.name + "/" + Path(q["path"]).name: q for q in report["per_query"]}
        records.append({key: q for key, q in by_name.items() if q["rank"] is not None})
    shared = sorted(records[0].keys() & records[1].keys())
    if not shared:
        raise ValueError("the two reports share no query sketch: evaluate both on the same queries")
    return [records[0][p] for p in shared], [records[1][p] for p in shared]


def compare_queries(baseline: list[dict], candidate: list[dict]) -> dict:
    """Two models on the same queries (``paired_queries``), query by query. Per top-k: both
    accuracies, the queries only the baseline / only the candidate gets right, and McNemar's exact
    p-value of that split; per AP (the engine's and the 512-d embedding's ranking): the candidate's
    mean gain and its bootstrap 95 % interval."""
    rank_a = np.array([q["rank"] for q in baseline])
    rank_b = np.array([q["rank"] for q in candidate])
    result: dict = {"queries": len(rank_a)}
    for k in (1, 3):
        hit_a, hit_b = top_k_hits(rank_a, k), top_k_hits(rank_b, k)
        only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(hit_b & ~hit_a))
        result[f"top-{k}"] = (hit_a.mean(), hit_b.mean(), only_a, only_b, mcnemar_exact(only_a, only_b))
    for name in ("AP", "AP 512-d"):
        if any(q[name] is None for q in (*baseline, *candidate)):  # a gallery without labels: not measured
            continue
        gain = np.array([b[name] - a[name] for a, b in zip(baseline, candidate, strict=True)])
        result[name] = (gain.mean(), *bootstrap_interval(gain))
    return result


def format_comparison(title: str, result: dict) -> str:
    lines = [f"{title} ({result['queries']} queries)"]
    for k in (1, 3):
        a, b, only_a, only_b, p = result[f"top-{k}"]
        lines.append(
            f"  top-{k}  {a:.3f} -> {b:.3f}  only the baseline right {only_a:3d}, "
            f"only the candidate {only_b:3d}  McNemar p = {p:.3f}"
        )
    for name in ("AP", "AP 512-d"):
        if name not in result:
            lines.append(f"  {name:8s} not measured: a gallery has no labels")
            continue
        mean, low, high = result[name]
        lines.append(f"  {name:8s} mean gain {mean:+.4f}  95 % interval [{low:+.4f}, {high:+.4f}]")
    return "\n".join(lines)
