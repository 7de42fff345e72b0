#!/usr/bin/env bash
# One GPU round on the H200 machine (torch 2.11 + CUDA 13.0, no network), run from the repo root:
#
#   bash bench/gpu_round.sh [stage ...]          default stages: tests decode
#
# stages: tests     the CUDA cases (-m cuda) of the device-parametrized files (test_decode,
#                   test_prefill, test_decode_step, test_graph_api, test_validate), each file in
#                   its own pytest (a crash loses one file only)
#         cputests  the CPU test suite (everything but `cuda` marks)
#         decode    bench/bench_decode.py (FlashInfer JIT runs in the background during the build)
#         step      bench/bench_step.py          prefill   bench/bench_prefill.py
#         hf        bench/bench_hf.py (HF_ARGS: its flags): dms_ext.hf generate vs transformers
#         e2e       bench/bench_e2e.py (E2E_ARGS: its flags) if present, else python -m dms_ext.demo --device cuda
#         ncu       Nsight Compute on sparse_decode at B 64 x 8k (NCU_ROWS: other bench_decode rows,
#                   comma-separated): DRAM %, occupancy, time of the attention and merge kernels
#         memcheck  compute-sanitizer memcheck over sparse_decode edge cases
#         sanitize  bench/sanitize.sh: memcheck, racecheck, initcheck, synccheck over every kernel,
#                   and memcheck-graph (sparse_decode + decode_step captured in a CUDA graph and
#                   replayed; caching allocator on) (one row per tool; SANITIZE_TOOLS to pick,
#                   whole stage <= 270 s)
#         reliability  the CUDA parts of the reliability suites (hf, cache, differential, soak,
#                   compile, bad inputs: pytest -m cuda), DMS_TEST_SCALE=10 (10x today's case
#                   counts), one pytest per file, all files side by side within one timeout
#                   (STAGE_TIMEOUT_reliability, default 400 s; RELIABILITY_SERIAL=1: one by one;
#                   RELIABILITY_EXTRA_FILES="tests/a.py tests/b.py": more files side by side;
#                   RELIABILITY_FILES: instead of the default files; RELIABILITY_K: a pytest -k
#                   expression for every file of the stage, e.g. a rerun of one random suite;
#                   test_differential in RELIABILITY_SHARDS processes (12 per GPU), test_soak in
#                   RELIABILITY_SOAK_SHARDS (3 per GPU); processes spread over every GPU, so on
#                   nvidia-h200-x2 (32 cores, 2 GPUs) the 10x suites get twice the machine)
#         smoke     bench/prefill_v2_smoke.py (SMOKE_ARGS)   mutation  tests/mutation_check.py --device cuda
#         kmutation bench/kernel_mutations.py: each kernel mutation built and run against the CUDA
#                   tests it must fail, the source restored (KMUT_ONLY=name,name: some of them)
#         matched   bench/decode_matched.py: the uniform CR 8 decode rows beside readers of the same bytes
#         bvalidate bench/bench_validate.py (DMS_VALIDATE cost)
#         sweep     bench/sweep_decode.py: the scheduler knobs on SWEEP_CASES (one comma-separated
#                   string of bench_decode case names, e.g. "B1 x 32k,B1 x 32k skewed"; SWEEP_KNOBS,
#                   SWEEP_STAGES as in its docstring; stages need DMS_NVCC_EXTRA=-DDMS_DECODE_STAGES_KNOB)
#         extra     bash -c "$EXTRA_CMD" (a one-off command, log in logs.tgz, last line in the summary)
#         all       tests decode step prefill e2e ncu
# It installs the carried nvidia-cutlass wheel, unpacks the FlashInfer sdist, builds dms_ext
# in place for sm_90a, runs the stages (each under `timeout`, continuing past failures) and
# prints a summary table LAST. $OUT gets: summary.md, build.log, logs.tgz (every stage log),
# bench/results/gpu_round_<UTC date>_<HHMM>.md (commit, per test file pass/fail/skip counts,
# sanitizer verdicts, the build sources' digest (bench/source_digest.py); GIT_COMMIT=<id> names the
# commit where the tree has no .git or a stale one: give it literally, `$(git rev-parse HEAD)` inside
# the device command runs on the device's copy) and the
# bench/results/*.md this round wrote.
# Env: OUT (default /tmp/dms_round), PYTHON (python3), ROUND_BUDGET_S (whole round, default 570:
# the device runner stops a command at 600 s), STAGE_TIMEOUT_<stage> (seconds), PYTEST_ARGS,
# DECODE_ARGS (extra bench_decode flags), TEST_FILES (tests stage files, default tests/test_decode.py tests/test_prefill.py tests/test_decode_step.py tests/test_graph_api.py tests/test_validate.py tests/test_fp8.py tests/test_fp8_attention.py tests/test_hf_generate.py; those run with -m cuda, any other file whole), SKIP_BUILD=1, FI_WARM=0 (no background FlashInfer JIT).
# A warm machine keeps the last call's build: a call whose EXTRA_CMD built a patched (mutated)
# library leaves it in place, and the next call's incremental build may keep it (the copied
# sources can be older than those objects). Touch the patched files first in that next call
# (2026-11-30 19:32: a racecheck ran on a mutated sparse_decode that way; rerun at 19:34).
set -u -o pipefail

