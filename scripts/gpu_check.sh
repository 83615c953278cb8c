#!/usr/bin/env bash
# A GPU day in one command: the CUDA smoke checks and the benchmarks (scripts/gpu_check.py), results in
# OUT/gpu_check.json and OUT/gpu_check.md, exit status 1 if any check failed.
#
#   bash scripts/gpu_check.sh --out gpu_check_out                    # on one H100/H200: under 8 minutes
#   bash scripts/gpu_check.sh --out gpu_check_out --wheels wheels/   # first install what the GPU image lacks
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_check          # CPU: the same path, tiny sizes
#
# --wheels DIR: pip installs diffusers, hydra-core, omegaconf, antlr4-python3-runtime, webdataset and
# braceexpand from DIR only (no index; scripts/gpu_wheels.sh fills DIR). The package itself runs from this
# checkout (PYTHONPATH), not installed. PYTHON picks the interpreter (default: .venv/bin/python if there is
# one, else python3). GIT_COMMIT names the commit for a checkout without .git. Other arguments go to
# gpu_check.py (--only, --budget, --limit, --inject-fault, ...).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
wheels=""
args=()
while (($#)); do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a directory}; shift 2 ;;
    --wheels=*) wheels=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$wheels" ]]; then
  packages=(diffusers hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand)
  if ! "$py" -m pip install --no-index --find-links "$wheels" "${packages[@]}"; then
    # A dependency missing from DIR, or an environment pip may not write to (PEP 668): every wheel of
    # DIR, without dependencies, into a folder of its own on PYTHONPATH.
    deps=${TMPDIR:-/tmp}/gpu_check_deps
    echo "gpu_check.sh: installing every wheel in $wheels into $deps instead" >&2
    "$py" -m pip install --no-index --no-deps --upgrade --target "$deps" "$wheels"/*.whl
    export PYTHONPATH="$deps:$PYTHONPATH"
  fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_NVML_BASED_CUDA_CHECK=1  # availability checks through NVML: no CUDA context before the forks
exec "$py" scripts/gpu_check.py ${args[@]+"${args[@]}"}
