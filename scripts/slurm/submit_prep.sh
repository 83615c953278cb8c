#!/bin/bash
# Submit the prep array and, after it succeeds, the merge that writes manifest.json.
#   scripts/slurm/submit_prep.sh source.root=/data/photos out_dir=/data/canny-shards [more overrides]
#   scripts/slurm/submit_prep.sh --array=0-63 --cpus-per-task=16 -- source.root=... out_dir=...
# Options before "--" go to the array's sbatch (array size, CPUs, memory, time); the partition and
# account apply to both jobs: export SBATCH_PARTITION=... SBATCH_ACCOUNT=... (sbatch reads them).
# A failed or cancelled array task cancels the merge; run the same command again: only the shards
# that are not complete are redone, then the merge runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sbatch_options=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do sbatch_options+=("$1"); shift; done
    shift
fi
out_dir=""
for arg in "$@"; do
    case "$arg" in out_dir=*) out_dir="${arg#out_dir=}" ;; esac
done
[ -n "$out_dir" ] || { echo "submit_prep.sh: give out_dir=..." >&2; exit 2; }
jid=$(sbatch --parsable "${sbatch_options[@]}" "$here/prep.sbatch" "$@")
mid=$(sbatch --parsable --dependency="afterok:$jid" --kill-on-invalid-dep=yes --job-name=controlnet-prep-merge \
    --ntasks=1 --cpus-per-task=1 --output="prep-merge-%j.log" --wrap "controlnet-prep mode=merge out_dir=$out_dir")
echo "prep array $jid, merge $mid (after the array succeeds)"
