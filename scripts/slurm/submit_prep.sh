#!/bin/bash
# Submit the prep array and, after it succeeds, the merge that writes manifest.json.
#   scripts/slurm/submit_prep.sh source.root=/data/photos out_dir=/data/canny-shards [more overrides]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out_dir=""
for arg in "$@"; do
    case "$arg" in out_dir=*) out_dir="${arg#out_dir=}" ;; esac
done
[ -n "$out_dir" ] || { echo "submit_prep.sh: give out_dir=..." >&2; exit 2; }
jid=$(sbatch --parsable "$here/prep.sbatch" "$@")
mid=$(sbatch --parsable --dependency="afterok:$jid" --job-name=controlnet-prep-merge \
    --wrap "controlnet-prep mode=merge out_dir=$out_dir")
echo "prep array $jid, merge $mid (after the array succeeds)"
