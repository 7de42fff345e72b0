// sparse_prefill v2 (sm_90a): which (chunk, query tile) a CTA owns and the key tiles it walks.
//
// Same tile map as the mma.sync kernel (sparse_prefill.cu), so both agree on what a "tile" is:
// rows of a tile are (token, head in the GQA group) pairs, row = token * G + head, kBlockM rows
// per tile; chunk c owns tile slots from floor(cu[c] * G / kBlockM) + c (strictly increasing in
// c, room for ceil(L * G / kBlockM) tiles); blockIdx.x counts down so heavy tiles (late in a
// chunk, more keys) start first. Slots past a chunk's tiles exit at once.
//
// Key tiles of a query tile [i0, i1) come from four segments, in this order (only tiles with
// something visible are ever walked):
//   0 cached slots [0, seq_len)           flagged ring slots masked out
//   1 flagged ring slots (list)           visible iff t - p <= w   (only when i0 < w)
//   2 kept chunk keys j < band_start (list)  always visible
//   3 band j in [band_start, i1)          j <= i and (i - j <= w or !d_j); band_start <=
//                                         max(0, i0 - w), the band a whole number of tiles
//                                         (or, merged, band_start 0 and the last tile partial)
#pragma once
#include <cstdint>

#include "dms/params.h"
#include "kernels/prefill_sm90/launch.h"
#include "kernels/prefill_slots.cuh"

namespace dms {
namespace sm90 {

struct TileCtx {
  long long r0, rows_total;
  int start, L, n, seq_len, num_flagged, num_kept, band_start;
  int end_cached, end_flagged, end_kept, ntiles;  // tile index where each key segment ends
  int i0, i1, r, c, g;
  int kept_row;  // >= 0: the kept tiles come by TMA from ws.ck / cv, list row 0 at this row; -1: gathered
};

// The kept keys of chunk c (first token start) of kv head g before chunk key j (ws.cnt: chunk c's
// L + 1 prefix counts at cu[c] + c); j = L: all of them.
__device__ __forceinline__ int kept_before(const PrefillWs& ws, int g, int start, int c, int j) {
  return ws.cnt[(long long)g * ws.cnt_stride + start + c + j];
}

// Fills x for CTA slot `bx` (already counted down) of kv head g; false: nothing to do.
// make_tile sits between a work item's last key loads and the next item's Q (the producer's thread
// 0; 2.4 us per item in the probe, prefill_probe_2026-12-01.md): its global loads are issued in three
// dependent rounds (the chunk of the slot; the chunk's bounds and row; the row's counts, the
// chunk's flagged count and both kept-key prefix counts), each predicated on what makes its address valid, and
// the checks come after them, not between (a return between two loads serializes them).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool make_tile(const SparsePrefillParams& p, const PrefillWs& ws,
                                          long long b, int g, TileCtx& x, bool merge) {
  const int H = p.kv.num_kv_heads, G = p.num_q_heads / H, w = p.state.window;
  const int c = prefill_slots::chunk_of_slot(p, b, G, kBlockM);
  if (c < 0) return false;
  // Round 2: the chunk's bounds and row.
  const int start = p.cu_seqlens[c], end = p.cu_seqlens[c + 1];
  const int r = p.rows[c];
  const bool chunk_ok = start >= 0 && end >= start && end <= p.total_tokens && r >= 0 && r < p.state.max_seqs;
  const int L = end - start;
  const long long rows_total = (long long)L * G;
  const long long r0 = (b - prefill_slots::slot_start_at(start, c, G, kBlockM)) * kBlockM;
  const bool ok = chunk_ok && r0 < rows_total;
  const int i0 = (int)(r0 / G);
  const int i1 = (int)min((long long)L, (r0 + kBlockM - 1) / G + 1);
  // The band must cover [i0 - w, i1); it is stretched down to whole key tiles ending at i1
  // (the per-key rule holds for any j, so a longer band is still exact), and the kept list
  // stops where the band starts: one partial tile instead of two.
  const int band_len = i1 - max(0, i0 - w);
  int band_start = max(0, i1 - (band_len + kBlockN - 1) / kBlockN * kBlockN);
  // Round 3: the row's counts, the chunk's flagged count, the kept keys before the band and in
  // the whole chunk.
  const long long cap = (long long)p.state.pages.max_blocks_per_head * p.kv.block_size;
  const int n = ok ? p.state.num_tokens[r] : 0;
  const int sl = ok ? p.state.pages.seq_lens[(long long)r * H + g] : 0;
  const int num_flagged = ok && i0 < w ? ws.fcount[(long long)c * H + g] : 0;
  int num_kept = ok && band_start > 0 ? kept_before(ws, g, start, c, band_start) : 0;
  const int kept_all = ok && merge && ws.ck ? kept_before(ws, g, start, c, L) : 0;
  if (!ok) return false;
  const int seq_len = (int)min((long long)max(sl, 0), cap);
  // merge (the band is TMA-loaded): when (nearly) every chunk key before the band is kept, the
  // band starts at key 0 and the kept list is empty. Exact: for j < band_start <= i0 - w the
  // band's rule is "visible iff !d_j", the kept list's rule (kept = j < L - 1 && !d_j, and
  // j < i0 - w < L - 1). At most 1 / 32 of the keys walked are evicted ones (masked to 0); with
  // none evicted (a fresh CR 1 prompt) the tile count is unchanged: ceil(i1 / kBlockN).
  if (merge && band_start > 0 && (band_start - num_kept) * 32 <= band_start) {
    band_start = 0;
    num_kept = 0;
  }
  x.r0 = r0; x.rows_total = rows_total;
  x.start = start; x.L = L; x.n = n; x.seq_len = seq_len;
  x.num_flagged = num_flagged; x.num_kept = num_kept; x.band_start = band_start;
  x.end_cached = (seq_len + kBlockN - 1) / kBlockN;
  x.end_flagged = x.end_cached + (num_flagged + kBlockN - 1) / kBlockN;
  x.end_kept = x.end_flagged + (num_kept + kBlockN - 1) / kBlockN;
  x.ntiles = x.end_kept + (i1 - band_start + kBlockN - 1) / kBlockN;
  x.i0 = i0; x.i1 = i1; x.r = r; x.c = c;
  x.kept_row = -1;
  if (merge && ws.ck && num_kept > 0 && kept_compacted(kept_all, L))
    x.kept_row = start + kKeptPad * c;
  return true;
}

}  // namespace sm90
}  // namespace dms