T0=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/dms_round}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/dms_round_logs.XXXXXX)
MARK="$LOGS/.start"; touch "$MARK"
PY=${PYTHON:-python3}
BUDGET=${ROUND_BUDGET_S:-570}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests decode)
if [[ " ${STAGES[*]} " == *" all "* ]]; then STAGES=(tests decode step prefill e2e ncu); fi

ROWS=()      # "stage|rc|seconds|key numbers"
NOTES=()     # lines printed just above the summary (first errors of failing stages)
elapsed() { echo $(( $(date +%s) - T0 )); }
add_row() { ROWS+=("$1|$2|$3|${4//|//}"); }
want() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------- (a) carried wheels
SITE=/tmp/site
t=$(date +%s)
if [ ! -d "$SITE/cutlass_library" ]; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" .carry/*.whl >"$LOGS/install.log" 2>&1
  rc=$?
  echo "installed $(ls .carry/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE" >>"$LOGS/install.log"
else
  echo "already installed" >"$LOGS/install.log"; rc=0
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
add_row install "$rc" $(( $(date +%s) - t )) "$(tail -n 1 "$LOGS/install.log" | cut -c1-80)"

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name())"
  nvcc --version | tail -n 2; } >"$LOGS/env.log" 2>&1

# ---------------------------------------------------------------- (b) FlashInfer sdist
FI_NAME=flashinfer_python-0.2.14.post1
FI_SRC="$ROOT/build/flashinfer_src"
FI_DIR="$FI_SRC/$FI_NAME"
export DMS_FLASHINFER_SRC="$FI_SRC"
export FLASHINFER_WORKSPACE_BASE="$ROOT/build/flashinfer_ws"   # JIT cache survives a warm machine
FI_PID=""
if want decode; then
  if [ ! -d "$FI_DIR/flashinfer" ] && [ -f ".carry/$FI_NAME.tar.gz" ]; then
    mkdir -p "$FI_SRC" && tar xzf ".carry/$FI_NAME.tar.gz" -C "$FI_SRC"
  fi
  if [ -d "$FI_DIR/flashinfer" ]; then
    mkdir -p "$FI_DIR/flashinfer/data"
    for pair in cutlass:3rdparty/cutlass spdlog:3rdparty/spdlog csrc:csrc include:include tvm_binding:tvm_binding; do
      ln -sfn "../../${pair#*:}" "$FI_DIR/flashinfer/data/${pair%%:*}"
    done
    # JIT-compile FlashInfer's decode modules while dms_ext builds; the decode stage waits for it.
    if [ "${FI_WARM:-1}" = 1 ]; then
      # Own session (setsid), so a JIT that runs too long can be stopped with its nvcc children.
      PYTHONPATH="$PYTHONPATH:$FI_DIR" $(command -v setsid) $PY bench/flashinfer_peer.py --warm >"$LOGS/flashinfer_warm.log" 2>&1 &
      FI_PID=$!
    fi
  else
    echo "no FlashInfer sdist (.carry/$FI_NAME.tar.gz)" >"$LOGS/flashinfer_warm.log"
  fi
