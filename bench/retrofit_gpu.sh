#!/bin/bash
# The retrofit experiment (and the long-context eval of its DMS CR 8 model) on one GPU, in
# invocations of at most BUDGET seconds that resume from checkpoints carried back.
#
#   bash bench/retrofit_gpu.sh [BUDGET_S=540]
#
# Writes under $OUT (at most 8 files, each < 16 MiB):
#   r/retrofit_full.{md,json,png}, r/retrofit_full_logs.tsv   results so far (every invocation)
#   ck/pretrain.pt, ck/dms.pt                                  checkpoints (pretraining, retrofits)
#   lc/longctx.{md,json,png}                                   long-context eval, once complete
#                                                              (then ck/pretrain.pt is dropped)
# To resume, copy ck/*.pt and r/retrofit_full.json of the last invocation into .retro_carry/
# of the checkout (ignored: echo /.retro_carry/ >> .git/info/exclude) and carry .retro_carry.
# Builds the extension in place first unless its CUDA kernels already load (wheels: .carry/).
# RETRO_ARGS: more retrofit_experiment.py flags (word-split), e.g. "--runs borrowed:8" for the one
# run the long-context eval reads (one invocation of ~300 s instead of two).
set -u
T0=$SECONDS
BUDGET=${1:-540}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/retro_out}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/r" "$OUT/ck"
has_cuda() { $PY -c "import torch, dms_ext; assert torch._C._dispatch_has_kernel_for_dispatch_key('dms::append', 'CUDA')" 2>/dev/null; }
if ! has_cuda; then
  if ls .carry/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl && export PYTHONPATH=/tmp/site:$PWD
  fi
  [ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
  MAX_JOBS=${MAX_JOBS:-16} DMS_CUDA_ARCH=90a $PY setup.py build_ext --inplace >/tmp/retro_build.log 2>&1 \
    || { echo "build failed:"; grep -E "error|Error" /tmp/retro_build.log | head -20; }
  has_cuda || echo "WARNING: no CUDA kernels; DMSCache evaluation runs on the CPU"
fi
echo "build/setup: $((SECONDS - T0)) s"
if [ -d .retro_carry ]; then
  cp .retro_carry/*.pt "$OUT/ck/" 2>/dev/null
  cp .retro_carry/retrofit_full.json "$OUT/r/" 2>/dev/null
  echo "resuming from .retro_carry: $(ls .retro_carry | tr '\n' ' ')"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
# Leave 150 s for the long-context eval when this invocation may finish the experiment.
left=$(( BUDGET - (SECONDS - T0) - 20 ))
$PY bench/retrofit_experiment.py --seed 0 --out "$OUT/r" --ckpt-dir "$OUT/ck" --budget-s "$left" --no-progress ${RETRO_ARGS:-}
complete=$($PY -c "import json; print(int(json.load(open('$OUT/r/retrofit_full.json')).get('complete', False)))" 2>/dev/null)
left=$(( BUDGET - (SECONDS - T0) - 10 ))
if [ "$complete" = 1 ] && [ $left -gt 60 ]; then
  rm -f "$OUT/ck/pretrain.pt"
  lengths=${LONGCTX_LENGTHS:-2048,4096,8192,16384}
  timeout -k 5 $left $PY -m dms_ext.eval --budget-s $(( left * 2 / 3 )) --model "$OUT/ck/dms.pt" --run borrowed_cr8 \
    --lengths "$lengths" --samples 8 --batch 8 --pairs 32 --queries 8 --out "$OUT/lc" --no-progress \
    || echo "longctx eval: rc $? (timeout: run it alone, see bench/retrofit_gpu.sh)"
else
  echo "experiment not complete (or no time left): run again after carrying ck/*.pt and r/retrofit_full.json"
fi
echo "total $((SECONDS - T0)) s"
