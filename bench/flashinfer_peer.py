"""FlashInfer 0.2.14.post1 as a decode peer, imported from the unpacked sdist.

The GPU machine has no network, so FlashInfer comes as the sdist in .carry/ and JIT-compiles
its kernels on first use. bench/gpu_round.sh unpacks it (and this module does the same if it
was not done); `python3 bench/flashinfer_peer.py --warm` compiles every module the decode
bench needs in ONE ninja run (parallel across modules) and self-checks them, so it can run in
the background while dms_ext builds.

Peers offered:
  PerHeadDecode  each (sequence, kv head) its own request: num_kv_heads=1, the GQA group as
                 its query heads, pages = our single-head blocks (NHD view [blocks, bs, 1, D]).
                 This is how NVIDIA's DMS code decodes variable per-head lengths. With
                 float8_e4m3fn pools (q_dtype bf16/fp16, k_scale, v_scale) it is FlashInfer's
                 KV-only fp8 decode: plan(q_data_type=q, kv_data_type=e4m3); run(k_scale=,
                 v_scale=) folds k_scale into sm_scale and multiplies the output by v_scale in a
                 separate elementwise op after the kernel (decode.py, 0.2.14.post1). Both modes
                 take it: use_tensor_cores=False (the CUDA-core decode kernel, fp8 loads) and
                 True (the fa2 prefill kernel, fp8 K/V cast to q's type before the MMAs); fp8
                 tensor-core math (fp8 q) is fa3-only and not reachable from the decode wrapper.
  DenseDecode    ordinary paged decode over an uncompressed cache, Hkv heads per page.
If FlashInfer cannot be imported or compiled, load() says why and the bench goes on without it.
The fp8-KV modules are built in the same --warm run (--fp8-head-dims, --fp8-tc-head-dims) but
cannot fail it: a failed build or self-check is reported per mode (lines "FP8KV ..."), which
ensure_built() parses into fp8_modes().
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import subprocess
import sys
import tarfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST_NAME = "flashinfer_python-0.2.14.post1"
SRC_ROOT = os.environ.get("DMS_FLASHINFER_SRC", os.path.join(REPO, "build", "flashinfer_src"))
SDIST_DIR = os.path.join(SRC_ROOT, SDIST_NAME)
# The sdist's package expects its headers under flashinfer/data (a wheel build copies them
# there); symlinks give the JIT the same tree without building a wheel.
DATA_LINKS = {"cutlass": "3rdparty/cutlass", "spdlog": "3rdparty/spdlog", "csrc": "csrc",
              "include": "include", "tvm_binding": "tvm_binding"}

_state = {"fi": None, "reason": None, "stubs": [], "fp8": {}}
FP8_SCALE = 4.0 / 448   # the self-check's k_scale = v_scale (bench_decode uses the same)


def setup_env() -> None:
    # Kept under build/ (git-ignored) so a warm GPU machine reuses the compiled modules.
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", os.path.join(REPO, "build", "flashinfer_ws"))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))


def unpack() -> str:
    """Unpacked sdist folder with flashinfer/data links; unpacks .carry's tarball if needed."""
    if not os.path.isdir(os.path.join(SDIST_DIR, "flashinfer")):
        tarballs = glob.glob(os.path.join(REPO, ".carry", SDIST_NAME + ".tar.gz"))
        if not tarballs:
            raise FileNotFoundError(f"{SDIST_DIR} missing and no .carry/{SDIST_NAME}.tar.gz")
        os.makedirs(SRC_ROOT, exist_ok=True)
        with tarfile.open(tarballs[0]) as t:
            t.extractall(SRC_ROOT)
    data = os.path.join(SDIST_DIR, "flashinfer", "data")
    os.makedirs(data, exist_ok=True)
    for name, target in DATA_LINKS.items():
        link = os.path.join(data, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "..", target), link)
    return SDIST_DIR


class _Missing:
    """Stands in for any attribute of a stubbed module."""

    def __init__(self, *a, **k):
        raise RuntimeError("stubbed dependency used (not installed on this machine)")


def _stub(name: str) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name in sys.modules:
            continue
        m = types.ModuleType(mod_name)
        m.__path__ = []  # a package, so submodules can be stubbed under it
        m.__getattr__ = lambda attr, _n=mod_name: _Missing  # noqa: E731
        sys.modules[mod_name] = m
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], m)
    _state["stubs"].append(name)


