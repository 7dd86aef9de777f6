// CUDA twin of refreekv_vllm/ops/triton_last_row_scores.py: ReFreeKV cuts of many requests of
// one layer, keys read from vLLM's paged key cache. Same contract, same scratch layout idea:
//
//   stats_kernel         grid (chunks, kv_heads, reqs): per (query head, window row) running
//                        max / sum of exp2 over one key chunk; with one window row it also stores
//                        the logits and the sum of squared exp2 over non-sink keys.
//   combine_kernel       (window > 1) chunk stats -> log-sum-exp per row.
//   given_lse_kernel     (window > 1, the rows' normalisers handed in, as the prefill attention
//                        returns them) replaces the two above: the keys are read once.
//   window_probs_kernel  (window > 1) re-reads the keys: r[h, pos] = agg_i(p[h, i, pos])^2 and
//                        per-chunk sums of r.
//   cut_kernel           grid (reqs): backward scan of per-head tail sums at chunk boundaries,
//                        then inside the crossing chunk; optional ratio curve.
//
// Scores come from tensor cores (WMMA, fp32 accumulate) for 16-bit same-dtype operands, else
// from CUDA cores; everything after is fp32 (exp2 with log2(e) folded into the scale),
// deterministic (fixed reduction orders; the one atomic is an order-independent max), and never
// synchronises with the host.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>

namespace refreekv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKeys = 64;                 // keys per step: two per lane
constexpr int kMaxRows = 64;              // (query head x window row) rows per tile
constexpr int kRowsPerWarp = kMaxRows / kWarps;  // rows warp, warp + 8, ... of the tile
constexpr int kScoreLd = kKeys + 4;       // row stride of the fp32 score tile
constexpr float kNegBig = -1.0e30f;       // finite -inf: exp2(kNegBig - kNegBig) == 1
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Tensor cores (WMMA 16x16x16, fp32 accumulate) when queries and keys share a 16-bit dtype.
template <typename QT, typename KT>
constexpr bool kMmaTypes = std::is_same_v<QT, KT> && !std::is_same_v<KT, float>;

// Shared-memory row strides (elements): 16-bit rows padded by 8 (WMMA needs multiples of 8,
// and the pad spreads banks), fp32 rows by 1.
template <typename T>
__host__ __device__ constexpr int padded_ld(int d) {
  return sizeof(T) == 4 ? d + 1 : d + 8;
}

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

struct Params {
  const void* query;          // [R, W_MAX, Hq, D]
  const void* key_cache;      // [num_blocks, block_size, Hkv, D], any strides
  const int* block_tables;    // [R, max_blocks]
  const int* prompt_lens;     // [R]
  const int* window_lens;     // [R]
  const float* thresholds;    // [R]
  int* cuts;                  // [R]
  float* curve;               // [R, curve_stride] or nullptr
  float* vals;                // [R, Hq, n_scratch]: logits (last row) or r (window)
  float* row_max;             // [R, num_chunks, rows], rows = Hq * W_MAX
  float* row_sum;             // [R, num_chunks, rows]
  float* row_sum2;            // [R, num_chunks, Hq] (last row)
  float* lse;                 // [R, rows] (window), log2 units
  const float* given_lse;     // [R, W_MAX, Hq] natural-log normalisers handed in, or nullptr
  int64_t g_sr, g_sw, g_sh;
  float* chunk_sum;           // [R, num_chunks, Hq] (window)
  int64_t q_sr, q_sw, q_sh, q_sd;
  int64_t k_sb, k_ss, k_sh, k_sd;
  int64_t bt_stride;
  int64_t curve_stride;
  int64_t n_scratch;
  int num_q_heads, num_kv_heads, head_size, block_size, w_max;
  int num_sink_tokens, chunk, num_chunks;
  int q_rows;                 // query-tile rows reserved in shared memory (multiple of 16)
  float qk_scale;
  bool agg_max;
  bool vec_keys;              // keys 16-byte aligned and contiguous along D
  bool use_mma;               // head_size % 16 == 0 (and 16-bit, same-dtype operands)
  int block_shift;            // log2(block_size), or -1 when not a power of two
  int vec_shift;              // log2(head_size / (16 / key element size)), or -1
};

// a / 2^shift and a % 2^shift when the divisor is a power of two (the usual case), else
// plain division: these sit in the per-load address math.
__device__ __forceinline__ int div_pow2(int a, int shift, int divisor) {
  return shift >= 0 ? a >> shift : a / divisor;
}
__device__ __forceinline__ int mod_pow2(int a, int shift, int divisor) {
  return shift >= 0 ? a & (divisor - 1) : a % divisor;
}

// Rows of one tile are (head slot hs, window row i) -> hs * w_eff + i, for heads
// [h0, h0 + heads_here) of the GQA group.
struct Tile {
  int w_eff, heads_per_tile, num_tiles;
};

__device__ __forceinline__ int window_eff(const Params& p, int req, int n) {
  return max(1, min(min(p.window_lens[req], p.w_max), n));
}

__device__ __forceinline__ Tile make_tile(int group, int w_eff, bool aggregate) {
  Tile t;
  t.w_eff = w_eff;
  int hpt = max(1, kMaxRows / w_eff);
  // Aggregation maps one warp to one head of the tile.
  if (aggregate) hpt = min(hpt, kWarps);
  t.heads_per_tile = min(group, hpt);
  t.num_tiles = (group + t.heads_per_tile - 1) / t.heads_per_tile;
  return t;
}

