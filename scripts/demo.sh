#!/usr/bin/env bash
# The main job: set up (first run only), then run trine's end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 exec .venv/bin/trine demo "$@"