def load():
    """Imports flashinfer; returns the module or None (reason in reason())."""
    if _state["fi"] is not None or _state["reason"] is not None:
        return _state["fi"]
    try:
        setup_env()
        src = unpack()
        if src not in sys.path:
            sys.path.insert(0, src)
        # Hard imports of things the decode path never uses (downloaders, driver bindings)
        # may be missing on the offline GPU machine: stub them and retry.
        for _ in range(16):
            try:
                fi = importlib.import_module("flashinfer")
                break
            except ModuleNotFoundError as e:
                top = (e.name or "").split(".")[0]
                if not e.name or top in ("flashinfer", "torch"):
                    raise
                for k in [k for k in sys.modules if k == "flashinfer" or k.startswith("flashinfer.")]:
                    del sys.modules[k]
                _stub(e.name)
        else:
            raise ImportError("too many missing dependencies: " + ", ".join(_state["stubs"]))
        _state["fi"] = fi
    except Exception as e:  # any failure means "peer unavailable", never a crashed bench
        _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
    return _state["fi"]


def reason() -> str | None:
    return _state["reason"]


def stubs() -> list:
    return list(_state["stubs"])


def _csv(xs) -> str:
    return ",".join(map(str, xs))


def ensure_built(timeout_s: float = 240.0, head_dims=(64, 128), dtypes=("bf16",),
                 tc_head_dims=(128,), fp8_head_dims=(), fp8_tc_head_dims=()) -> tuple[bool, str]:
    """Runs --warm in a subprocess (so a hung or failed JIT cannot take the bench down).

    The fp8-KV modes it built and checked land in fp8_modes(); their failures do not make
    this return False (only the bf16/fp16 modules, a crash or the timeout do)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--warm",
           "--head-dims", _csv(head_dims), "--dtypes", _csv(dtypes),
           "--tc-head-dims", _csv(tc_head_dims), "--fp8-head-dims", _csv(fp8_head_dims),
           "--fp8-tc-head-dims", _csv(fp8_tc_head_dims)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"JIT build did not finish within {timeout_s:.0f} s"
    dt = time.time() - t0
    tail = (p.stdout + p.stderr).strip().splitlines()
    for line in tail:
        m = re.match(r"FP8KV q=(\w+) D=(\d+) tc=(True|False) (ok|built|FAILED)(.*)", line)
        if m:
            key = (m.group(1), int(m.group(2)), m.group(3) == "True")
            _state["fp8"][key] = None if m.group(4) != "FAILED" else m.group(5).strip(" :")[:300]
    if p.returncode != 0:
        return False, f"warm failed (rc {p.returncode}) after {dt:.0f} s: " + " | ".join(tail[-3:])[:400]
    return True, f"ready after {dt:.0f} s ({tail[-1] if tail else ''})"


def ready(timeout_s: float, **kw) -> tuple[bool, str]:
    """ensure_built(timeout_s, **kw), then load(): (usable, what to print: the build's message,
    or why the peer is unavailable, with any modules stubbed on import)."""
    ok, msg = ensure_built(timeout_s, **kw)
    if ok and load() is None:
        return False, f"unavailable: import failed: {reason()}"
    if not ok:
        return False, f"unavailable: {msg}"
    return True, f"0.2.14.post1 from the sdist, {msg}" + (
        f" (stubbed missing modules: {', '.join(stubs())})" if stubs() else "")


def fp8_modes() -> dict:
    """{(q dtype name, head dim, use_tensor_cores): None if usable, else why not} for the
    fp8-KV modes an ensure_built() call asked for."""
    return dict(_state["fp8"])


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[name]


def per_head_indices(block_table, seq_lens, block_size):
    """FlashInfer paged metadata with each (sequence, kv head) its own request.

    Returns (indptr, indices, last_page_len), int32 on block_table's device; request r =
    b * Hkv + g, so q.view(B * Hkv, G, D) lines up with it.
    """
    import torch
    dev = block_table.device
    lens = seq_lens.reshape(-1).to(torch.int64)
    if bool((lens <= 0).any()):
        raise ValueError("seq_lens: FlashInfer needs at least one token per request")
    nb = (lens + block_size - 1) // block_size
    maxb = block_table.shape[-1]
    mask = torch.arange(maxb, device=dev)[None, :] < nb[:, None]
    indices = block_table.reshape(-1, maxb)[mask].to(torch.int32).contiguous()
    indptr = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.cumsum(nb, 0).to(torch.int32)
    last = (lens - (nb - 1) * block_size).to(torch.int32)
    return indptr, indices, last


class _Wrapper:
    def __init__(self, use_tensor_cores: bool, device, workspace_mb: int = 128):
        import torch
        fi = load()
        if fi is None:
            raise RuntimeError(f"flashinfer unavailable: {reason()}")
        self.ws = torch.zeros(workspace_mb << 20, dtype=torch.uint8, device=device)
        self.w = fi.BatchDecodeWithPagedKVCacheWrapper(self.ws, "NHD",
                                                       use_tensor_cores=use_tensor_cores)


class PerHeadDecode:
    """DMS per-head cache through FlashInfer: q [B, Hq, D] -> out [B, Hq, D].

    k_cache / v_cache [blocks, bs, D] in q's dtype, or float8_e4m3fn with q_dtype (q's dtype)
    and the dequantization scales k_scale / v_scale (stored value * scale = the real value)."""

    def __init__(self, k_cache, v_cache, block_table, seq_lens, num_q_heads: int, scale: float,
                 use_tensor_cores: bool, q_dtype=None, k_scale=None, v_scale=None):
        nb, bs, d = k_cache.shape
        B, hkv = seq_lens.shape
        self.B, self.hq, self.hkv, self.d = B, num_q_heads, hkv, d
        self.g = num_q_heads // hkv
        self.scales = {"k_scale": k_scale, "v_scale": v_scale}
        indptr, indices, last = per_head_indices(block_table, seq_lens, bs)
        self.kv = (k_cache.view(nb, bs, 1, d), v_cache.view(nb, bs, 1, d))
        self._w = _Wrapper(use_tensor_cores, k_cache.device)
        self._w.w.plan(indptr, indices, last, self.g, 1, d, bs, pos_encoding_mode="NONE",
                       q_data_type=q_dtype or k_cache.dtype, kv_data_type=k_cache.dtype,
                       sm_scale=scale)

    def __call__(self, q):
        o = self._w.w.run(q.view(self.B * self.hkv, self.g, self.d), self.kv, **self.scales)
        return o.view(self.B, self.hq, self.d)


class DenseDecode:
    """Ordinary paged decode: k_pages, v_pages [P, page_size, Hkv, D] (NHD); every sequence
    owns pages indices[indptr[b]:indptr[b+1]], the last one holding last_page_len[b] tokens."""

    def __init__(self, k_pages, v_pages, indptr, indices, last_page_len, num_q_heads: int,
                 scale: float, use_tensor_cores: bool):
        _, ps, hkv, d = k_pages.shape
        self.kv = (k_pages, v_pages)
        self._w = _Wrapper(use_tensor_cores, k_pages.device)
        self._w.w.plan(indptr, indices, last_page_len, num_q_heads, hkv, d, ps,
                       pos_encoding_mode="NONE", q_data_type=k_pages.dtype,
                       kv_data_type=k_pages.dtype, sm_scale=scale)

    def __call__(self, q):
        return self._w.w.run(q, self.kv)


class DensePages:
    """A dense paged cache for DenseDecode: B sequences of L tokens each (Hkv heads, head dim d,
    pages of page_size), `copies` independent page sets in one pool with shuffled page ids (so
    rotating the copies reads past L2). indices[i]: copy i's page ids."""

    def __init__(self, B: int, L: int, hkv: int, d: int, page_size: int, copies: int, dtype,
                 gen_cpu, gen_dev):
        import torch
        dev = gen_dev.device
        npg = -(-L // page_size)
        self.k = torch.randn(B * npg * copies, page_size, hkv, d, device=dev, dtype=dtype, generator=gen_dev)
        self.v = torch.randn_like(self.k)
        perm = torch.randperm(B * npg * copies, generator=gen_cpu).to(torch.int32).to(dev)
        self.indices = [perm[i * B * npg:(i + 1) * B * npg] for i in range(copies)]
        self.indptr = (torch.arange(B + 1, dtype=torch.int32) * npg).to(dev)
        self.last = torch.full((B,), L - (npg - 1) * page_size, dtype=torch.int32, device=dev)

    def decoders(self, num_q_heads: int, scale: float, use_tensor_cores: bool) -> list:
        """One planned DenseDecode per copy."""
        return [DenseDecode(self.k, self.v, self.indptr, ix, self.last, num_q_heads, scale, use_tensor_cores)
                for ix in self.indices]


def _self_check(dtype, d: int, modes=(False, True), fp8: bool = False) -> str:
    """Small per-head decode vs float32 torch math in the given modes; raises on a mismatch.
    fp8: the pools are float8_e4m3fn with k_scale = v_scale = FP8_SCALE, q / out in dtype."""
    import torch
    g, hkv, B, bs = 4, 2, 3, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    lens = torch.tensor([[1, 37], [16, 17], [100, 5]], dtype=torch.int32, device="cuda")
    nbh = (lens + bs - 1) // bs
    maxb = int(nbh.max())
    nblocks = int(nbh.sum()) + 4
    perm = torch.randperm(nblocks, device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(B, hkv, maxb, dtype=torch.int32, device="cuda")
    mask = torch.arange(maxb, device="cuda") < nbh[..., None]
    table[mask] = perm[: int(mask.sum())]
    kc = torch.randn(nblocks, bs, d, device="cuda", generator=gen)
    vc = torch.randn(nblocks, bs, d, device="cuda", generator=gen)
    if fp8:
        kc, vc = [(x / FP8_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn) for x in (kc, vc)]
        deq, extra = FP8_SCALE, {"q_dtype": dtype, "k_scale": FP8_SCALE, "v_scale": FP8_SCALE}
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
        deq, extra = 1.0, {}
    q = torch.randn(B, g * hkv, d, device="cuda", generator=gen).to(dtype)
    scale = d ** -0.5
    ref = torch.empty(B, g * hkv, d, device="cuda")
    kf, vf = kc.float().view(-1, d) * deq, vc.float().view(-1, d) * deq
    for b in range(B):
        for h in range(hkv):
            n = int(lens[b, h])
            slots = torch.arange(n, device="cuda")
            rows = table[b, h, slots // bs].long() * bs + slots % bs
            k, v = kf[rows], vf[rows]
            p = torch.softmax(q[b, h * g:(h + 1) * g].float() @ k.T * scale, -1)
            ref[b, h * g:(h + 1) * g] = p @ v
    msgs = []
    for tc in modes:
        out = PerHeadDecode(kc, vc, table, lens, g * hkv, scale, tc, **extra)(q)
        err = (out.float() - ref).abs().max().item()
        if not err < 3e-2:
            raise RuntimeError(f"flashinfer per-head decode{' fp8' if fp8 else ''} D{d} tc={tc} "
                               f"max err {err}")
        msgs.append(f"D{d} tc={tc} err {err:.1e}")
    return ", ".join(msgs)


def _decode_spec(q, kv, d):
    """The JIT spec BatchDecodeWithPagedKVCacheWrapper.plan builds (decode.py, CUDA-core branch):
    o in q's type, int32 indices, no RoPE, no sliding window, no soft cap."""
    import torch
    from flashinfer.jit import gen_batch_decode_module
    return gen_batch_decode_module(q, kv, q, torch.int32, d, d, 0, False, False)


def _tc_spec(q, kv, d):
    """The tensor-core mode's module: the fa2 prefill kernel (decode.py, use_tensor_cores branch)."""
    import torch
    from flashinfer.jit import gen_batch_prefill_module
    return gen_batch_prefill_module("fa2", q, kv, q, torch.int32, d, d, 0, False, False, False)


def _one_line(e: Exception) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    err = [x for x in lines if "error" in x.lower()]
    return f"{type(e).__name__}: {(err or lines or [''])[0].strip()[:200]}"


def warm(head_dims, dtypes, tc_head_dims, fp8_head_dims=(), fp8_tc_head_dims=()) -> None:
    import torch
    t0 = time.time()
    fi = load()
    if fi is None:
        print(f"flashinfer unavailable: {reason()}")
        sys.exit(2)
    if stubs():
        print("stubbed missing modules:", ", ".join(stubs()))
    from flashinfer.jit.core import build_jit_specs
    verbose = os.environ.get("FLASHINFER_JIT_VERBOSE") == "1"
    fp8 = _torch_dtype("fp8")
    specs = []
    for name in dtypes:
        dt = _torch_dtype(name)
        specs += [_decode_spec(dt, dt, d) for d in head_dims]
        # The fa2 prefill module is ~10 kernel files: only build it where it is timed.
        specs += [_tc_spec(dt, dt, d) for d in tc_head_dims]
    # fp8 KV (q and out in each of dtypes): {(q name, D, tensor cores): spec}.
    fp8_specs = {}
    for name in dtypes:
        dt = _torch_dtype(name)
        fp8_specs.update({(name, d, False): _decode_spec(dt, fp8, d) for d in fp8_head_dims})
        fp8_specs.update({(name, d, True): _tc_spec(dt, fp8, d) for d in fp8_tc_head_dims})
    fp8_state = {k: None for k in fp8_specs}  # None: usable so far, else why not
    every = specs + list(fp8_specs.values())
    print(f"building {len(every)} modules ({os.environ.get('MAX_JOBS')} jobs): "
          + ", ".join(sp.name[:40] for sp in every), flush=True)
    try:
        build_jit_specs(every, verbose=verbose)  # one ninja run: all modules in parallel
    except Exception:
        if not fp8_specs:
            raise
        # Something failed: the bf16/fp16 modules must still build (or this warm fails as
        # before); each fp8 module is then built on its own so one bad mode spares the others.
        print("combined build failed; retrying the modules one group at a time", flush=True)
        if specs:
            build_jit_specs(specs, verbose=verbose)
        for k, sp in fp8_specs.items():
            try:
                build_jit_specs([sp], verbose=verbose)
            except Exception as e:
                fp8_state[k] = "JIT build: " + _one_line(e)
    n_bad = sum(why is not None for why in fp8_state.values())
    print(f"built {len(every) - n_bad} of {len(every)} modules in {time.time() - t0:.0f} s", flush=True)
    if torch.cuda.is_available():
        checks = [_self_check(_torch_dtype(n), d, (False, True) if d in tc_head_dims else (False,))
                  for n in dtypes for d in head_dims]
        if checks:
            print("self-check ok:", "; ".join(checks))
        for (name, d, tc), why in fp8_state.items():
            if why is None:
                try:
                    _self_check(_torch_dtype(name), d, (tc,), fp8=True)
                except Exception as e:
                    fp8_state[(name, d, tc)] = "self-check: " + _one_line(e)
    for (name, d, tc), why in fp8_state.items():
        status = "FAILED: " + why if why else "ok" if torch.cuda.is_available() else "built"
        print(f"FP8KV q={name} D={d} tc={tc} {status}", flush=True)
    fp8_msg = ""
    if fp8_state:
        good = sum(why is None for why in fp8_state.values())
        fp8_msg = f", fp8 KV modes usable {good}/{len(fp8_state)}"
    print(f"flashinfer {getattr(fi, '__version__', '?')} ready in {time.time() - t0:.0f} s{fp8_msg}")


def _ints(s: str) -> list:
    return [int(x) for x in s.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm", action="store_true", help="JIT-build the decode modules and self-check")
    ap.add_argument("--unpack", action="store_true", help="only unpack the sdist")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--tc-head-dims", default="128", help="head dims of the tensor-core (fa2) module")
    # bench_decode's "... fp8" rows are D 128; bench/gpu_round.sh's background warm (no flags)
    # thus builds their modules too.
    ap.add_argument("--fp8-head-dims", default="128",
                    help="head dims of the fp8-KV CUDA-core decode module (q in --dtypes); '' for none")
    ap.add_argument("--fp8-tc-head-dims", default="128",
                    help="head dims of the fp8-KV tensor-core (fa2) module; '' for none")
    a = ap.parse_args()
    if a.unpack:
        print(unpack())
        return
    if a.warm:
        warm(_ints(a.head_dims), [x for x in a.dtypes.split(",") if x], _ints(a.tc_head_dims),
             _ints(a.fp8_head_dims), _ints(a.fp8_tc_head_dims))
        return
    fi = load()
    print("flashinfer:", getattr(fi, "__version__", None), "| reason:", reason(), "| stubs:", stubs())


if __name__ == "__main__":
    main()