template <typename QT, typename KT, int STAGES>
struct TileSmem {
  QT* q;          // [q_rows][ldq]
  KT* k[STAGES];  // [kKeys][ldk], a ring of key tiles in flight
  float* s;       // [q_rows][kScoreLd]
  int ldq, ldk;

  __device__ TileSmem(unsigned char* raw, int q_rows, int d)
      : ldq(padded_ld<QT>(d)), ldk(padded_ld<KT>(d)) {
    q = reinterpret_cast<QT*>(raw);
    raw += align128(static_cast<size_t>(q_rows) * ldq * sizeof(QT));
    for (KT*& buf : k) {
      buf = reinterpret_cast<KT*>(raw);
      raw += align128(static_cast<size_t>(kKeys) * ldk * sizeof(KT));
    }
    s = reinterpret_cast<float*>(raw);
  }

  static size_t bytes(int q_rows, int d) {
    return align128(static_cast<size_t>(q_rows) * padded_ld<QT>(d) * sizeof(QT)) +
           STAGES * align128(static_cast<size_t>(kKeys) * padded_ld<KT>(d) * sizeof(KT)) +
           static_cast<size_t>(q_rows) * kScoreLd * sizeof(float);
  }
};

// Query rows of the tile into q_s; rows [rows, round_up(rows, 16)) are zeroed for WMMA.
template <typename QT, typename KT, int STAGES>
__device__ void load_query_tile(const Params& p, int req, int kv_head, int h0, int rows,
                                int w_eff, const TileSmem<QT, KT, STAGES>& sm) {
  const int d = p.head_size;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_pad = (rows + 15) / 16 * 16;
  const QT* q = static_cast<const QT*>(p.query);
  for (int idx = threadIdx.x; idx < rows_pad * d; idx += kThreads) {
    const int row = idx / d, e = idx % d;
    QT v = from_float<QT>(0.f);
    if (row < rows) {
      const int head = kv_head * group + h0 + row / w_eff;
      const int q_row = p.w_max - w_eff + row % w_eff;  // right-aligned window rows
      v = q[req * p.q_sr + q_row * p.q_sw + head * p.q_sh + e * p.q_sd];
    }
    sm.q[row * sm.ldq + e] = v;
  }
}

// Keys [pos0, pos0 + kKeys) of one KV head into dst[key][e]; zeros past `end`. With ASYNC
// (16-bit cache, 16-byte aligned rows) the copies are cp.async and complete at the caller's
// __pipeline_wait_prior; otherwise they are plain loads and stores.
template <bool ASYNC, typename KT>
__device__ void load_key_tile(const Params& p, const int* bt_row, int kv_head, int pos0, int end,
                              KT* dst_base, int ldk) {
  const int d = p.head_size;
  const KT* kc = static_cast<const KT*>(p.key_cache);
  if (ASYNC || p.vec_keys) {
    constexpr int kVec = 16 / sizeof(KT);
    const int vecs = d / kVec;
    const KT* head_base = kc + kv_head * p.k_sh;
    for (int idx = threadIdx.x; idx < kKeys * vecs; idx += kThreads) {
      const int key = div_pow2(idx, p.vec_shift, vecs), part = mod_pow2(idx, p.vec_shift, vecs);
      const int pos = pos0 + key;
      KT* dst = dst_base + key * ldk + part * kVec;
      const KT* src = nullptr;
      if (pos < end) {
        const int64_t blk = bt_row[div_pow2(pos, p.block_shift, p.block_size)];
        src = head_base + blk * p.k_sb + mod_pow2(pos, p.block_shift, p.block_size) * p.k_ss +
              part * kVec;
      }
      if constexpr (ASYNC) {
        if (src != nullptr) {
          __pipeline_memcpy_async(dst, src, 16);
        } else {
          *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        }
      } else {
        union {
          uint4 u;
          KT v[kVec];
        } pack;
        pack.u = src != nullptr ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int e = 0; e < kVec; ++e) dst[e] = pack.v[e];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kKeys * d; idx += kThreads) {
      const int key = idx / d, e = idx % d;
      const int pos = pos0 + key;
      KT v = from_float<KT>(0.f);
      if (pos < end) {
        const int64_t blk = bt_row[pos / p.block_size];
        v = kc[blk * p.k_sb + (pos % p.block_size) * p.k_ss + kv_head * p.k_sh + e * p.k_sd];
      }
      dst_base[key * ldk + e] = v;
    }
  }
}

