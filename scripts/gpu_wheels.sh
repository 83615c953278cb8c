#!/usr/bin/env bash
# The wheels `gpu_check.sh --wheels DIR` installs on a GPU image that has torch, lightning, transformers,
# accelerate, peft and opencv but not these: the exact versions installed here, without dependencies,
# pure Python (antlr4-python3-runtime has no wheel on PyPI: pip builds one from its sdist).
#
#   bash scripts/gpu_wheels.sh [DIR]             # default DIR: wheels/
#   bash scripts/gpu_wheels.sh --dry-run [DIR]   # print the pip commands only
#
# importlib_metadata and zipp come along: diffusers declares them, and pip resolves against what the
# GPU image has. PYTHON picks the interpreter (default: .venv/bin/python if there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
dir=${1:-wheels}
if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
packages=(diffusers hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand importlib_metadata zipp)
pins=()
for p in "${packages[@]}"; do
  pins+=("$p==$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$p")")
done
cmd=("$py" -m pip wheel --no-deps --wheel-dir "$dir" "${pins[@]}")
if ((dry_run)); then
  echo "${cmd[*]}"
  exit 0
fi
mkdir -p "$dir"
"${cmd[@]}"
for pin in "${pins[@]}"; do  # every wheel pure Python: it installs on any GPU image's Python 3
  name=${pin%%==*}
  file=$(ls "$dir" | grep -i "^${name//-/_}-${pin#*==}-" | head -n 1 || true)
  if [[ -z "$file" || "$file" != *-none-any.whl ]]; then
    echo "gpu_wheels.sh: no pure-Python wheel for $pin in $dir (found: ${file:-nothing})" >&2
    exit 1
  fi
done
echo "wheels for ${pins[*]} in $dir"
