#!/usr/bin/env bash
# Regenerate constraints.txt, the exact dependency set that scripts/setup.sh installs and the tests are run with.
# Builds a throwaway environment with scripts/setup.sh itself (no lock, only the caps below), then records
# `pip freeze` of it, trine left out. Afterwards run `bash scripts/test.sh` (it re-installs, since the lock
# changed) and commit constraints.txt only if the suite passes.
#   bash scripts/lock.sh            # writes constraints.txt
#   bash scripts/lock.sh OUT.txt    # writes elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-constraints.txt}
# Upper bounds for the newest releases that break the reference packages the tests compare against:
# FlagEmbedding 1.4.2 imports transformers.modeling_attn_mask_utils, which transformers 5.24.0 removed.
CAPS=(
  "transformers<5.24"
)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%s\n' "${CAPS[@]}" > "$tmp/caps.txt"
TRINE_UNLOCKED=0 TRINE_VENV="$tmp/venv" TRINE_LOCK="$tmp/caps.txt" bash scripts/setup.sh
{
  echo "# The tested dependency set: written by scripts/lock.sh (do not edit by hand), read by scripts/setup.sh."
  echo "# $("$tmp/venv/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.machine())')"
  echo "# caps: ${CAPS[*]}"
  # torch without its local label (+cpu): the constraint then also admits the same release built for CUDA
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^trine(==| @)' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "lock.sh: wrote $out ($(grep -vc '^#' "$out") packages)"