// s_s[row][key] = q_s[row] . k_s[key] (unscaled, fp32) for rows < round_up(rows, 16).
template <typename QT, typename KT, int STAGES>
__device__ void tile_scores(const Params& p, int rows, const TileSmem<QT, KT, STAGES>& sm,
                            const KT* k_s) {
  const int d = p.head_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (kMmaTypes<QT, KT>) {
    if (p.use_mma) {
      using namespace nvcuda;
      constexpr int kColTiles = kKeys / 16;
      const int sub_tiles = (rows + 15) / 16 * kColTiles;
      for (int t = warp; t < sub_tiles; t += kWarps) {
        const int rt = t / kColTiles, ct = t % kColTiles;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int kk = 0; kk < d; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, QT, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, KT, wmma::col_major> b;
          wmma::load_matrix_sync(a, sm.q + rt * 16 * sm.ldq + kk, sm.ldq);
          wmma::load_matrix_sync(b, k_s + ct * 16 * sm.ldk + kk, sm.ldk);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(sm.s + rt * 16 * kScoreLd + ct * 16, acc, kScoreLd,
                                wmma::mem_row_major);
      }
      return;
    }
  }
  // CUDA cores: rows warp + 8j, keys lane and lane + 32.
  float acc[kRowsPerWarp][2];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) acc[j][0] = acc[j][1] = 0.f;
  const KT* k0 = k_s + lane * sm.ldk;
  const KT* k1 = k_s + (lane + 32) * sm.ldk;
  for (int e = 0; e < d; ++e) {
    const float kv0 = to_float(k0[e]), kv1 = to_float(k1[e]);
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int row = warp + kWarps * j;
      if (row < rows) {
        const float qv = to_float(sm.q[row * sm.ldq + e]);
        acc[j][0] = fmaf(qv, kv0, acc[j][0]);
        acc[j][1] = fmaf(qv, kv1, acc[j][1]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int row = warp + kWarps * j;
    if (row < rows) {
      sm.s[row * kScoreLd + lane] = acc[j][0];
      sm.s[row * kScoreLd + lane + 32] = acc[j][1];
    }
  }
}

// Runs fn(pos0) for every kKeys-wide key step of [start, end) once the step's scores are in
// sm.s. With cp.async, STAGES - 1 key tiles are in flight while a step computes.
template <typename QT, typename KT, int STAGES, typename Fn>
__device__ void for_each_score_tile(const Params& p, const int* bt_row, int kv_head, int rows,
                                    int start, int end, const TileSmem<QT, KT, STAGES>& sm,
                                    Fn&& fn) {
  constexpr bool kAsyncType = sizeof(KT) == 2;
  const bool async = kAsyncType && p.vec_keys;
  if constexpr (kAsyncType) {
    if (async) {
#pragma unroll
      for (int st = 0; st < STAGES - 1; ++st) {
        const int pos = start + st * kKeys;
        if (pos < end) load_key_tile<true>(p, bt_row, kv_head, pos, end, sm.k[st], sm.ldk);
        __pipeline_commit();  // one group per stage, empty or not
      }
    }
  }
  for (int pos0 = start, step = 0; pos0 < end; pos0 += kKeys, ++step) {
    KT* k_s = sm.k[step % STAGES];
    if constexpr (kAsyncType) {
      if (async) {
        // That ring slot was last read before the previous step's post-score barrier.
        const int ahead = pos0 + (STAGES - 1) * kKeys;
        if (ahead < end) {
          load_key_tile<true>(p, bt_row, kv_head, ahead, end, sm.k[(step + STAGES - 1) % STAGES],
                              sm.ldk);
        }
        __pipeline_commit();
        __pipeline_wait_prior(STAGES - 1);
      }
    }
    if (!async) load_key_tile<false>(p, bt_row, kv_head, pos0, end, k_s, sm.ldk);
    __syncthreads();
    tile_scores(p, rows, sm, k_s);
    __syncthreads();
    fn(pos0);
  }
}

// Pipeline depth: the one-row pass is pure streaming (small tiles, deep ring); the window
// passes keep a bigger query/score tile resident, so two stages keep three blocks per SM.
constexpr int kStagesLastRow = 3;
constexpr int kStagesWindow = 2;

// J: row slots per warp (rows warp + 8j, j < J); J = 1 serves tiles of at most 8 rows (one
// window row and a GQA group of <= 8) with a fraction of the registers.
template <typename KT, typename QT, bool LAST_ROW, int J>
__global__ void __launch_bounds__(kThreads, 3) stats_kernel(const Params p) {
  static_assert(J >= 1 && J <= kRowsPerWarp, "row slots per warp");
  constexpr int STAGES = LAST_ROW ? kStagesLastRow : kStagesWindow;
  const int chunk = blockIdx.x, kv_head = blockIdx.y, req = blockIdx.z;
  const int n = p.prompt_lens[req];
  const int start = chunk * p.chunk;
  if (start >= n) return;
  const int end = min(start + p.chunk, n);
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_total = p.num_q_heads * p.w_max;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w_eff = window_eff(p, req, n);
  const Tile t = make_tile(group, w_eff, false);
  const int* bt_row = p.block_tables + req * p.bt_stride;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TileSmem<QT, KT, STAGES> sm(smem_raw, p.q_rows, p.head_size);

  for (int tile = 0; tile < t.num_tiles; ++tile) {
    const int h0 = tile * t.heads_per_tile;
    const int rows = min(t.heads_per_tile, group - h0) * w_eff;
    __syncthreads();
    load_query_tile(p, req, kv_head, h0, rows, w_eff, sm);
    // Per row of this thread: causal limit and query head; lane-local online statistics,
    // combined across lanes once per chunk.
    int last[J], head[J];
    float m[J], l[J], l2[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int row = warp + kWarps * j;
      last[j] = n - w_eff + row % w_eff;
      head[j] = kv_head * group + h0 + row / w_eff;
      m[j] = kNegBig, l[j] = 0.f, l2[j] = 0.f;
    }
    for_each_score_tile(p, bt_row, kv_head, rows, start, end, sm, [&](int pos0) {
      const int pos_a = pos0 + lane, pos_b = pos0 + lane + 32;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int row = warp + kWarps * j;
        if (row >= rows) continue;
        const int lim = min(end - 1, last[j]);
        const bool ok_a = pos_a <= lim, ok_b = pos_b <= lim;
        if (!ok_a) continue;  // pos_b > pos_a
        const float s_a = sm.s[row * kScoreLd + lane] * p.qk_scale;
        const float s_b = ok_b ? sm.s[row * kScoreLd + lane + 32] * p.qk_scale : kNegBig;
        const float m_new = fmaxf(m[j], fmaxf(s_a, s_b));
        const float alpha = exp2f(m[j] - m_new);
        const float e_a = exp2f(s_a - m_new);
        const float e_b = ok_b ? exp2f(s_b - m_new) : 0.f;
        l[j] = l[j] * alpha + e_a + e_b;
        if (LAST_ROW) {
          const float sq = (pos_a >= p.num_sink_tokens ? e_a * e_a : 0.f) +
                           (pos_b >= p.num_sink_tokens ? e_b * e_b : 0.f);
          l2[j] = l2[j] * alpha * alpha + sq;
          float* out = p.vals + (static_cast<int64_t>(req) * p.num_q_heads + head[j]) * p.n_scratch;
          out[pos_a] = s_a;
          if (ok_b) out[pos_b] = s_b;
        }
        m[j] = m_new;
      }
    });
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int row = warp + kWarps * j;
      if (row >= rows) continue;  // warp-uniform
      const float mx = warp_max(m[j]);
      const float sc = exp2f(m[j] - mx);
      const float sum = warp_sum(l[j] * sc);
      const float sum2 = LAST_ROW ? warp_sum(l2[j] * sc * sc) : 0.f;
      if (lane == 0) {
        const int64_t off = (static_cast<int64_t>(req) * p.num_chunks + chunk) * rows_total +
                            head[j] * p.w_max + row % w_eff;
        p.row_max[off] = mx;
        p.row_sum[off] = sum;
        if (LAST_ROW) {
          p.row_sum2[(static_cast<int64_t>(req) * p.num_chunks + chunk) * p.num_q_heads +
                     head[j]] = sum2;
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) combine_kernel(const Params p) {
  const int req = blockIdx.x;
  const int rows_total = p.num_q_heads * p.w_max;
  const int row = blockIdx.y * kThreads + threadIdx.x;
  if (row >= rows_total) return;
  const int n = p.prompt_lens[req];
  if (row % p.w_max >= window_eff(p, req, n)) return;  // row never written
  const int nc = (n + p.chunk - 1) / p.chunk;
  float m = kNegBig, l = 0.f;
  for (int c = 0; c < nc; ++c) {
    const int64_t off = (static_cast<int64_t>(req) * p.num_chunks + c) * rows_total + row;
    const float mc = p.row_max[off], lc = p.row_sum[off];
    const float m_new = fmaxf(m, mc);
    l = l * exp2f(m - m_new) + lc * exp2f(mc - m_new);
    m = m_new;
  }
  p.lse[static_cast<int64_t>(req) * rows_total + row] = m + log2f(fmaxf(l, 1e-30f));
}

// (window > 1, normalisers handed in) the attention's natural-log normaliser of each window row
// -> lse in log2 units, as combine_kernel would have written it: the first pass is skipped.
__global__ void __launch_bounds__(kThreads) given_lse_kernel(const Params p) {
  const int req = blockIdx.x;
  const int rows_total = p.num_q_heads * p.w_max;
  const int row = blockIdx.y * kThreads + threadIdx.x;
  if (row >= rows_total) return;
  const int w_eff = window_eff(p, req, p.prompt_lens[req]);
  const int head = row / p.w_max, i = row % p.w_max;
  if (i >= w_eff) return;  // row never read
  // Window row i of the request is query slot w_max - w_eff + i (right-aligned).
  const float lse = p.given_lse[req * p.g_sr + (p.w_max - w_eff + i) * p.g_sw + head * p.g_sh];
  p.lse[static_cast<int64_t>(req) * rows_total + row] = lse * kLog2e;
}

template <typename KT, typename QT>
__global__ void __launch_bounds__(kThreads, 3) window_probs_kernel(const Params p) {
  const int chunk = blockIdx.x, kv_head = blockIdx.y, req = blockIdx.z;
  const int n = p.prompt_lens[req];
  const int start = chunk * p.chunk;
  if (start >= n) return;
  const int end = min(start + p.chunk, n);
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows_total = p.num_q_heads * p.w_max;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w_eff = window_eff(p, req, n);
  const float inv_w = 1.f / static_cast<float>(w_eff);
  const Tile t = make_tile(group, w_eff, true);
  const int* bt_row = p.block_tables + req * p.bt_stride;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TileSmem<QT, KT, kStagesWindow> sm(smem_raw, p.q_rows, p.head_size);

  for (int tile = 0; tile < t.num_tiles; ++tile) {
    const int h0 = tile * t.heads_per_tile;
    const int heads_here = min(t.heads_per_tile, group - h0);
    const int rows = heads_here * w_eff;
    __syncthreads();
    load_query_tile(p, req, kv_head, h0, rows, w_eff, sm);
    float lse[kRowsPerWarp];
    int last[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int row = warp + kWarps * j;
      const int head = kv_head * group + h0 + row / w_eff;
      last[j] = min(end - 1, n - w_eff + row % w_eff);
      lse[j] = row < rows
                   ? p.lse[static_cast<int64_t>(req) * rows_total + head * p.w_max + row % w_eff]
                   : 0.f;
    }
    // Aggregation: thread -> (head slot tid / kKeys + kSlotsPerPass * k, key tid % kKeys).
    constexpr int kSlotsPerPass = kThreads / kKeys;
    constexpr int kMaxPasses = kWarps / kSlotsPerPass;  // heads_per_tile <= kWarps
    const int key = threadIdx.x % kKeys;
    float csum[kMaxPasses] = {};
    for_each_score_tile(p, bt_row, kv_head, rows, start, end, sm, [&](int pos0) {
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const int row = warp + kWarps * j;
        if (row >= rows) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int col = lane + 32 * half;
          float* sp = sm.s + row * kScoreLd + col;
          *sp = pos0 + col <= last[j] ? exp2f(*sp * p.qk_scale - lse[j]) : 0.f;
        }
      }
      __syncthreads();
      const int pos = pos0 + key;
#pragma unroll
      for (int k = 0; k < kMaxPasses; ++k) {
        const int slot = threadIdx.x / kKeys + kSlotsPerPass * k;
        if (slot >= heads_here || pos >= end) continue;
        float agg = 0.f;
        for (int i = 0; i < w_eff; ++i) {
          const float v = sm.s[(slot * w_eff + i) * kScoreLd + key];
          agg = p.agg_max ? fmaxf(agg, v) : agg + v;
        }
        if (!p.agg_max) agg *= inv_w;
        const float r = pos >= p.num_sink_tokens ? agg * agg : 0.f;
        const int head = kv_head * group + h0 + slot;
        p.vals[(static_cast<int64_t>(req) * p.num_q_heads + head) * p.n_scratch + pos] = r;
        csum[k] += r;
      }
    });
    // Per-head chunk sums: warp sums, then the kKeys / 32 warps of a slot in fixed order.
    __syncthreads();
    float* red = sm.s;  // [kThreads / 32] partial sums
#pragma unroll
    for (int k = 0; k < kMaxPasses; ++k) {
      const float v = warp_sum(csum[k]);
      if (lane == 0) red[k * kWarps + warp] = v;
    }
    __syncthreads();
    constexpr int kWarpsPerSlot = kKeys / 32;
    for (int slot = threadIdx.x; slot < heads_here; slot += kThreads) {
      const int k = slot / kSlotsPerPass, first = (slot % kSlotsPerPass) * kWarpsPerSlot;
      float total = 0.f;
      for (int w = 0; w < kWarpsPerSlot; ++w) total += red[k * kWarps + first + w];
      p.chunk_sum[(static_cast<int64_t>(req) * p.num_chunks + chunk) * p.num_q_heads +
                  kv_head * group + h0 + slot] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Cut search. One block per request. A "tile" is [Hq][tw] fp32 in shared memory holding, per
// head, values over tw consecutive columns (chunks or positions); scan_tile turns each row into
// in-tile suffix sums, so tail(col) = carry[h] + tile[h][col].

struct CutSmem {
  float* tile;      // [Hq][tw]
  float* carry;     // [Hq]
  float* lse;       // [Hq]
  float* kept;      // [num_chunks]
  int* best;        // [1]
};

__device__ void scan_tile(float* tile, int hq, int tw) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_lane = tw / 32;
  for (int h = warp; h < hq; h += kWarps) {
    float* row = tile + h * tw + lane * per_lane;
    float run = 0.f;
    for (int e = per_lane - 1; e >= 0; --e) {
      run += row[e];
      row[e] = run;
    }
    // Inclusive suffix over lanes of the lane totals, then shift by one lane (exclusive).
    float incl = run;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const float y = __shfl_down_sync(0xffffffffu, incl, off);
      if (lane + off < 32) incl += y;
    }
    float excl = __shfl_down_sync(0xffffffffu, incl, 1);
    if (lane == 31) excl = 0.f;
    for (int e = 0; e < per_lane; ++e) row[e] += excl;
  }
}

// kept(col) = mean_h sqrt(carry[h] + tile[h][col]).
__device__ __forceinline__ float kept_norm(const CutSmem& s, int hq, int tw, int col) {
  float sum = 0.f;
  for (int h = 0; h < hq; ++h) sum += sqrtf(s.carry[h] + s.tile[h * tw + col]);
  return sum * (1.f / static_cast<float>(hq));
}

__device__ __forceinline__ void add_tile_totals(const CutSmem& s, int hq, int tw) {
  __syncthreads();
  for (int h = threadIdx.x; h < hq; h += kThreads) s.carry[h] += s.tile[h * tw];
  __syncthreads();
}

__device__ __forceinline__ float chunk_value(const Params& p, const CutSmem& s, int req, int h,
                                             int c, bool last_row) {
  const int64_t off = (static_cast<int64_t>(req) * p.num_chunks + c) * p.num_q_heads + h;
  if (last_row) return exp2f(2.f * (p.row_max[off] - s.lse[h])) * p.row_sum2[off];
  return p.chunk_sum[off];
}

__device__ __forceinline__ float position_value(const Params& p, const CutSmem& s, int req, int h,
                                                int pos, bool last_row) {
  const float v = p.vals[(static_cast<int64_t>(req) * p.num_q_heads + h) * p.n_scratch + pos];
  if (!last_row) return v;
  return pos >= p.num_sink_tokens ? exp2f(2.f * (v - s.lse[h])) : 0.f;
}

// Fills the tile with per-position r over [lo, hi) (columns past hi - lo are 0), scans it.
__device__ void fill_positions(const Params& p, const CutSmem& s, int req, int hq, int tw,
                               int lo, int hi, bool last_row) {
  __syncthreads();
  for (int idx = threadIdx.x; idx < hq * tw; idx += kThreads) {
    const int h = idx / tw, col = idx % tw, pos = lo + col;
    s.tile[idx] = pos < hi ? position_value(p, s, req, h, pos, last_row) : 0.f;
  }
  __syncthreads();
  scan_tile(s.tile, hq, tw);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) cut_kernel(const Params p, int tw, bool last_row) {
  const int req = blockIdx.x;
  const int n = p.prompt_lens[req];
  const int m = p.num_sink_tokens;
  const int hq = p.num_q_heads;
  const float thr = p.thresholds[req];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n <= m) {
    if (threadIdx.x == 0) p.cuts[req] = m;
    return;
  }
  const int nc = (n + p.chunk - 1) / p.chunk;
  extern __shared__ float smem[];
  CutSmem s;
  s.tile = smem;
  s.carry = s.tile + hq * tw;
  s.lse = s.carry + hq;
  s.kept = s.lse + hq;
  s.best = reinterpret_cast<int*>(s.kept + p.num_chunks);

  // Log-sum-exp of each head's row (last-row mode): warp per head, lanes over chunks.
  if (last_row) {
    for (int h = warp; h < hq; h += kWarps) {
      float mr = kNegBig, lr = 0.f;
      for (int c = lane; c < nc; c += 32) {
        const int64_t off = (static_cast<int64_t>(req) * p.num_chunks + c) * hq + h;
        const float mc = p.row_max[off], lc = p.row_sum[off];
        const float m_new = fmaxf(mr, mc);
        lr = lr * exp2f(mr - m_new) + lc * exp2f(mc - m_new);
        mr = m_new;
      }
      const float mx = warp_max(mr);
      const float l = warp_sum(lr * exp2f(mr - mx));
      if (lane == 0) s.lse[h] = mx + log2f(fmaxf(l, 1e-30f));
    }
  }
  for (int h = threadIdx.x; h < hq; h += kThreads) s.carry[h] = 0.f;
  __syncthreads();

  // Coarse: kept norm at every chunk boundary, scanning chunks backwards.
  for (int tile_end = nc; tile_end > 0; tile_end -= tw) {
    const int t0 = max(0, tile_end - tw);
    __syncthreads();
    for (int idx = threadIdx.x; idx < hq * tw; idx += kThreads) {
      const int h = idx / tw, c = t0 + idx % tw;
      s.tile[idx] = c < tile_end ? chunk_value(p, s, req, h, c, last_row) : 0.f;
    }
    __syncthreads();
    scan_tile(s.tile, hq, tw);
    __syncthreads();
    for (int col = threadIdx.x; col < tile_end - t0; col += kThreads) {
      s.kept[t0 + col] = kept_norm(s, hq, tw, col);
    }
    add_tile_totals(s, hq, tw);
  }
  const float base = s.kept[0];
  const float limit = thr * base;
  int best_chunk = 0;
  for (int c = threadIdx.x; c < nc; c += kThreads) {
    if (base - s.kept[c] <= limit) best_chunk = max(best_chunk, c);
  }
  best_chunk = warp_max_int(best_chunk);
  if (threadIdx.x == 0) *s.best = 0;
  __syncthreads();
  if (lane == 0) atomicMax(s.best, best_chunk);  // max is order-independent
  __syncthreads();
  best_chunk = *s.best;

  // Mass after the crossing chunk, per head.
  for (int h = warp; h < hq; h += kWarps) {
    float acc = 0.f;
    for (int c = best_chunk + 1 + lane; c < nc; c += 32) acc += chunk_value(p, s, req, h, c, last_row);
    acc = warp_sum(acc);
    if (lane == 0) s.carry[h] = acc;
  }
  __syncthreads();

  // Fine: exact position inside the crossing chunk, scanning backwards.
  const int chunk_lo = best_chunk * p.chunk;
  const int lo = max(chunk_lo, m);
  const int hi = min(chunk_lo + p.chunk, n);
  int best = lo;
  for (int tile_end = hi; tile_end > lo; tile_end -= tw) {
    const int t0 = max(lo, tile_end - tw);
    fill_positions(p, s, req, hq, tw, t0, tile_end, last_row);
    for (int col = threadIdx.x; col < tile_end - t0; col += kThreads) {
      if (base - kept_norm(s, hq, tw, col) <= limit) best = max(best, t0 + col);
    }
    add_tile_totals(s, hq, tw);
  }
  best = warp_max_int(best);
  if (threadIdx.x == 0) *s.best = 0;
  __syncthreads();
  if (lane == 0) atomicMax(s.best, best);
  __syncthreads();
  if (threadIdx.x == 0) p.cuts[req] = (n > m + 1 && thr > 0.f) ? *s.best : m;

  if (p.curve != nullptr) {
    __syncthreads();
    for (int h = threadIdx.x; h < hq; h += kThreads) s.carry[h] = 0.f;
    for (int tile_end = n; tile_end > m; tile_end -= tw) {
      const int t0 = max(m, tile_end - tw);
      fill_positions(p, s, req, hq, tw, t0, tile_end, last_row);
      for (int col = threadIdx.x; col < tile_end - t0; col += kThreads) {
        const float kept = kept_norm(s, hq, tw, col);
        p.curve[req * p.curve_stride + (t0 + col - m)] = base > 0.f ? (base - kept) / base : 0.f;
      }
      add_tile_totals(s, hq, tw);
    }
  }
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const Params& p) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename KT, typename QT>
void run_scoring(const Params& p, int num_reqs, cudaStream_t stream) {
  const dim3 grid(p.num_chunks, p.num_kv_heads, num_reqs);
  if (p.w_max == 1) {
    const size_t smem = TileSmem<QT, KT, kStagesLastRow>::bytes(p.q_rows, p.head_size);
    if (p.num_q_heads / p.num_kv_heads <= kWarps) {
      launch(stats_kernel<KT, QT, true, 1>, grid, smem, stream, p);
    } else {
      launch(stats_kernel<KT, QT, true, kRowsPerWarp>, grid, smem, stream, p);
    }
    return;
  }
  const size_t smem = TileSmem<QT, KT, kStagesWindow>::bytes(p.q_rows, p.head_size);
  const int rows_total = p.num_q_heads * p.w_max;
  const dim3 row_grid(num_reqs, (rows_total + kThreads - 1) / kThreads);
  if (p.given_lse != nullptr) {
    given_lse_kernel<<<row_grid, kThreads, 0, stream>>>(p);
  } else {
    launch(stats_kernel<KT, QT, false, kRowsPerWarp>, grid, smem, stream, p);
    combine_kernel<<<row_grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch(window_probs_kernel<KT, QT>, grid, smem, stream, p);
}

}  // namespace
}  // namespace refreekv

