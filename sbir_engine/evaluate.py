"""``evaluate``: sketch accuracy and retrieval quality of an engine, from labelled query sketches.

Every quality figure in the README comes from here. Retrieval ranks the *whole* gallery for each
query (exact cosine, whatever the index type) and reports mAP@all (non-interpolated AP, see
:func:`sbir_engine.metrics.average_precision`), P@10 and P@100, overall and per query class, and
lists the sketches whose class is not in the top 3 (with ``out``, as a contact sheet too). Each
headline figure comes with a 95 % interval (``*_ci95``): Wilson's for top-1 / top-3, a bootstrap
over the queries for mAP@all and P@10; and each query's record (``per_query``) lets two reports on
the same queries be compared query by query (``metrics.compare_queries``), so that two models'
figures can be told apart from noise.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np

from .config import EngineConfig
from .data import DataError
from .embed import Embedder, read_batches
from .engine import SketchEngine, fused_scores
from .gallery import scan_gallery
from .metrics import (
    bootstrap_interval,
    confusion_matrix,
    hub_share,
    mcnemar_exact,
    plot_confusion,
    retrieval_metrics,
    top_k_accuracy,
    top_k_hits,
    true_class_ranks,
    wilson_interval,
)

RETRIEVAL_SKIPPED = (
    "the gallery has no labels (a flat folder, not <class>/<image>): mAP@all, P@10 and P@100 "
    "need each gallery image's class"
)


def evaluate(
    index_dir: Path,
    queries: Path,
    out: Path | None = None,
    engine: SketchEngine | None = None,
    rerank_weight: float | None = None,
    canvas_strokes: Path | None = None,
    quickdraw: Path | None = None,
) -> dict:
    # Checked before the evaluation, which takes minutes on a large index (not "gallery folder").
    for what, folder in (("query", queries), ("canvas stroke", canvas_strokes)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    engine = engine or SketchEngine.load(index_dir)
    if len(engine.index) == 0:  # nothing to rank: every retrieval figure would be NaN
        raise DataError(
            f"the index {index_dir} holds no gallery images to rank; build it from a gallery with images"
        )
    files = [f for f in scan_gallery(queries) if f.label is not None]
    if not files:
        raise FileNotFoundError(f"no labelled query sketches under {queries} (expected <class>/<image>)")
    classes = engine.classes
    found = sorted({f.label for f in files})
    # e.g. DATA/sketch given for DATA/sketch/test, whose "classes" are test, train and val.
    if not set(found) & set(classes):
        raise DataError(
            f"none of the query classes in {queries} ({', '.join(found)}) is one of the model's "
            f"({', '.join(classes)}); give a folder of <class>/<image> such as DATA/sketch/test"
        )
    vectors, probabilities, labels, paths, skipped = [], [], [], [], []
    by_path = {f.path: f for f in files}
    for batch in read_batches([f.path for f in files], engine.embedder.load_sketch, 64):
        skipped.extend(batch.failures)
        if batch.paths:
            v, p = engine.embedder(batch.arrays)
            vectors.append(v)
            probabilities.append(p)
            labels.extend(by_path[path].label for path in batch.paths)
            paths.extend(batch.paths)
    unreadable = [f"{p}: {r}" for p, r in skipped]
    if not labels:
        more = f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
        raise DataError(f"no query sketch in {queries} could be read: {'; '.join(unreadable[:3])}{more}")
    vectors, probabilities = np.concatenate(vectors), np.concatenate(probabilities)
    known = np.array([label in classes for label in labels])
    label_ids = np.array([classes.index(label) if label in classes else -1 for label in labels])

    report: dict = {"queries": len(labels), "gallery": len(engine.index), "skipped": unreadable}
    # Queries of classes the model does not know: no class to hit, so top-1/top-3 leave them out.
    unknown = [label for label in labels if label not in classes]
    report["unknown_classes"] = {label: unknown.count(label) for label in sorted(set(unknown))}
    report["classification"] = {}
    ranks = true_class_ranks(probabilities, label_ids)  # 0 for a class the model does not know
    counted = int(known.sum())
    for k in (1, 3):
        hits = int(np.sum(top_k_hits(ranks, k)))
        report["classification"][f"top{k}"] = hits / counted if counted else float("nan")
        report["classification"][f"top{k}_ci95"] = list(wilson_interval(hits, counted))
    report["top3_misses"] = top3_misses(probabilities, label_ids, ranks, paths, classes)
    gallery = engine.index
    gallery_labels = [gallery.entries[int(i)].label for i in gallery.ids]
    cosine = vectors @ gallery.vectors.T
    weight = engine.config.rerank_weight if rerank_weight is None else rerank_weight
    fused = fused_scores(cosine.T, probabilities.T, gallery.probabilities, weight).T
    per_query: dict[str, dict] = {}
    labelled = any(label is not None for label in gallery_labels)
    if not labelled:
        report["retrieval_skipped"] = RETRIEVAL_SKIPPED
    for name, scores in (("retrieval", fused), ("embedding_retrieval", cosine)):
        if not labelled:  # every AP would be 0: a figure that says nothing about the model
            report[name], per_query[name] = None, {"AP": [None] * len(labels)}
            continue
        report[name] = retrieval_metrics(scores, labels, gallery_labels)
        per_query[name] = report[name].pop("per_query")
        for metric, values in (("mAP@all", per_query[name]["AP"]), ("P@10", per_query[name]["P@10"])):
            report[name][f"{metric}_ci95"] = list(bootstrap_interval(values))
    if labelled:
        report["retrieval"]["rerank_weight"] = weight
    # Per query, so that two models scored on the same queries can be compared pair by pair
    # (compare_queries, `evaluate --against`): the true class's rank among the classes, and its APs.
    report["per_query"] = [
        {
            "path": str(path),
            "label": label,
            "rank": int(rank) if rank else None,
            "AP": ap,
            "AP 512-d": ap_512,
        }
        for path, label, rank, ap, ap_512 in zip(
            paths,
            labels,
            ranks,
            per_query["retrieval"]["AP"],
            per_query["embedding_retrieval"]["AP"],
            strict=True,
        )
    ]
    scores = cosine  # hubs are a property of the 512-d space itself
    report["hubs"] = {
        q: {"class": c, "share_of_top10": s}
        for q, (c, s) in (hub_share(scores, labels, gallery_labels) if labelled else {}).items()
    }
    if canvas_strokes is not None:
        report["canvas"] = evaluate_canvas(
            engine.embedder, canvas_strokes, quickdraw or engine.config.quickdraw_tarball
        )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        matrix = confusion_matrix(probabilities[known].argmax(axis=1), label_ids[known], len(classes))
        plot_confusion(matrix, classes, out / "confusion.png", f"sketch queries: {queries}")
        if report["top3_misses"]:
            contact_sheet(report["top3_misses"], out / "top3-misses.png")
        (out / "evaluation.json").write_text(report_json(report) + "\n")
    return report


def report_json(report: dict) -> str:
    """The report as strict JSON: a figure that could not be measured (NaN) is null, not the bare
    NaN token that JSON parsers other than Python's reject."""

    def finite(value):
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(report), indent=2, allow_nan=False)


