#!/usr/bin/env bash
# compute-sanitizer over every dms CUDA kernel: runs bench/sanitize_driver.py (small cases and
# edge cases of every op, DMSCache and a CUDA-graph decode step) once under each tool and prints
# one line per tool, `SANITIZE <tool>: clean|ERRORS|...`, then `SANITIZE: <k>/<n> tools clean`.
#
#   bash bench/sanitize.sh [memcheck] [racecheck] [initcheck] [synccheck] [memcheck-graph]
#                          (default: all five; memcheck-graph: memcheck of the captured paths,
#                           DMSCache's graph decode step and decode_step + sparse_decode in one
#                           CUDA graph (driver groups cache, graph); the caching allocator stays
#                           on: capture needs it)
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own cudaMalloc, so an access past a
# tensor is an access past an allocation (memcheck sees it) and fresh memory is never recycled
# from an earlier, initialised tensor (initcheck sees a read of what nobody wrote).
# memcheck, racecheck and synccheck instrument only our kernels (--kernel-name kns=dms: names
# in namespace dms), which keeps a run short; initcheck instruments every kernel, since it must
# see torch's writes to know that memory is initialised.
# Exit status 0 when every tool ran clean. Env: PYTHON (python3), SANITIZE_TIMEOUT_S (per tool,
# default 55), SANITIZE_QUICK=1 (fewer configurations), SANITIZE_LOG_DIR (/tmp/dms_sanitize),
# SANITIZE_ARGS (extra driver flags, e.g. "--only decode,append"), SANITIZE_FILTER=0 (instrument
# every kernel in every tool).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
TO=${SANITIZE_TIMEOUT_S:-55}
LOGDIR=${SANITIZE_LOG_DIR:-/tmp/dms_sanitize}
mkdir -p "$LOGDIR"
TOOLS=("$@")
[ ${#TOOLS[@]} -eq 0 ] && TOOLS=(memcheck racecheck initcheck synccheck memcheck-graph)

CS=$(command -v compute-sanitizer 2>/dev/null || ls /usr/local/cuda/bin/compute-sanitizer \
     /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$CS" ]; then
  echo "SANITIZE: compute-sanitizer not found"
  exit 2
fi
DRIVER_ARGS=()
[ "${SANITIZE_QUICK:-0}" = 1 ] && DRIVER_ARGS+=(--quick)
# shellcheck disable=SC2206
[ -n "${SANITIZE_ARGS:-}" ] && DRIVER_ARGS+=(${SANITIZE_ARGS})

clean=0
lines=()
for tool in "${TOOLS[@]}"; do
  args=("${DRIVER_ARGS[@]}")
  alloc=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  t=$tool
  if [ "$tool" = memcheck-graph ]; then
    t=memcheck; alloc=(env -u PYTORCH_NO_CUDA_MEMORY_CACHING); args+=(--only cache,graph)
  fi
  opts=(--tool "$t" --error-exitcode 3 --print-limit 30)
  [ "$t" != initcheck ] && [ "${SANITIZE_FILTER:-1}" = 1 ] && opts+=(--kernel-name kns=dms)
  log="$LOGDIR/$tool.log"
  t0=$(date +%s)
  "${alloc[@]}" timeout -k 10 "$TO" "$CS" "${opts[@]}" "$PY" bench/sanitize_driver.py \
    "${args[@]}" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  summary=$(grep -E "(ERROR|RACECHECK|SYNCCHECK|INITCHECK|MEMCHECK) SUMMARY" "$log" | tail -n 1 | sed 's/^=* *//')
  driver=$(grep -E "^SANITIZE_DRIVER:" "$log" | tail -n 1 | sed 's/^SANITIZE_DRIVER: *//')
  if [ $rc -eq 0 ]; then
    verdict=clean; clean=$((clean + 1))
  elif [ $rc -eq 3 ]; then
    verdict=ERRORS
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict="TIMEOUT(${TO}s, last: $(grep -E '^group ' "$log" | tail -n 1))"
  else
    verdict="rc $rc"
  fi
  line="SANITIZE $tool: $verdict; ${summary:-no summary}; driver: ${driver:-did not finish}; ${secs} s"
  lines+=("$line")
  echo "$line"
  if [ "$verdict" != clean ]; then  # the first reports, so a failing round says where
    grep -E "^========= (Invalid|Uninitialized|Race|Barrier|Error|  *at |.*Address)|CHECK FAILED|Traceback|Error:" "$log" \
      | head -n 12 | sed 's/^/    /'
  fi
done
echo "SANITIZE: ${clean}/${#TOOLS[@]} tools clean (logs in $LOGDIR)"
[ $clean -eq ${#TOOLS[@]} ]
