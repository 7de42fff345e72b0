#!/usr/bin/env bash
# A/B of two sparse_decode builds in one GPU run, interleaved A B A B so that drift shows (A1 vs
# A2). A = the tree as it is; B = the tree with AB_PATCH applied (`patch -p1`; make it with
# `git diff main..BRANCH -- csrc > .carry/x.patch`). Each variant is timed with
# bench/bench_decode.py --no-peers --no-dense plus the flags given here; the table of `ours us`
# per row comes last (B / A: below 1, B is faster). Several patches (AB_PATCH="x.patch y.patch"):
# variants B, C, ..., each the tree + its patch, timed A B C A B C (AB_REPS rounds, default 2).
#
#   AB_PATCH=.carry/d5.patch bash bench/ab_decode.sh [bench_decode flags, e.g. --rows B1,B64]
#
# AB_BENCH: another bench command instead (e.g. "bench/bench_prefill.py --small"; it must take
# --results-dir and write a markdown table), AB_COL its time column (default "ours us"), AB_KEYS
# how many leading cells name a row (default 1; bench_prefill's main table: 4 = N, D, dtype, CR).
#
# Run it after a gpu_round.sh build (the in-place _C.so is A); it builds B incrementally, puts A's
# library back and reverses the patch at the end. Writes $OUT/ab_decode_<patch name>.md (OUT default
# /tmp/dms_round).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/dms_round}
AB=/tmp/dms_ab
mkdir -p "$OUT" "$AB"
: "${AB_PATCH:?AB_PATCH: the patch that turns A into B}"
SO=$(ls dms_ext/_C*.so 2>/dev/null | head -n 1)
[ -n "$SO" ] || { echo "no dms_ext/_C*.so: build first (bash bench/gpu_round.sh extra with EXTRA_CMD=true)"; exit 2; }
cp "$SO" "$AB/A.so"
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
# AB_PATCH may name several patches (space-separated): variants B, C, ..., each the tree + its patch.
read -r -a PATCHES <<<"$AB_PATCH"
LETTERS=(B C D E F G)
VARS=(A)
for i in "${!PATCHES[@]}"; do
  V=${LETTERS[$i]}; P=${PATCHES[$i]}
  patch -p1 --forward <"$P" >"$AB/patch.log" 2>&1 || { cat "$AB/patch.log"; cp "$AB/A.so" "$SO"; exit 2; }
  t=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} DMS_CUDA_ARCH=90a $PY setup.py build_ext --inplace >"$AB/build_$V.log" 2>&1
  rc=$?
  patch -p1 -R <"$P" >>"$AB/patch.log" 2>&1
  echo "$V built in $(( $(date +%s) - t )) s (rc $rc)"
  [ $rc = 0 ] || { grep -E "error" "$AB/build_$V.log" | head -n 20; cp "$AB/A.so" "$SO"; exit 1; }
  cp "$SO" "$AB/$V.so"
  VARS+=("$V")
done
RUNS=()
for k in $(seq 1 "${AB_REPS:-2}"); do for V in "${VARS[@]}"; do RUNS+=("$V$k"); done; done
for run in "${RUNS[@]}"; do
  cp "$AB/${run:0:1}.so" "$SO"
  rm -rf "$AB/$run"; mkdir -p "$AB/$run"
  $PY ${AB_BENCH:-bench/bench_decode.py --no-peers --no-dense} --results-dir "$AB/$run" "$@" >"$AB/$run.log" 2>&1 \
    || { echo "$run failed:"; tail -n 20 "$AB/$run.log"; }
  ls "$AB/$run"/*.md >/dev/null 2>&1 || { echo "$run wrote no table:"; tail -n 20 "$AB/$run.log"; }
  mkdir -p "$OUT/ab_logs"; cp "$AB/$run.log" "$OUT/ab_logs/" 2>/dev/null
done
cp "$AB/A.so" "$SO"
NAME=$(for P in "${PATCHES[@]}"; do basename "$P" .patch; done | paste -sd_)
$PY - "$AB" "$AB_PATCH" "$*" "${AB_BENCH:-bench/bench_decode.py --no-peers --no-dense}" "${AB_COL:-ours us}" "${RUNS[*]}" <<'EOF' | tee "$OUT/ab_decode_$NAME.md"
import glob, os, sys
ab, patches, flags, bench, col, order = sys.argv[1:7]
keys = int(os.environ.get("AB_KEYS", "1"))
order = order.split()
variants = list(dict.fromkeys(r[0] for r in order))
def rows(run):
    f = sorted(glob.glob(os.path.join(ab, run, "*.md")))
    out, cols = {}, None
    for line in (open(f[-1]).read().splitlines() if f else []):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.strip():
            cols = None  # a table ends at a blank line
        elif col in cells:
            cols = cells
        elif cols and len(cells) > cols.index(col) and not set(cells[0]) <= set("-"):
            # (len(cells) may differ from the header's: a header like max|a-b| splits in three)
            out.setdefault(" ".join(cells[:keys]), cells[cols.index(col)])
    return out
runs = {r: rows(r) for r in order}
names = ", ".join(f"{v} = tree + {p}" for v, p in zip(variants[1:], patches.split()))
print(f"# A/B (bench/ab_decode.sh): A = tree, {names}\n")
print(f"{bench} {flags}; order {' '.join(order)}; column `{col}` (medians)\n")
ratios = [f"{v} / A" for v in variants[1:]]
print("| case | " + " | ".join(order) + " | " + " | ".join(ratios) + " |")
print("|---" * (1 + len(order) + len(ratios)) + "|")
for case in runs[order[0]]:
    cells = [runs[r].get(case, "-") for r in order]
    mean = {}
    for var in variants:
        try:
            reps = [r for r in order if r[0] == var]
            mean[var] = sum(float(runs[r][case]) for r in reps) / len(reps)
        except (KeyError, ValueError):
            mean[var] = None
    rs = [f"{mean[x] / mean['A']:.3f}" if mean[x] and mean["A"] else "-" for x in variants[1:]]
    print(f"| {case} | " + " | ".join(cells) + " | " + " | ".join(rs) + " |")
EOF
