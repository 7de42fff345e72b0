"""The test oracles of tests/bounds.py checked on their own (CPU, fast): the batched dms_bound
equals one attention_bound per query head, float32 flush-to-zero remnants are inside the bound
while a dropped key is not, and logit_interval holds the float32 RMSNorm chain while one unit
off the donor falls outside."""
import torch

from bounds import FTZ32, attention_bound, bound_violations, dms_bound, logit_interval
from dms_ext import reference


def test_dms_bound_batched_equals_per_head():
    gen = torch.Generator().manual_seed(5)
    N, hkv, G, D = 37, 3, 5, 16
    q = torch.randn(N, hkv * G, D, generator=gen).bfloat16()
    k = torch.randn(N, hkv, D, generator=gen).bfloat16()
    v = torch.randn(N, hkv, D, generator=gen).bfloat16()
    lg = torch.randn(N, hkv, generator=gen) * 4
    rows = list(range(20, N))
    o, lse, tol, tol_lse = dms_bound(q, k, v, lg, 3, 0.3, rows=rows, device="cpu")
    mask = reference.visibility_mask(lg, 3)[:, rows]
    for h in range(hkv * G):
        g = h // G
        o1, l1, t1, tl1 = attention_bound(q[rows, h], k[:, g], v[:, g], 0.3, torch.bfloat16, mask[g])
        torch.testing.assert_close(o[:, h], o1, rtol=1e-12, atol=0)
        torch.testing.assert_close(tol[:, h], t1, rtol=1e-12, atol=0)
        torch.testing.assert_close(lse[:, h], l1, rtol=1e-12, atol=0)
        torch.testing.assert_close(tol_lse[:, h], tl1, rtol=1e-12, atol=0)


def test_flushed_remnant_is_inside_and_a_dropped_key_is_not():
    """A head whose output is a remnant below 2^-126 (one far key of value 63, as the 10x suites
    met in bf16): a kernel that flushes it to 0 is within the bound. Dropping the dominant key
    of a normal head is not."""
    q = torch.tensor([[1.0, 0.0]]).bfloat16()
    k = torch.tensor([[0.0, 0.0], [-92.0, 0.0]]).bfloat16()
    v = torch.tensor([[0.0, 0.0], [0.0, 63.0]]).bfloat16()
    o, _, tol, _ = attention_bound(q, k, v, 1.0, torch.bfloat16)
    assert 0 < o[0, 1] < FTZ32
    assert bound_violations(torch.zeros(1, 2), o, tol)[0] == 0
    # A normal head: the second key matters; reading only the first is far outside.
    k2 = torch.tensor([[0.0, 0.0], [-1.0, 0.0]]).bfloat16()
    o2, _, tol2, _ = attention_bound(q, k2, v, 1.0, torch.bfloat16)
    wrong = torch.zeros(1, 2)
    assert bound_violations(wrong, o2, tol2)[0] == 1


def _float32_chain(q, hkv, a_s, a_o, w, eps, bump=0):
    """The kernel's borrowed logit emulated with float32 torch ops (step.cuh rope_row); bump: move
    the rounded donor that many units of its dtype (a mutation)."""
    T, hq, D = q.shape
    dt = q.dtype
    x = q[:, torch.arange(hkv) * (hq // hkv)].float()
    r = torch.rsqrt(x.pow(2).sum(-1) / D + eps)
    donor = ((x[..., D - 1] * r).to(dt).float() * w[D - 1].float()).to(dt)
    if bump:
        donor = (donor.view(torch.int16) + bump).view(dt)     # one unit in magnitude
    return ((donor.float() * a_s).to(dt).float() - a_o).to(dt).float()


def test_logit_interval_holds_float32_norm_and_catches_one_unit():
    gen = torch.Generator().manual_seed(11)
    widened = caught = 0
    for dt in (torch.bfloat16, torch.float16):
        for D in (40, 64, 128, 256):
            q = (torch.randn(400, 6, D, generator=gen) * 3).to(dt)
            w = (torch.rand(D, generator=gen) + 0.5).to(dt)
            for a_s, a_o in ((100.0, 5.0), (1e4, -2.25), (-3.5, 0.0)):
                lo, hi = logit_interval(q, 2, a_s, a_o, w, 1e-6)
                got = _float32_chain(q, 2, a_s, a_o, w, 1e-6).double()
                assert bool(((got >= lo) & (got <= hi)).all()), (dt, D, a_s)
                widened += int((hi > lo).sum())
                # Mutation: a donor one unit off leaves the interval wherever that moves the logit
                # beyond the interval's own width (all but the rounding-tie entries).
                wrong = _float32_chain(q, 2, a_s, a_o, w, 1e-6, bump=1).double()
                outside = (wrong < lo) | (wrong > hi)
                assert float(outside.double().mean()) > 0.5, (dt, D, a_s)
                caught += int(outside.sum())
                # Without a norm the interval is the reference itself, a point.
                l0, h0 = logit_interval(q, 2, a_s, a_o, None)
                ref = reference.eviction_rope(q.double(), torch.zeros(400, 2, D, dtype=torch.float64),
                                              torch.zeros(400, dtype=torch.long),
                                              reference.rope_cache(1, D), a_s, a_o,
                                              logit_dtype=dt)[2].double()
                assert torch.equal(l0, h0) and torch.equal(l0, ref)
    assert widened > 0, "no case near a rounding tie: the interval was never exercised"
    assert caught > 0


def test_logit_interval_takes_infinite_logits():
    """a_s * q overflowing the dtype gives +-inf logits: equal infinities are inside, a finite
    logit where the reference is infinite (and NaN) is not."""
    from bounds import assert_logits_within
    import pytest
    q = torch.tensor([[[0.0, 6e4], [0.0, -6e4], [0.0, 1.0]]], dtype=torch.float16)   # [1, 3, 2]
    lo, hi = logit_interval(q, 3, 1e4, 5.0, None)
    assert torch.isinf(lo[0, :2]).all() and torch.equal(lo, hi)
    assert_logits_within(lo.float(), lo, hi, "inf")
    for bad in (torch.tensor([[6e4, -torch.inf, 1e4 - 5]]), torch.tensor([[torch.nan, -torch.inf, 1e4 - 5]])):
        with pytest.raises(AssertionError):
            assert_logits_within(bad, lo, hi, "finite for inf")