fi

# ---------------------------------------------------------------- (c) build dms_ext in place
t=$(date +%s)
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "SKIP_BUILD=1" >"$OUT/build.log"; rc=0
else
  to=${STAGE_TIMEOUT_build:-420}; [ $(( BUDGET - $(elapsed) - 40 )) -lt $to ] && to=$(( BUDGET - $(elapsed) - 40 ))
  # The image's default g++ (/opt/gcc) instantiates libstdc++ code inside _C.so that does not
  # match the libstdc++ the process loads (/usr/lib): any error message with a number then
  # segfaulted (GPU round 2). The system g++ matches the runtime library.
  [ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
  MAX_JOBS=$MAX_JOBS DMS_CUDA_ARCH=90a timeout -k 10 $to $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && rc="124(timeout ${to}s)"
fi
key=$($PY -c "
import torch, dms_ext
ops = sorted({s.name.split('::')[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith('dms::')})
cuda = [o for o in ops if torch._C._dispatch_has_kernel_for_dispatch_key('dms::' + o, 'CUDA')]
print(f'{len(ops)} ops, {len(cuda)} with CUDA kernels; no CUDA: ' + (' '.join(sorted(set(ops) - set(cuda))) or '-'))
" 2>&1 | tail -n 1 | cut -c1-160)
add_row build "$rc" $(( $(date +%s) - t )) "$key"
if [ "$rc" != 0 ]; then
  NOTES+=("build failed; first errors:")
  while IFS= read -r l; do NOTES+=("  $l"); done < <(grep -E "error|Error" "$OUT/build.log" | head -n 15 | cut -c1-240)
fi

# ---------------------------------------------------------------- (d) stages
stage_timeout() {  # stage default -> seconds it may run, leaving time for the summary
  local v="STAGE_TIMEOUT_$1"; local want_s=${!v:-$2}
  local left=$(( BUDGET - $(elapsed) - 20 ))
  [ $left -lt $want_s ] && want_s=$left
  echo $want_s
}

run_cmd() {  # name default_timeout log command... ; sets RC and SECS
  local name=$1 tdef=$2 log=$3; shift 3
  local to; to=$(stage_timeout "$name" "$tdef")
  if [ "$to" -lt 15 ]; then RC=skip; SECS=0; echo "skipped: round budget spent" >"$log"; return; fi
  local t=$(date +%s)
  echo "+ timeout $to $*" >"$log"
  timeout -k 10 "$to" "$@" >>"$log" 2>&1
  RC=$?
  [ $RC -eq 124 ] && RC="124(timeout ${to}s)"
  SECS=$(( $(date +%s) - t ))
}

pytest_key() {  # last pytest summary line, e.g. "40 passed, 2 failed in 12.3s"
  grep -E "(passed|failed|error|skipped|no tests ran)" "$1" | tail -n 1 | sed 's/=//g; s/^ *//' | cut -c1-100
}

note_failures() {  # first interesting lines of a failing log
  local name=$1 log=$2 pattern=$3
  NOTES+=("$name:")
  while IFS= read -r l; do NOTES+=("  $l"); done < <(grep -E "$pattern" "$log" | head -n 12 | cut -c1-240)
}

TEST_LOGS=()  # pytest logs of this round, for the gpu_round report

stage_tests() {
  local f base mark
  for f in ${TEST_FILES:-tests/test_decode.py tests/test_prefill.py tests/test_decode_step.py tests/test_graph_api.py tests/test_validate.py tests/test_fp8.py tests/test_fp8_attention.py tests/test_hf_generate.py}; do
    [ -e "$f" ] || continue
    base=$(basename "$f" .py)
    # These files hold CPU and CUDA cases (a device parameter, CUDA-only tests marked): the CUDA ones here.
    mark=(); case "$f" in tests/test_decode.py|tests/test_prefill.py|tests/test_decode_step.py|tests/test_graph_api.py|tests/test_validate.py|tests/test_fp8.py|tests/test_fp8_attention.py|tests/test_hf_generate.py) mark=(-m cuda) ;; esac
    run_cmd tests 300 "$LOGS/$base.log" $PY -m pytest -q -rfE -p no:cacheprovider "${mark[@]}" ${PYTEST_ARGS:-} "$f"
    TEST_LOGS+=("$base|$LOGS/$base.log")
    add_row "$base" "$RC" "$SECS" "$(pytest_key "$LOGS/$base.log")"
    [ "$RC" != 0 ] && note_failures "$base" "$LOGS/$base.log" "^(FAILED|ERROR)|Error:|error:|Fatal|core dumped"
  done
}

stage_cputests() {
  run_cmd cputests 300 "$LOGS/cputests.log" $PY -m pytest -q -rfE -p no:cacheprovider \
    -m "not cuda" tests
  TEST_LOGS+=("cputests|$LOGS/cputests.log")
  add_row cputests "$RC" "$SECS" "$(pytest_key "$LOGS/cputests.log")"
  [ "$RC" != 0 ] && note_failures cputests "$LOGS/cputests.log" "^(FAILED|ERROR)"
}

bench_key() {  # the bench's SUMMARY: line if it prints one, else its last line
  local k; k=$(grep -E "^SUMMARY:" "$1" | tail -n 1 | sed 's/^SUMMARY: *//')
  [ -z "$k" ] && k=$(grep -v '^\s*$' "$1" | tail -n 1)
  echo "$k" | cut -c1-400
}

stage_bench() {  # name script default_timeout [args]
  local name=$1 script=$2 tdef=$3; shift 3
  if [ ! -f "$script" ]; then add_row "$name" missing 0 "$script not found"; return; fi
  run_cmd "$name" "$tdef" "$LOGS/$name.log" $PY "$script" "$@"
  add_row "$name" "$RC" "$SECS" "$(bench_key "$LOGS/$name.log")"
  [ "$RC" != 0 ] && note_failures "$name" "$LOGS/$name.log" "Error|error|Traceback|failed"
}

stage_decode() {
  local t=$(date +%s) extra=""
  if [ -n "$FI_PID" ]; then
    # Wait for the background JIT, but leave the bench itself at least 150 s of the round.
    local limit=$(( ${FI_WAIT_S:-240} < BUDGET - $(elapsed) - 170 ? ${FI_WAIT_S:-240} : BUDGET - $(elapsed) - 170 ))
    while kill -0 "$FI_PID" 2>/dev/null && [ $(( $(date +%s) - t )) -lt $limit ]; do sleep 2; done
    local frc
    if kill -0 "$FI_PID" 2>/dev/null; then
      kill -- -"$FI_PID" 2>/dev/null; frc="killed(${limit}s)"
      echo "stopped after ${limit}s" >>"$LOGS/flashinfer_warm.log"
    else
      wait "$FI_PID"; frc=$?
    fi
    FI_PID=""
    add_row flashinfer_jit "$frc" $(( $(date +%s) - t )) "$(tail -n 1 "$LOGS/flashinfer_warm.log" | cut -c1-150)"
    [ "$frc" != 0 ] && { extra="--no-flashinfer"; note_failures flashinfer_jit "$LOGS/flashinfer_warm.log" "rror|FAILED|stopped"; }
  fi
  PYTHONPATH="$PYTHONPATH:$FI_DIR" stage_bench decode bench/bench_decode.py 300 $extra ${DECODE_ARGS:-}
}

find_tool() {  # ncu / compute-sanitizer on PATH or in the usual CUDA folders
  command -v "$1" 2>/dev/null && return
  ls /usr/local/cuda/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" /usr/local/cuda/nsight-compute*/"$1" 2>/dev/null | head -n 1
}

stage_ncu() {
  local NCU; NCU=$(find_tool ncu)
  if [ -z "$NCU" ]; then add_row ncu missing 0 "ncu not found"; return; fi
  # NCU_ROWS: comma-separated bench_decode rows, one metrics pass each (default B 64 x 8k); the
  # attention and merge kernels are reported apart (ncu serializes them: no PDL overlap).
  local row rows; IFS=',' read -r -a rows <<<"${NCU_ROWS:-B64 x 8k}"
  for row in "${rows[@]}"; do
  local tag; tag=$(echo "$row" | tr -d ' ')
  rm -f "$LOGS/ncu_metrics.csv"
  run_cmd ncu 180 "$LOGS/ncu_$tag.log" "$NCU" --clock-control none --csv --log-file "$LOGS/ncu_metrics.csv" \
    --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum \
    -k regex:sparse_decode $PY bench/bench_decode.py --ncu --ncu-row "$row"
  cp "$LOGS/ncu_metrics.csv" "$LOGS/ncu_metrics_$tag.csv" 2>/dev/null
  local rc=$RC secs=$SECS
  local key; key=$($PY - "$LOGS/ncu_metrics.csv" <<'EOF' 2>&1 | tail -n 1
import csv, re, sys, collections
rows = [l for l in open(sys.argv[1], errors="replace")]
start = next((i for i, l in enumerate(rows) if l.startswith('"ID"')), None)
if start is None:
    print("no ncu csv rows (see ncu.log)"); sys.exit()
acc = collections.defaultdict(list)
for r in csv.DictReader(rows[start:]):
    name = re.sub(r"\(anonymous namespace\)::", "", r["Kernel Name"])
    name = re.split(r"[<(]", name)[0].split("::")[-1].split()[-1]
    try:
        v = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        continue
    # ncu scales units per value (nsecond, usecond, msecond): bring times to microseconds.
    v *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
          "second": 1e6}.get(r.get("Metric Unit", "").strip(), 1.0)
    acc[(name, r["Metric Name"])].append(v)
short = {"dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
         "sm__warps_active.avg.pct_of_peak_sustained_active": "occ%",
         "gpu__time_duration.sum": "time"}
out = collections.defaultdict(list)
for (k, m), v in acc.items():
    mean = sum(v) / len(v)
    unit = "us" if m == "gpu__time_duration.sum" else ""
    out[k].append(f"{short.get(m, m)} {mean:.1f}{unit} (n={len(v)})")
print("; ".join(f"{k}: " + ", ".join(sorted(v)) for k, v in out.items()))
EOF
)
  add_row "ncu $tag" "$rc" "$secs" "$key"
  [ "$rc" != 0 ] && note_failures ncu "$LOGS/ncu_$tag.log" "ERR|Error|error"
  done
  # The fuller `--set basic` report of the same calls, for the logs only.
  run_cmd ncu 120 "$LOGS/ncu_basic.log" "$NCU" --clock-control none --set basic -k regex:sparse_decode \
    -c 4 $PY bench/bench_decode.py --ncu
}

stage_memcheck() {
  local CS; CS=$(find_tool compute-sanitizer)
  if [ -z "$CS" ]; then add_row memcheck missing 0 "compute-sanitizer not found"; return; fi
  # No caching allocator: every tensor its own cudaMalloc, so a read past one is out of bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_cmd memcheck 240 "$LOGS/memcheck.log" "$CS" --tool memcheck \
    --error-exitcode 3 $PY bench/bench_decode.py --memcheck
  add_row memcheck "$RC" "$SECS" "$(grep -E "ERROR SUMMARY|bad cases" "$LOGS/memcheck.log" | tr '\n' ' ' | cut -c1-150)"
  [ "$RC" != 0 ] && note_failures memcheck "$LOGS/memcheck.log" "Invalid|ERROR|BAD|Error"
}

SANITIZE_LINES=()  # "tool|verdict" for the gpu_round report

stage_sanitize() {
  # Each tool gets an equal share of the stage's time; one summary row per tool.
  local to; to=$(stage_timeout sanitize 270)
  local st=${SANITIZE_TOOLS:-}
  local tools=(${st//,/ })  # space- or comma-separated
  [ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck initcheck synccheck memcheck-graph)
  local per=$(( (to - 5) / ${#tools[@]} ))
  run_cmd sanitize "$to" "$LOGS/sanitize.log" env SANITIZE_TIMEOUT_S=$per \
    SANITIZE_LOG_DIR="$LOGS/sanitize" PYTHON="$PY" bash bench/sanitize.sh "${tools[@]}"
  local l n=0
  while IFS= read -r l; do
    local tool=${l#SANITIZE }; tool=${tool%%:*}
    local verdict=${l#*: }; verdict=${verdict%%;*}
    add_row "sanitize_$tool" "$([ "$verdict" = clean ] && echo 0 || echo "$verdict" | cut -c1-40)" \
      "$(echo "$l" | grep -oE '[0-9]+ s$' | cut -d' ' -f1)" "$(echo "${l#*; }" | cut -c1-150)"
    n=$((n + 1))
    SANITIZE_LINES+=("$tool|$verdict")
  done < <(grep -E "^SANITIZE [a-z-]+:" "$LOGS/sanitize.log")
  [ $n -eq 0 ] && add_row sanitize "$RC" "$SECS" "$(tail -n 1 "$LOGS/sanitize.log" | cut -c1-150)"
  [ "$RC" != 0 ] && note_failures sanitize "$LOGS/sanitize.log" "^SANITIZE|^    "
}

stage_reliability() {
  # The files side by side, one pytest each (RELIABILITY_SERIAL=1: one after another, 150 s
  # each), within one timeout (STAGE_TIMEOUT_reliability, default 400 s). The random-case suites
  # are CPU-bound (float64 references): test_differential runs as RELIABILITY_SHARDS processes
  # (default 12) and test_soak as 3 (DMS_TEST_SHARD=i/n, tests/helpers.py), and every process
  # gets OMP_NUM_THREADS = cores / processes (at least 1). Unsharded and at 16 threads each, 11
  # processes starved one another on 16 cores (gpu_round_2026-11-30_0829.md).
  # A file stopped by the timeout reports how far its progress lines got.
  local f base key dots to pids=() bases=() jobs=() t n i threads
  local files=(${RELIABILITY_FILES:-tests/test_hf.py tests/test_hf_generate.py tests/test_cache.py
               tests/test_differential.py tests/test_soak.py tests/test_compile.py tests/test_bad_inputs.py}
               ${RELIABILITY_EXTRA_FILES:-})
  local kexpr=(); [ -n "${RELIABILITY_K:-}" ] && kexpr=(-k "$RELIABILITY_K")
  to=$(stage_timeout reliability 400)
  t=$(date +%s)
  local ngpu; ngpu=$($PY -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)
  for f in "${files[@]}"; do
    case "$f" in
      */test_differential.py) n=${RELIABILITY_SHARDS:-$(( 12 * ngpu ))} ;;
      */test_soak.py) n=${RELIABILITY_SOAK_SHARDS:-$(( 3 * ngpu ))} ;;
      *) n=1 ;;
    esac
    for (( i = 0; i < n; i++ )); do jobs+=("$f|$i/$n"); done
  done
  threads=$(( $(nproc) / ${#jobs[@]} )); [ "$threads" -lt 1 ] && threads=1
  local j=0 gpu
  for job in "${jobs[@]}"; do
    f=${job%%|*}; local sh=${job##*|}
    gpu=$(( j % ngpu )); j=$(( j + 1 ))    # processes spread over the GPUs (nvidia-h200-x2: 2)
    base=rel_$(basename "$f" .py); [ "$sh" != 0/1 ] && base="${base}_s${sh%%/*}"
    bases+=("$base")
    if [ "${RELIABILITY_SERIAL:-0}" = 1 ]; then
      DMS_TEST_SHARD=$sh DMS_TEST_SCALE=${DMS_TEST_SCALE:-10} run_cmd reliability 150 "$LOGS/$base.log" \
        $PY -m pytest -q -rfE -p no:cacheprovider -m cuda "${kexpr[@]}" ${PYTEST_ARGS:-} "$f"
      echo "$RC $SECS" >"$LOGS/$base.rc"
    else
      ( s0=$(date +%s); echo "+ timeout $to pytest $f (DMS_TEST_SHARD $sh, OMP_NUM_THREADS $threads, GPU $gpu)" >"$LOGS/$base.log"
        CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads DMS_TEST_SHARD=$sh DMS_TEST_SCALE=${DMS_TEST_SCALE:-10} \
          timeout -k 10 "$to" $PY -m pytest -q -rfE -p no:cacheprovider --durations=6 -m cuda "${kexpr[@]}" ${PYTEST_ARGS:-} "$f" >>"$LOGS/$base.log" 2>&1
        rc=$?; [ $rc -eq 124 ] && rc="124(timeout ${to}s)"; echo "$rc $(( $(date +%s) - s0 ))" >"$LOGS/$base.rc" ) &
      pids+=($!)
    fi
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
  for base in "${bases[@]}"; do
    read -r RC SECS <"$LOGS/$base.rc" 2>/dev/null || { RC=missing; SECS=0; }
    TEST_LOGS+=("$base (-m cuda, scale ${DMS_TEST_SCALE:-10})|$LOGS/$base.log")
    key=$(pytest_key "$LOGS/$base.log")
    if [ -z "$key" ]; then  # stopped by its timeout: what pytest -q's progress lines had reached
      dots=$(grep -E '^[.sxXFE]+( +\[ *[0-9]+%\])?$' "$LOGS/$base.log" | tr -d ' []%0-9\n')
      key="stopped after $(printf %s "$dots" | tr -cd '.' | wc -c) passed, $(printf %s "$dots" | tr -cd 'FE' | wc -c) failed"
    fi
    add_row "$base" "$RC" "$SECS" "$key"
    [ "$RC" != 0 ] && note_failures "$base" "$LOGS/$base.log" "^(FAILED|ERROR)|Error:|error:"
  done
  echo "reliability: $(( $(date +%s) - t )) s for ${#bases[@]} processes on $ngpu GPU(s), OMP_NUM_THREADS $threads" >>"$LOGS/reliability_wall.log"
}

stage_e2e() {
  if [ -f bench/bench_e2e.py ]; then stage_bench e2e bench/bench_e2e.py 240 ${E2E_ARGS:-}; return; fi
  run_cmd e2e 240 "$LOGS/e2e.log" $PY -m dms_ext.demo --device cuda
  add_row e2e "$RC" "$SECS" "$(bench_key "$LOGS/e2e.log")"
  [ "$RC" != 0 ] && note_failures e2e "$LOGS/e2e.log" "Error|error|Traceback"
}

for s in "${STAGES[@]}"; do
  case "$s" in
    tests) stage_tests ;;
    cputests) stage_cputests ;;
    decode) stage_decode ;;
    matched) PYTHONPATH="$PYTHONPATH:$FI_DIR" stage_bench matched bench/decode_matched.py 150 ;;
    step) stage_bench step bench/bench_step.py 240 ;;
    prefill) stage_bench prefill bench/bench_prefill.py 240 ;;
    hf) stage_bench hf bench/bench_hf.py 470 ${HF_ARGS:-} ;;  # the static-cache peers compile for minutes
    e2e) stage_e2e ;;
    ncu) stage_ncu ;;
    memcheck) stage_memcheck ;;
    sanitize) stage_sanitize ;;
    reliability) stage_reliability ;;
    sweep) run_cmd sweep 200 "$LOGS/sweep.log" $PY bench/sweep_decode.py ${SWEEP_CASES:+"$SWEEP_CASES"}
           add_row sweep "$RC" "$SECS" "$(grep -c SWEEP "$LOGS/sweep.log") configs"
           while IFS= read -r l; do NOTES+=("$l"); done < <(grep SWEEP "$LOGS/sweep.log") ;;
    capi) run_cmd capi 240 "$LOGS/capi.log" bash -c 'cmake -S . -B build/capi -G Ninja -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ -DDMS_CUDA_ARCH=90a -DPython3_EXECUTABLE="$(command -v '"$PY"')" && cmake --build build/capi -j16 && ctest --test-dir build/capi -V'
          add_row capi "$RC" "$SECS" "$(grep -E "tests passed|tests failed|Total Test" "$LOGS/capi.log" | tr '\n' ' ' | cut -c1-150)"
          [ "$RC" != 0 ] && note_failures capi "$LOGS/capi.log" "FAIL|rror" ;;
    retrofit) run_cmd retrofit 560 "$LOGS/retrofit.log" $PY bench/retrofit_experiment.py --seed 0 ${RETROFIT_ARGS:-}
          add_row retrofit "$RC" "$SECS" "$(bench_key "$LOGS/retrofit.log")"
          [ "$RC" != 0 ] && note_failures retrofit "$LOGS/retrofit.log" "Error|error|Traceback" ;;
    smoke) stage_bench smoke bench/prefill_v2_smoke.py 200 ${SMOKE_ARGS:-} ;;
    mutation) stage_bench mutation tests/mutation_check.py 150 --device cuda ;;
    kmutation) stage_bench kmutation bench/kernel_mutations.py 540 ;;
    bvalidate) stage_bench bvalidate bench/bench_validate.py 120 ;;
    extra) run_cmd extra 300 "$LOGS/extra.log" bash -c "${EXTRA_CMD:-echo no EXTRA_CMD}"
           add_row extra "$RC" "$SECS" "$(bench_key "$LOGS/extra.log")"
           [ "$RC" != 0 ] && note_failures extra "$LOGS/extra.log" "^(FAILED|ERROR)|Error|error|Traceback" ;;
    *) add_row "$s" unknown 0 "unknown stage" ;;
  esac
