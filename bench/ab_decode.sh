#!/usr/bin/env bash
# A/B of two sparse_decode builds in one GPU run, interleaved A B A B so that drift shows (A1 vs
# A2). A = the tree as it is; B = the tree with AB_PATCH applied (`patch -p1`; make it with
# `git diff main..BRANCH -- csrc > .carry/x.patch`). Each variant is timed with
# bench/bench_decode.py --no-peers --no-dense plus the flags given here; the table of `ours us`
# per row comes last (B / A: below 1, B is faster).
#
#   AB_PATCH=.carry/d5.patch bash bench/ab_decode.sh [bench_decode flags, e.g. --rows B1,B64]
#
# AB_BENCH: another bench command instead (e.g. "bench/bench_prefill.py --small"; it must take
# --results-dir and write a markdown table), AB_COL its time column (default "ours us").
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
patch -p1 --forward <"$AB_PATCH" >"$AB/patch.log" 2>&1 || { cat "$AB/patch.log"; exit 2; }
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
t=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} DMS_CUDA_ARCH=90a $PY setup.py build_ext --inplace >"$AB/build_B.log" 2>&1
rc=$?
patch -p1 -R <"$AB_PATCH" >>"$AB/patch.log" 2>&1
echo "B built in $(( $(date +%s) - t )) s (rc $rc)"
[ $rc = 0 ] || { grep -E "error" "$AB/build_B.log" | head -n 20; cp "$AB/A.so" "$SO"; exit 1; }
cp "$SO" "$AB/B.so"
for run in A1 B1 A2 B2; do
  cp "$AB/${run:0:1}.so" "$SO"
  rm -rf "$AB/$run"; mkdir -p "$AB/$run"
  $PY ${AB_BENCH:-bench/bench_decode.py --no-peers --no-dense} --results-dir "$AB/$run" "$@" >"$AB/$run.log" 2>&1 \
    || { echo "$run failed:"; tail -n 20 "$AB/$run.log"; }
done
cp "$AB/A.so" "$SO"
$PY - "$AB" "$AB_PATCH" "$*" "${AB_BENCH:-bench/bench_decode.py --no-peers --no-dense}" "${AB_COL:-ours us}" <<'EOF' | tee "$OUT/ab_decode_$(basename "$AB_PATCH" .patch).md"
import glob, os, sys
ab, patch, flags, bench, col = sys.argv[1:6]
def rows(run):
    f = sorted(glob.glob(os.path.join(ab, run, "*.md")))
    out, cols = {}, None
    for line in (open(f[-1]).read().splitlines() if f else []):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if col in cells:
            cols = cells
        elif cols and len(cells) == len(cols) and not set(cells[0]) <= set("-"):
            out.setdefault(cells[0], cells[cols.index(col)])
    return out
runs = {r: rows(r) for r in ("A1", "B1", "A2", "B2")}
print(f"# A/B (bench/ab_decode.sh): A = tree, B = tree + {patch}\n")
print(f"{bench} {flags}; order A1 B1 A2 B2; column `{col}` (medians)\n")
print("| case | A1 | B1 | A2 | B2 | B / A |")
print("|---|---|---|---|---|---|")
for case in runs["A1"]:
    v = [runs[r].get(case, "-") for r in ("A1", "B1", "A2", "B2")]
    try:
        a = (float(v[0]) + float(v[2])) / 2
        b = (float(v[1]) + float(v[3])) / 2
        ratio = f"{b / a:.3f}"
    except ValueError:
        ratio = "-"
    print(f"| {case} | " + " | ".join(v) + f" | {ratio} |")
EOF
