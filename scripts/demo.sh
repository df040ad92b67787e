#!/usr/bin/env bash
# The README's main command (via `make demo`): SphereFace-4 through the whole pipeline on the data at hand
# (LFW and the MobileFaceNet teacher from ../shared; a generated data set where that is absent), sized to
# finish in under 30 minutes on 2 CPU cores. Outputs: runs/demo/report.md, plots/, deploy.prototxt, model.caffemodel.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m apps.pipeline --depth 4 --out runs/demo \
    --baseline-epochs 6 --finetune-epochs-per-layer 0.5 --finetune-epochs-final 4 --finetune-lr 0.01 "$@"