void compute_cuts(const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& block_tables, const at::Tensor& prompt_lens,
                  const at::Tensor& window_lens, const at::Tensor& thresholds, at::Tensor& cuts,
                  at::Tensor& workspace, const std::optional<at::Tensor>& curve,
                  const std::optional<at::Tensor>& window_lse, int64_t num_sink_tokens,
                  double scale, bool agg_max, int64_t chunk_size, int64_t max_prompt_len,
                  c10::IntArrayRef workspace_offsets) {
  using namespace refreekv;
  TORCH_CHECK(query.dim() == 4, "query must be [R, W_MAX, Hq, D]");
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [num_blocks, block_size, Hkv, D]");
  const int64_t R = query.size(0), w_max = query.size(1), hq = query.size(2), d = query.size(3);
  const int64_t block_size = key_cache.size(1), hkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == d, "head_size mismatch between query and key_cache");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "num_q_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(hq <= 256, "at most 256 query heads");
  TORCH_CHECK(w_max >= 1 && w_max <= kMaxRows, "window rows (query.size(1)) must be in [1, 64]");
  TORCH_CHECK(d >= 1 && d <= 256, "head_size must be <= 256");
  TORCH_CHECK(chunk_size >= kKeys && (chunk_size & (chunk_size - 1)) == 0,
              "chunk_size must be a power of two >= 64");
  TORCH_CHECK(max_prompt_len >= 1, "max_prompt_len must be positive");
  const auto kdt = key_cache.scalar_type();
  TORCH_CHECK(kdt == at::kBFloat16 || kdt == at::kHalf || kdt == at::kFloat,
              "key_cache must be bf16, fp16 or fp32");
  TORCH_CHECK(query.scalar_type() == kdt || query.scalar_type() == at::kFloat,
              "query must have key_cache's dtype or be fp32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == R &&
                  block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "block_tables must be [R, max_blocks] int32 with unit inner stride");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&prompt_lens, &window_lens, &cuts}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == R && t->scalar_type() == at::kInt &&
                    t->is_contiguous(),
                "prompt_lens, window_lens and cuts must be contiguous int32 [R]");
  }
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == R &&
                  thresholds.scalar_type() == at::kFloat && thresholds.is_contiguous(),
              "thresholds must be contiguous fp32 [R]");
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous(),
              "workspace must be contiguous fp32");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key_cache, &block_tables, &prompt_lens, &window_lens, &thresholds,
                              &cuts, &workspace}) {
    TORCH_CHECK(t->device() == query.device(), "all tensors must be on the query's device");
  }
  TORCH_CHECK(query.is_cuda(), "compute_cuts runs on CUDA tensors");

  // The scratch layout is defined once, in refreekv_vllm/ops/workspace.py (the Triton kernels
  // follow it too): offsets of vals, row_max, row_sum, row_sum2, lse, chunk_sum, then the end.
  TORCH_CHECK(workspace_offsets.size() == 7,
              "workspace_offsets must hold the 6 section starts and the total");
  for (size_t i = 0; i + 1 < workspace_offsets.size(); ++i) {
    TORCH_CHECK(workspace_offsets[i] >= 0 && workspace_offsets[i] <= workspace_offsets[i + 1],
                "workspace_offsets must be ascending from 0");
  }
  enum Section { kVals, kRowMax, kRowSum, kRowSum2, kLse, kChunkSum, kTotal };
  // Literal messages only: this check's formatted message (numbers streamed into it) ended
  // the process with a segmentation fault on the H100 instead of raising.
  TORCH_CHECK(workspace.numel() >= workspace_offsets[kTotal],
              "workspace too small for the total in workspace_offsets");
  const int64_t num_chunks = std::max<int64_t>(1, (max_prompt_len + chunk_size - 1) / chunk_size);
  const int64_t n_scratch = num_chunks * chunk_size;
  const bool last_row = w_max == 1;
  // The sections this launch writes must have the sizes the kernels index.
  const int64_t rows = hq * w_max;
  TORCH_CHECK(workspace_offsets[kRowMax] - workspace_offsets[kVals] >= R * hq * n_scratch &&
                  workspace_offsets[kRowSum] - workspace_offsets[kRowMax] >= R * num_chunks * rows &&
                  workspace_offsets[kRowSum2] - workspace_offsets[kRowSum] >= R * num_chunks * rows,
              "workspace_offsets do not fit these shapes");
  TORCH_CHECK(last_row ? workspace_offsets[kLse] - workspace_offsets[kRowSum2] >= R * num_chunks * hq
                       : workspace_offsets[kChunkSum] - workspace_offsets[kLse] >= R * rows &&
                             workspace_offsets[kTotal] - workspace_offsets[kChunkSum] >=
                                 R * num_chunks * hq,
              "workspace_offsets do not fit these shapes");
  TORCH_CHECK(num_chunks <= 8192, "max_prompt_len / chunk_size must be <= 8192");
  if (curve.has_value()) {
    const at::Tensor& c = *curve;
    TORCH_CHECK(c.dim() == 2 && c.size(0) == R && c.scalar_type() == at::kFloat &&
                    c.stride(1) == 1 && c.device() == query.device(),
                "curve must be fp32 [R, L] with unit inner stride");
    TORCH_CHECK(c.size(1) >= max_prompt_len - num_sink_tokens, "curve too short");
  }
  if (window_lse.has_value()) {
    const at::Tensor& g = *window_lse;
    TORCH_CHECK(g.dim() == 3 && g.size(0) == R && g.size(1) == w_max && g.size(2) == hq &&
                    g.scalar_type() == at::kFloat && g.device() == query.device(),
                "window_lse must be fp32 [R, W_MAX, Hq] on the query's device");
  }
  if (R == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(query.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Params p{};
  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.prompt_lens = prompt_lens.data_ptr<int>();
  p.window_lens = window_lens.data_ptr<int>();
  p.thresholds = thresholds.data_ptr<float>();
  p.cuts = cuts.data_ptr<int>();
  p.curve = curve.has_value() ? curve->data_ptr<float>() : nullptr;
  // One row has no normaliser to find (the last-row pass needs none): ignored there.
  if (window_lse.has_value() && !last_row) {
    p.given_lse = window_lse->data_ptr<float>();
    p.g_sr = window_lse->stride(0);
    p.g_sw = window_lse->stride(1);
    p.g_sh = window_lse->stride(2);
  }
  float* ws = workspace.data_ptr<float>();
  p.vals = ws + workspace_offsets[kVals];
  p.row_max = ws + workspace_offsets[kRowMax];
  p.row_sum = ws + workspace_offsets[kRowSum];
  if (last_row) {
    p.row_sum2 = ws + workspace_offsets[kRowSum2];
  } else {
    p.lse = ws + workspace_offsets[kLse];
    p.chunk_sum = ws + workspace_offsets[kChunkSum];
  }
  p.q_sr = query.stride(0);
  p.q_sw = query.stride(1);
  p.q_sh = query.stride(2);
  p.q_sd = query.stride(3);
  p.k_sb = key_cache.stride(0);
  p.k_ss = key_cache.stride(1);
  p.k_sh = key_cache.stride(2);
  p.k_sd = key_cache.stride(3);
  p.bt_stride = block_tables.stride(0);
  p.curve_stride = curve.has_value() ? curve->stride(0) : 0;
  p.n_scratch = n_scratch;
  p.num_q_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_size = static_cast<int>(d);
  p.block_size = static_cast<int>(block_size);
  p.w_max = static_cast<int>(w_max);
  p.num_sink_tokens = static_cast<int>(num_sink_tokens);
  p.chunk = static_cast<int>(chunk_size);
  p.num_chunks = static_cast<int>(num_chunks);
  // A tile holds at most min(kMaxRows, group * w_eff) rows (w_eff <= w_max), padded to 16.
  p.q_rows = static_cast<int>((std::min<int64_t>(kMaxRows, (hq / hkv) * w_max) + 15) / 16 * 16);
  p.use_mma = d % 16 == 0;
  const auto log2_exact = [](int64_t v) {
    int shift = 0;
    while ((int64_t{1} << shift) < v) ++shift;
    return (int64_t{1} << shift) == v ? shift : -1;
  };
  p.block_shift = log2_exact(block_size);
  p.vec_shift = log2_exact(d / (16 / key_cache.element_size()));
  p.qk_scale = static_cast<float>(scale) * kLog2e;
  p.agg_max = agg_max;
  const int64_t vec = 16 / key_cache.element_size();
  p.vec_keys = key_cache.stride(3) == 1 && d % vec == 0 &&
               reinterpret_cast<uintptr_t>(key_cache.data_ptr()) % 16 == 0 &&
               key_cache.stride(0) % vec == 0 && key_cache.stride(1) % vec == 0 &&
               key_cache.stride(2) % vec == 0;

  const bool q_f32 = query.scalar_type() == at::kFloat;
  if (kdt == at::kBFloat16) {
    if (q_f32) run_scoring<__nv_bfloat16, float>(p, R, stream);
    else run_scoring<__nv_bfloat16, __nv_bfloat16>(p, R, stream);
  } else if (kdt == at::kHalf) {
    if (q_f32) run_scoring<__half, float>(p, R, stream);
    else run_scoring<__half, __half>(p, R, stream);
  } else {
    run_scoring<float, float>(p, R, stream);
  }

  int hq_pow2 = 1;
  while (hq_pow2 < hq) hq_pow2 <<= 1;
  const int tw = std::max(32, std::min(256, 8192 / hq_pow2));
  const size_t cut_smem = (static_cast<size_t>(hq) * tw + 2 * hq + num_chunks) * sizeof(float) +
                          sizeof(int);
  if (cut_smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(cut_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(cut_smem)));
  }
  cut_kernel<<<R, kThreads, cut_smem, stream>>>(p, tw, last_row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
