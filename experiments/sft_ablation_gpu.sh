#!/usr/bin/env bash
# Issue 22's GPU experiment in two commands of at most 9 minutes on one bare H200, run from the repository root:
#   bash experiments/sft_ablation_gpu.sh 1    # data, tutorial-small's two SFT parents, the first SFT variants
#   bash experiments/sft_ablation_gpu.sh 2    # the 4x-budget parents and their SFT, then more SFT variants
# Each part starts no run it cannot finish in its time (LIMIT_S, default 530 s), stops a run cut short at a
# checkpoint (SIGTERM), and skips runs finished earlier: run either part again to continue. What it needs there:
# .whl/ (datasets, pydantic, ...: ../shared/tools/gpu-wheels) and .gpu/shared/{data,tokenizers} (copies of
# ../shared/data/en-docs.jsonl.xz, instructions-alpaca.jsonl.xz and ../shared/tokenizers/qwen2), both carried.
# It writes $OUT/sft-ablation-partN.tgz (every run's run.json, result.json, scalars.jsonl and eval/ files, and
# study.json) and $OUT/partN.log. Reports are built afterwards, off the GPU: dlmstudy report runs/<study>.
# Part 2 continues part 1 on the machine part 1 left warm; on a fresh machine the ablation starts over (after
# the budget study), and its tarball then holds all it finished.
set -uo pipefail
part=${1:?usage: bash experiments/sft_ablation_gpu.sh 1|2}
limit=${LIMIT_S:-530}
out=${OUT:-.}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
echo "part $part: finished runs already here: $(find runs -name result.json 2>/dev/null | wc -l)" | tee -a "$out/part$part.log"
ablation=runs/tutorial-small-sft-ablation
budget=runs/tutorial-small-sft-budget
mkdir -p "$ablation/_cache" "$budget"
[ -e "$budget/_cache" ] || ln -s "$PWD/$ablation/_cache" "$budget/_cache"   # one tokenized corpus for both

study() {  # study name, second of this command by which its last run must have started
  local left=$(( limit - $(elapsed) - 5 )) minutes
  minutes=$(python3 -c "print(round(max(0.05, ($2 - $(elapsed)) / 60), 2))")
  (( left > 60 )) || return 0
  echo "== $1: runs start until ${minutes} min from now, stopped after ${left} s" | tee -a "$out/part$part.log"
  timeout -s TERM "$left" python3 -c "
import sys
from dlmstudy.runners.queue import run_queue
from dlmstudy.runners.run import Interrupted
from dlmstudy.study.spec import load_spec
try:
    run_queue(load_spec('studies/$1.yaml'), device='${DEVICE:-cuda}', max_minutes=$minutes)
except Interrupted as stop:
    print(stop)
" 2>&1 | grep --line-buffered -v -E 'it/s\]|s/it\]|Writing model shards' | tee -a "$out/part$part.log"
}

if [ "$part" = 1 ]; then
  study tutorial-small-sft-ablation $(( limit - 85 ))
else
  study tutorial-small-sft-budget 330
  study tutorial-small-sft-ablation $(( limit - 85 ))
fi
find "$ablation" "$budget" -maxdepth 3 \( -name study.json -o -name run.json -o -name result.json \
  -o -name scalars.jsonl -o -path '*/eval/*.json' -o -path '*/eval/*.csv' -o -path '*/eval/*.jsonl' \) -print0 \
  | tar czf "$out/sft-ablation-part$part.tgz" --null -T -
echo "part $part: $(elapsed) s; $(tar tzf "$out/sft-ablation-part$part.tgz" | grep -c result.json) runs finished in all" \
  | tee -a "$out/part$part.log"
