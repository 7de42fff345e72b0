"""Kernel mutations: each one wrong line in a CUDA kernel, built and run against the CUDA tests,
which must fail; then the source is restored. A GPU-round stage (`bash bench/gpu_round.sh kmutation`;
KMUT_ONLY=name,name picks some), not a CPU test: tests/test_kernel_mutations.py only checks, on any
machine, that every mutation still finds its line (a refactor that moves the line must move the
mutation with it).

    python3 bench/kernel_mutations.py [--only scan_vec4_swap,merge_first_row] [--list]

Each mutation: the file, the exact text it replaces (found exactly once), the replacement, the test
files it must fail (pytest -m cuda) and what it breaks. Prints `KMUTATION <name>: caught (<n>
failed)` or `... NOT CAUGHT`; exit 1 if any mutation passed its tests or a build failed. The
library is rebuilt unmutated at the end (setup.py build_ext --inplace, as gpu_round.sh builds).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES: list = []  # one short verdict per mutation run, for the SUMMARY line


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str       # relative to the repo root
    old: str        # found exactly once
    new: str
    tests: tuple    # test files run with -m cuda
    what: str
    k: str = ""     # a pytest -k expression (empty: every cuda case of the files)
    # More (path, old, new) edits built with it: a stressor that widens a timing window so that a
    # race the mutation opens shows on every run (each text also found exactly once).
    also: tuple = ()

    def edits(self) -> list:
        return [(self.path, self.old, self.new), *self.also]


MUTATIONS = [
    Mutation("scan_vec4_swap", "csrc/kernels/sparse_decode.cu",
             "auto len4 = [&](int64_t v) { return __ldg(reinterpret_cast<const int4*>(seq_lens + v)); };",
             "auto len4 = [&](int64_t v) { const int4 x = __ldg(reinterpret_cast<const int4*>(seq_lens + v)); "
             "return make_int4(x.y, x.x, x.z, x.w); };",
             ("tests/test_decode.py",), "the scheduler's 16-byte length loads swap two rows' lengths"),
    Mutation("first_row_len", "csrc/kernels/sparse_decode.cu",
             "Seg cur = segment(pl->v, pl->P, pl->a0, pl->x);",
             "Seg cur = segment(pl->v, pl->P, pl->a0, pl->x + 1);",
             ("tests/test_decode.py",), "a CTA's first row is one key longer than its length"),
    Mutation("merge_first_row", "csrc/kernels/sparse_decode.cu",
             "line_place<kMergeThreads, true>(p, rs, c)",
             "line_place<kMergeThreads, false>(p, rs, c)",
             ("tests/test_decode.py",), "the stream-K merge looks for the cut row at the CTA's first unit, not its last"),
    Mutation("aligned_two_pieces", "csrc/kernels/streamk.cuh",
             "return n > 1 ? CutRow{v, first, first, n} : no_cut_row();",
             "return n > 2 ? CutRow{v, first, first, n} : no_cut_row();",
             ("tests/test_decode.py",), "row-aligned rows of exactly two pieces are never merged"),
    Mutation("mask_one_late", "csrc/kernels/decode/mainloop.cuh",
             "s[n][e] = key < kend ? sv * sl2 : -INFINITY;",
             "s[n][e] = key <= kend ? sv * sl2 : -INFINITY;",
             ("tests/test_decode.py",), "the decode key mask lets one key past the segment's end through"),
    Mutation("fp8_k_pairs", "csrc/kernels/decode/mainloop.cuh",
             "e4m3x4_to_f16(kr[2 * h + 1], a[1], a[3]);",
             "e4m3x4_to_f16(kr[2 * h + 1], a[3], a[1]);",
             ("tests/test_fp8_attention.py",), "fp8 K: two converted register pairs of the MMA's A operand swapped",
             k="decode"),
    Mutation("d256_row_halves", "csrc/kernels/prefill_sm90/producer.cuh",
             "return (warp / (kBlockN / 32)) * kChunks + lane % kLanesPerKey + ci * kLanesPerKey;",
             "return (warp % kParts) * kChunks + lane % kLanesPerKey + ci * kLanesPerKey;",
             ("tests/test_prefill.py",), "prefill D 256 gathers: both producer warps of a key's row copy "
             "the same half of it (the other half stays what the stage held)", k="256"),
    Mutation("q_step_carry", "csrc/kernels/sparse_prefill_sm90.cu",
             "            gp += carry;\n",
             "",
             ("tests/test_prefill.py",), "prefill v2's Q loads: a row whose head wraps past the group's last "
             "keeps the previous token (the stepped pointer misses its carry)"),
    Mutation("out_second_row_head", "csrc/kernels/sparse_prefill_sm90.cu",
             "qh[1] = qh[0] + 8 % G;",
             "qh[1] = qh[0] + 8 / G;",
             ("tests/test_prefill.py",), "prefill v2's epilogue: a thread's second row (R + 8) is stored at "
             "the wrong head of its token"),
    Mutation("prefill_pdl_wait", "csrc/kernels/sparse_prefill_sm90.cu",
             "  dev::pdl_wait();  // the chain's previous kernel (prepare / dequant / compact) has finished\n",
             "",
             ("tests/test_prefill.py",), "prefill v2's attention kernel, launched programmatically, reads the "
             "prepare kernel's counts (and the kept-key copies) without waiting for the kernels before it "
             "(prepare_kernel made ~200 us slow after its trigger: without that, the window is too short "
             "for the tests to see, 313 passed at a7521df)",
             also=(("csrc/kernels/sparse_prefill.cu", "  dev::pdl_launch_dependents();\n  const int c = blockIdx.x",
                    "  dev::pdl_launch_dependents();\n  for (int i = 0; i < 20; ++i) __nanosleep(10000);\n"
                    "  const int c = blockIdx.x"),)),
    Mutation("kept_before_band", "csrc/kernels/prefill_sm90/scheduler.cuh",
             "kept_before(ws, g, start, c, band_start)",
             "kept_before(ws, g, start, c, band_start - 1)",
             ("tests/test_prefill.py",), "prefill v2's work item counts the kept keys before the band one "
             "key short (the last kept key before the band is never seen)"),
]


def check_sources(root: str = ROOT) -> list:
    """(mutation, count of its text in the file) for every mutation whose text is not found exactly once."""
    bad = []
    for m in MUTATIONS:
        for path, old, _ in m.edits():
            with open(os.path.join(root, path)) as f:
                n = f.read().count(old)
            if n != 1:
                bad.append((m.name, n))
    return bad


def build(log: str) -> int:
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "16"), DMS_CUDA_ARCH="90a")
    if os.path.exists("/usr/bin/g++"):
        env.update(CC="/usr/bin/gcc", CXX="/usr/bin/g++")
    with open(log, "w") as f:
        return subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                               stdout=f, stderr=subprocess.STDOUT)


def run(m: Mutation) -> tuple:
    """(caught, failed count, summary line)."""
    srcs = {}
    for rel, old, _ in m.edits():
        path = os.path.join(ROOT, rel)
        if path not in srcs:
            with open(path) as f:
                srcs[path] = f.read()
        assert srcs[path].count(old) == 1, f"{m.name}: its line is not found exactly once in {rel}"
    try:
        mutated = dict(srcs)
        for rel, old, new in m.edits():
            path = os.path.join(ROOT, rel)
            mutated[path] = mutated[path].replace(old, new)
        for path, text in mutated.items():
            with open(path, "w") as f:
                f.write(text)
        t = time.time()
        rc = build(f"/tmp/kmut_build_{m.name}.log")
        if rc != 0:
            return False, -1, f"build failed (rc {rc}, /tmp/kmut_build_{m.name}.log)"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *m.tests]
        if m.k:
            cmd += ["-k", m.k]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        last = (p.stdout.strip().splitlines() or [""])[-1]
        hit = re.search(r"(\d+) failed", last)
        failed = int(hit.group(1)) if hit else 0
        return p.returncode != 0 and failed > 0, failed, f"{last} ({time.time() - t:.0f} s)"
    finally:
        for path, text in srcs.items():
            with open(path, "w") as f:
                f.write(text)
            os.utime(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=os.environ.get("KMUT_ONLY", ""))
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    todo = [m for m in MUTATIONS if not a.only or m.name in a.only.split(",")]
    if a.list:
        for m in todo:
            print(f"{m.name:20s} {m.path}: {m.what} (must fail {', '.join(m.tests)}{' -k ' + m.k if m.k else ''})")
        return 0
    bad = check_sources()
    if bad:
        print("KMUTATION stale:", ", ".join(f"{n} (found {c}x)" for n, c in bad))
        return 1
    ok = True
    for m in todo:
        caught, failed, line = run(m)
        print(f"KMUTATION {m.name}: {'caught' if caught else 'NOT CAUGHT'} ({failed} failed; {line}) -- {m.what}",
              flush=True)
        LINES.append(f"{m.name} {'caught' if caught else 'NOT CAUGHT'} ({failed} failed)")
        ok &= caught
    rc = build("/tmp/kmut_build_restored.log")
    print(f"KMUTATION restored build rc {rc}; {sum(1 for _ in todo)} mutations", flush=True)
    print("SUMMARY: " + "; ".join(l for l in LINES), flush=True)
    return 0 if ok and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