def top3_misses(
    probabilities: np.ndarray, label_ids: np.ndarray, ranks: np.ndarray, paths: list, classes
) -> list[dict]:
    """The queries whose class is not among the three most probable (``ranks``, as the report's
    top-3 counts them), with what the model said instead."""
    misses = []
    for path, p, label, rank in zip(paths, probabilities, label_ids, ranks, strict=True):
        if rank > 3:
            top3 = np.argsort(-p)[:3]
            misses.append(
                {
                    "path": str(path),
                    "label": classes[label],
                    "label_probability": round(float(p[label]), 4),
                    "top3": [[classes[i], round(float(p[i]), 4)] for i in top3],
                }
            )
    return misses


def contact_sheet(misses: list[dict], path: Path, cell: int = 120) -> None:
    """The missed sketches side by side: true class in green, the model's top 3 in red."""
    from PIL import Image, ImageDraw

    from .images import ImageError, composite_on_white, open_image

    sheet = Image.new("RGB", (len(misses) * cell, cell + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for k, miss in enumerate(misses):
        # Decoded as the engine decodes it (turned by its EXIF tag, transparency on white); a file
        # changed since it was scored leaves its cell blank.
        with contextlib.suppress(ImageError):
            sheet.paste(composite_on_white(open_image(miss["path"])).resize((cell, cell)), (k * cell, 0))
        draw.text((k * cell + 2, cell + 2), miss["label"], fill="green")
        draw.text((k * cell + 2, cell + 15), ",".join(c[:5] for c, _ in miss["top3"]), fill="red")
    sheet.save(path)


def format_report(report: dict) -> str:
    c, r, e = report["classification"], report["retrieval"], report["embedding_retrieval"]

    def figure(numbers: dict, name: str, label: str) -> str:
        low, high = numbers.get(f"{name}_ci95", (float("nan"),) * 2)
        return f"{label} {numbers[name]:.3f} [{low:.3f}, {high:.3f}]"

    lines = [
        f"queries {report['queries']}, gallery {report['gallery']} (95 % intervals in brackets)",
        f"sketch classification  {figure(c, 'top1', 'top-1')}  {figure(c, 'top3', 'top-3')}",
    ]
    if r is None:
        lines.append(f"retrieval not measured: {report['retrieval_skipped']}")
    else:
        lines += [
            f"retrieval (engine)     {figure(r, 'mAP@all', 'mAP@all')}  {figure(r, 'P@10', 'P@10')}"
            f"  P@100 {r['P@100']:.3f}  (class re-ranking weight {r['rerank_weight']})",
            f"retrieval (512-d only) {figure(e, 'mAP@all', 'mAP@all')}  {figure(e, 'P@10', 'P@10')}"
            f"  P@100 {e['P@100']:.3f}",
            "per class (engine)     mAP@all  P@10   worst other class in the 512-d top-10",
        ]
    for label, numbers in (r or {}).get("per_class", {}).items():
        hub = report["hubs"].get(label, {})
        lines.append(
            f"  {label:20s} {numbers['mAP@all']:.3f}   {numbers['P@10']:.3f}  "
            f"{hub.get('class', '-')} {hub.get('share_of_top10', 0):.0%}"
        )
    paired = report.get("canvas", {}).get("paired", {})
    for name, value in report.get("canvas", {}).items():
        if isinstance(value, float):
            line = f"canvas check           {name:28s} top-1 {value:.3f}"
            if name in paired:
                pair = paired[name]
                line += f"  (vs its bitmap: {pair['lost']} lost, {pair['won']} won, "
                line += f"McNemar p = {pair['mcnemar_p']:.2f})"
            lines.append(line)
    for group, numbers in report.get("canvas", {}).get("bitmap by Google's recognized flag", {}).items():
        if numbers["drawings"]:
            lines.append(
                f"  bitmaps {group:18s} {numbers['drawings']:4d} drawings  "
                f"top-1 {numbers['top1']:.3f}  top-3 {numbers['top3']:.3f}"
            )
    for miss in report.get("canvas", {}).get("misses", []):
        flag = "recognized" if miss["recognized"] else "not recognized"
        wrong = ", ".join(f"{style.removeprefix('canvas ')} → {c}" for style, c in miss["wrong"].items())
        lines.append(f"canvas miss: {miss['drawing']} ({flag} by Google; its bitmap right): {wrong}")
    for miss in report["top3_misses"]:
        top3 = ", ".join(f"{c} {p:.2f}" for c, p in miss["top3"])
        label = f"{miss['label']} {miss['label_probability']:.3f}"
        lines.append(f"not in top 3: {miss['path']} ({label}; {top3})")
    for label, count in report.get("unknown_classes", {}).items():
        lines.append(f"not a class of the model, left out of top-1/top-3: {label} ({count} queries)")
    lines.extend(f"skipped {s}" for s in report["skipped"])
    return "\n".join(lines)


def evaluate_canvas(
    embedder: Embedder, strokes_dir: Path, tarball: Path, splits: tuple[str, ...] | None = None
) -> dict:
    """Top-1 of raw pen strokes rendered as canvases versus the same drawings' 28×28 bitmaps.

    ``quickdraw-strokes/<class>.ndjson`` holds the first drawings of each category, which are also
    the first bitmaps of the QuickDraw package: line i is bitmap i, so the comparison is paired.
    By default only drawings the model has not trained on count: the validation and test splits'
    (the test split's alone for a refit head, which trained on validation too); ``splits`` names
    others, such as ``("val",)`` to choose a change without looking at the test split. Which
    drawings a split holds, the run's prepared dataset says by its files (``prepared_drawings``);
    where that folder is gone, QuickDraw's split is recomputed (right without ``--with-quickdraw``).
    The lines also carry Google's ``recognized`` flag (whether Quick, Draw!'s own classifier knew the
    drawing), so the bitmaps' top-1/top-3 are reported for both groups: how much of the error is
    drawings that nobody's classifier recognises. ``misses`` lists the drawings whose bitmap
    is classified right and at least one canvas style wrong, with what each such style answered;
    ``paired`` counts, per style, the drawings it alone loses and wins against the bitmaps, with
    McNemar's exact p-value of that split.
    """
    from .data import read_quickdraw_bitmaps, read_stroke_records, split_indices
    from .images import CANVAS_STYLES, canvas_style_name, render_strokes

    config = embedder.config
    classes = config.classes
    if splits is None:
        splits = ("test",) if config.refit else ("val", "test")
    inputs: dict[str, list] = {"bitmap": []}
    labels, recognised, drawings = [], [], []
    prepared = prepared_drawings(config, splits)
    for label in classes:
        records = read_stroke_records(strokes_dir, label)
        if not records:
            continue
        bitmaps = read_quickdraw_bitmaps(tarball, label)
        if prepared is not None:
            counted = prepared[label]
        else:  # the split of QuickDraw's drawings alone, as prepare-data cuts it without --with-quickdraw
            split = split_indices(len(bitmaps), config.split, f"{config.split_seed}:sketch:{label}")
            counted = {i for part in splits for i in split[part]}
        for i, record in enumerate(records):
            if i not in counted:
                continue
            inputs["bitmap"].append(bitmaps[i])
            for size, width, rgba in CANVAS_STYLES:
                name = canvas_style_name(size, width, rgba)
                inputs.setdefault(name, []).append(render_strokes(record["drawing"], size, width, rgba))
            labels.append(classes.index(label))
            recognised.append(bool(record.get("recognized", True)))
            drawings.append(f"{label}_{i:04d}")  # its bitmap's name in the prepared dataset
    if not labels:
        raise FileNotFoundError(
            f"no <class>.ndjson stroke files for {splits} drawings of {classes} in {strokes_dir}"
        )
    labels = np.array(labels)
    probabilities = {
        name: np.concatenate(
            [
                embedder(np.stack([embedder.load_sketch(im) for im in images[i : i + 64]]))[1]
                for i in range(0, len(images), 64)
            ]
        )
        for name, images in inputs.items()
    }
    report = {"drawings": len(labels)}
    report.update((name, top_k_accuracy(p, labels, 1)) for name, p in probabilities.items())
    bitmap, recognised = probabilities["bitmap"], np.array(recognised)
    report["bitmap by Google's recognized flag"] = {
        group: {
            "drawings": int(mask.sum()),
            "top1": top_k_accuracy(bitmap[mask], labels[mask], 1) if mask.any() else None,
            "top3": top_k_accuracy(bitmap[mask], labels[mask], 3) if mask.any() else None,
        }
        for group, mask in (("recognized", recognised), ("not recognized", ~recognised))
    }
    predicted = {name: p.argmax(axis=1) for name, p in probabilities.items()}
    wrong = {name: predicted[name] != labels for name in predicted if name != "bitmap"}
    # The gap is a paired difference on a few dozen drawings: how many each side alone gets right,
    # and how often chance alone would split them so unevenly (McNemar's exact test).
    bitmap_right = predicted["bitmap"] == labels
    report["paired"] = {}
    for name, style_wrong in wrong.items():
        lost, won = int(np.sum(bitmap_right & style_wrong)), int(np.sum(~bitmap_right & ~style_wrong))
        report["paired"][name] = {"lost": lost, "won": won, "mcnemar_p": mcnemar_exact(lost, won)}
    report["misses"] = [
        {
            "drawing": drawings[j],
            "recognized": bool(recognised[j]),
            "wrong": {name: classes[predicted[name][j]] for name in wrong if wrong[name][j]},
        }
        for j in np.flatnonzero(bitmap_right)
        if any(style_wrong[j] for style_wrong in wrong.values())
    ]
    return report


def prepared_drawings(config: EngineConfig, splits: tuple[str, ...]) -> dict[str, set[int]] | None:
    """Per class, the QuickDraw drawings (line i, prepared as ``<class>_<i>.png``) in ``splits`` of
    the dataset the run trained on (``config.data_dir``), read from its files: with
    ``--with-quickdraw`` one's own drawings were split with QuickDraw's, so only the files say which
    were held out. None where that folder is not the run's dataset (moved, or another split)."""
    data_dir = Path(config.data_dir)
    try:
        dataset = json.loads((data_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if dataset.get("seed") != config.split_seed or tuple(dataset.get("split", ())) != tuple(config.split):
        return None
    drawings = {}
    for label in config.classes:
        stems = [f.stem for split in splits for f in (data_dir / "sketch" / split / label).glob("*.png")]
        named = (re.fullmatch(rf"{re.escape(label)}_(\d+)", stem) for stem in stems)
        drawings[label] = {int(m[1]) for m in named if m}
    return drawings
