#!/usr/bin/env bash
# SphereFace-20 through the whole pipeline: baseline, layer-by-layer pruning with fine-tuning,
# LFW evaluation of every stage, report and plots in runs/sphereface20 (or --out DIR).
# Every flag of python -m apps.pipeline can be added (see --help), e.g.
#   scripts/prune_sphereface20.sh --weights sphereface20_model.caffemodel --train-list casia/train.txt --train-root casia/
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m apps.pipeline --depth 20 --preset all --out runs/sphereface20 "$@"