done
[ -n "$FI_PID" ] && kill -- -"$FI_PID" 2>/dev/null   # still compiling only if decode was not run

# ---------------------------------------------------------------- (e) outputs and summary
# The round report: commit, per test file pass / fail / skip counts, sanitizer verdicts.
count_of() {  # count_of WORD "summary line" -> the number before WORD (0 if absent)
  local n; n=$(echo "$2" | grep -oE "[0-9]+ $1" | head -n 1 | cut -d' ' -f1); echo "${n:-0}"
}
if [ ${#TEST_LOGS[@]} -gt 0 ] || [ ${#SANITIZE_LINES[@]} -gt 0 ]; then
  REPORT="bench/results/gpu_round_$(date -u '+%Y-%m-%d_%H%M').md"
  mkdir -p bench/results
  # GIT_COMMIT first: the device copy of a working tree may carry a stale .git.
  commit=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
  [ -z "$commit" ] && commit="unknown (no .git here and no GIT_COMMIT)"
  {
    echo "# GPU round $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo "commit: $commit  "
    echo "source digest: $($PY bench/source_digest.py 2>/dev/null || echo unknown) (bench/source_digest.py: recompute it on a checkout)  "
    echo "stages: ${STAGES[*]}; $(grep -E '^torch ' "$LOGS/env.log" | head -n 1)"
    if [ ${#TEST_LOGS[@]} -gt 0 ]; then
      echo; echo "| tests | passed | failed | errors | skipped | summary |"; echo "|---|---|---|---|---|---|"
      for tl in "${TEST_LOGS[@]}"; do
        key=$(pytest_key "${tl#*|}")
        echo "| ${tl%%|*} | $(count_of passed "$key") | $(count_of failed "$key") | $(count_of error "$key") | $(count_of skipped "$key") | $key |"
      done
    fi
    if [ ${#SANITIZE_LINES[@]} -gt 0 ]; then
      echo; echo "| sanitizer | verdict |"; echo "|---|---|"
      for sl in "${SANITIZE_LINES[@]}"; do echo "| ${sl%%|*} | ${sl#*|} |"; done
    fi
  } >"$REPORT"
  cp "$REPORT" "$OUT/"
fi
n=0
while IFS= read -r f; do
  [ $n -ge 5 ] && break
  cp "$f" "$OUT/" && n=$((n + 1))
done < <(find bench/results -name '*.md' -newer "$MARK" 2>/dev/null | sort)
rm -f "$MARK"
tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null

{
  echo "# GPU round $(date '+%Y-%m-%d %H:%M:%S'), stages: ${STAGES[*]}, $(elapsed) s"
  grep -E "^torch " "$LOGS/env.log" | head -n 1
  echo
  echo "| stage | rc | s | key numbers |"
  echo "|---|---|---|---|"
  for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c d <<<"$r"
    echo "| $a | $b | $c | $d |"
  done
} >"$OUT/summary.md"

if [ ${#NOTES[@]} -gt 0 ]; then
  echo "---- first errors (full logs in \$OUT/logs.tgz) ----"
  printf '%s\n' "${NOTES[@]}" | head -n 80
fi
echo "---- results: $(ls "$OUT" | tr '\n' ' ')"
echo "==== SUMMARY ===="
cat "$OUT/summary.md"
