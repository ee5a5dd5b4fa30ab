// Fused feature concatenation, CPU face: x = features[m][b, l] + pos[m][l] + type[m] (float32
// accumulation), LayerNorm over D, dropout, written straight into its row of the concatenated
// output. One read of every input row and one write of the output row; rows run in parallel
// (torch's thread pool).
//
// Backward: the work is split into blocks of kPosBlock consecutive positions of one modality, each
// block handling every batch row of its positions (sample by sample). A block owns its
// position-gradient rows (summed over the batch in a fixed order) and writes one partial sum each
// for the LayerNorm weight, bias and its modality's type embedding; a second stage sums the
// partials over blocks in block order.
// So the result does not depend on the thread count and no atomics are needed.
//
// Dropout keep mask: element with flat output index i is kept iff
//   fmix32(fmix32(lo32(i) ^ lo32(seed)) ^ hi32(i) ^ hi32(seed)) >> 8 >= round(p * 2^24)
// (murmur3's finaliser; the same hash runs in the Triton and CUDA faces and in
// mmfast.ops.concat_embed.dropout_keep_mask). The backward regenerates it from the seed.
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "concat_embed.h"
#include "isa.h"

namespace mmfast {
namespace {

constexpr int64_t kMaxModalities = kConcatEmbedMaxModalities;
constexpr int64_t kPosBlock = 8;  // positions per backward block

MMFAST_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Keep mask of n consecutive flat indices starting at base, as acc_t multipliers (scale or 0).
// Written as plain loops over 32-bit lanes so the compiler vectorises the hash.
template <typename acc_t>
MMFAST_INLINE void dropout_row(uint64_t base, int64_t n, uint32_t k0, uint32_t k1, uint32_t thresh, acc_t scale,
                        uint32_t* hbuf, acc_t* x) {
  const uint32_t lo0 = static_cast<uint32_t>(base), hi0 = static_cast<uint32_t>(base >> 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t lo = lo0 + static_cast<uint32_t>(j);  // wraps exactly like the 64-bit index
    const uint32_t hi = hi0 + (lo < lo0 ? 1u : 0u);
    hbuf[j] = fmix32(fmix32(lo ^ k0) ^ hi ^ k1);
  }
  for (int64_t j = 0; j < n; ++j) x[j] = (hbuf[j] >> 8) >= thresh ? x[j] * scale : acc_t(0);
}

inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * 16777216.0 + 0.5);
  return t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t);
}

// Row sums in four vector accumulators (independent adds, and more accurate than one running sum),
// reduced by halving in registers; float32 rows sum in float32 lanes, the total in double.
template <typename acc_t>
MMFAST_INLINE double lane_sum(const acc_t* x, int64_t n) {
  constexpr int64_t W = Vec<acc_t>::n;
  V<acc_t> a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    a0 += vload(x + j);
    a1 += vload(x + j + W);
    a2 += vload(x + j + 2 * W);
    a3 += vload(x + j + 3 * W);
  }
  for (; j + W <= n; j += W) a0 += vload(x + j);
  double s = vsum<acc_t>((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) s += x[j];
  return s;
}

template <typename acc_t>
MMFAST_INLINE double lane_dot(const acc_t* x, const acc_t* y, int64_t n) {
  constexpr int64_t W = Vec<acc_t>::n;
  V<acc_t> a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    a0 += vload(x + j) * vload(y + j);
    a1 += vload(x + j + W) * vload(y + j + W);
    a2 += vload(x + j + 2 * W) * vload(y + j + 2 * W);
    a3 += vload(x + j + 3 * W) * vload(y + j + 3 * W);
  }
  for (; j + W <= n; j += W) a0 += vload(x + j) * vload(y + j);
  double s = vsum<acc_t>((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) s += static_cast<double>(x[j]) * y[j];
  return s;
}

// x[j] -= mean for the row; returns the sum of the centred squares (the two-pass variance, without
// a third pass over the row).
template <typename acc_t>
MMFAST_INLINE double center_and_square(acc_t* x, acc_t mean, int64_t n) {
  constexpr int64_t W = Vec<acc_t>::n;
  const V<acc_t> m = vsplat(mean);
  V<acc_t> a[4] = {};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W)
    for (int k = 0; k < 4; ++k) {
      const V<acc_t> v = vload(x + j + k * W) - m;
      vstore(x + j + k * W, v);
      a[k] += v * v;
    }
  for (; j + W <= n; j += W) {
    const V<acc_t> v = vload(x + j) - m;
    vstore(x + j, v);
    a[0] += v * v;
  }
  double s = vsum<acc_t>((a[0] + a[1]) + (a[2] + a[3]));
  for (; j < n; ++j) {
    x[j] -= mean;
    s += static_cast<double>(x[j]) * x[j];
  }
  return s;
}

// Everything a row needs, resolved once per call.
template <typename acc_t>
struct Plan {
  int64_t M = 0, B = 0, D = 0, Ltot = 0;
  int64_t L[kMaxModalities] = {}, off[kMaxModalities + 1] = {};
  const acc_t* pos[kMaxModalities] = {};  // row 0 of modality m's table, or nullptr
  int64_t pos_k[kMaxModalities] = {};     // index into pos_tables, or -1
  const acc_t* type = nullptr;
  const acc_t* w = nullptr;
  const acc_t* bias = nullptr;
  bool dropout = false;
  uint32_t k0 = 0, k1 = 0, thresh = 0;
  acc_t scale = 1;
};

// Resolves the arguments (checked by check_concat_embed_inputs) into what a row needs.
template <typename acc_t>
Plan<acc_t> make_plan(const std::vector<Tensor>& features, const std::optional<Tensor>& type_emb,
                      const std::vector<Tensor>& pos_tables, const std::vector<int64_t>& pos_index,
                      const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias,
                      double dropout_p, const std::optional<Tensor>& seed) {
  check_concat_embed_inputs(features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, dropout_p, seed,
                            scalar_type_of<acc_t>);
  Plan<acc_t> p;
  p.M = static_cast<int64_t>(features.size());
  p.B = features[0].size(0);
  p.D = features[0].size(2);
  for (int64_t m = 0; m < p.M; ++m) {
    p.L[m] = features[m].size(1);
    p.off[m + 1] = p.off[m] + p.L[m];
    p.pos_k[m] = pos_index[m];
    p.pos[m] = pos_index[m] >= 0 ? pos_tables[pos_index[m]].const_data_ptr<acc_t>() : nullptr;
  }
  p.Ltot = p.off[p.M];
  if (type_emb.has_value()) p.type = type_emb->const_data_ptr<acc_t>();
  if (ln_weight.has_value()) p.w = ln_weight->const_data_ptr<acc_t>();
  if (ln_bias.has_value()) p.bias = ln_bias->const_data_ptr<acc_t>();
  if (dropout_p > 0.0) {
    const uint64_t s = static_cast<uint64_t>(seed->const_data_ptr<int64_t>()[0]);
    p.dropout = true;
    p.k0 = static_cast<uint32_t>(s);
    p.k1 = static_cast<uint32_t>(s >> 32);
    p.thresh = dropout_threshold(dropout_p);
    p.scale = dropout_p < 1.0 ? static_cast<acc_t>(1.0 / (1.0 - dropout_p)) : acc_t(0);
  }
  return p;
}

// x[0..D) = features row + position row + type row, in acc_t, in eager's order of additions.
template <typename scalar_t, typename acc_t>
MMFAST_INLINE void load_row(const Plan<acc_t>& p, const scalar_t* const* feats, int64_t m, int64_t b, int64_t l,
                     acc_t* x) {
  const int64_t D = p.D;
  const scalar_t* f = feats[m] + (b * p.L[m] + l) * D;
  for (int64_t j = 0; j < D; ++j) x[j] = static_cast<acc_t>(f[j]);
  if (p.pos[m]) {
    const acc_t* pe = p.pos[m] + l * D;
    for (int64_t j = 0; j < D; ++j) x[j] += pe[j];
  }
  if (p.type) {
    const acc_t* te = p.type + m * D;
    for (int64_t j = 0; j < D; ++j) x[j] += te[j];
  }
}

// Rows [begin, end) of the forward; x and hbuf are D-long scratch rows.
template <typename scalar_t, typename acc_t>
MMFAST_INLINE void forward_rows(const Plan<acc_t>& p, const scalar_t* const* feats, scalar_t* out, acc_t* mean_out,
                                acc_t* rstd_out, double eps, int64_t begin, int64_t end, acc_t* x, uint32_t* hbuf) {
  const int64_t D = p.D;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.Ltot, t = r % p.Ltot;
    int64_t m = 0;
    while (t >= p.off[m + 1]) ++m;
    load_row<scalar_t, acc_t>(p, feats, m, b, t - p.off[m], x);
    scalar_t* o = out + r * D;
    if (p.w) {
      const acc_t mean = static_cast<acc_t>(lane_sum(x, D) / D);
      // two-pass variance (centred first): no cancellation
      const acc_t var = static_cast<acc_t>(center_and_square(x, mean, D) / D);
      const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(var) + eps));
      mean_out[r] = mean;
      rstd_out[r] = rstd;
      if (!p.dropout) {  // the common case: normalise straight into the output row
        if (p.bias) {
          for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(x[j] * rstd * p.w[j] + p.bias[j]);
        } else {
          for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(x[j] * rstd * p.w[j]);
        }
        continue;
      }
      if (p.bias) {
        for (int64_t j = 0; j < D; ++j) x[j] = x[j] * rstd * p.w[j] + p.bias[j];
      } else {
        for (int64_t j = 0; j < D; ++j) x[j] = x[j] * rstd * p.w[j];
      }
    }
    if (p.dropout)
      dropout_row(static_cast<uint64_t>(r) * static_cast<uint64_t>(D), D, p.k0, p.k1, p.thresh, p.scale, hbuf, x);
    for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(x[j]);
  }
}

#define MMFAST_CONCAT_FORWARD_ROWS(NAME, ATTRS)                                                            \
  template <typename scalar_t, typename acc_t>                                                            \
  ATTRS void NAME(const Plan<acc_t>& p, const scalar_t* const* feats, scalar_t* out, acc_t* mean_out,     \
                  acc_t* rstd_out, double eps, int64_t begin, int64_t end, acc_t* x, uint32_t* hbuf) {    \
    forward_rows<scalar_t, acc_t>(p, feats, out, mean_out, rstd_out, eps, begin, end, x, hbuf);          \
  }
#ifdef MMFAST_HAVE_X86_ISAS
MMFAST_CONCAT_FORWARD_ROWS(forward_rows_avx512, MMFAST_AVX512_ATTRS)
MMFAST_CONCAT_FORWARD_ROWS(forward_rows_avx2, MMFAST_AVX2_ATTRS)
#endif
MMFAST_CONCAT_FORWARD_ROWS(forward_rows_base, MMFAST_BASE_ATTRS)

template <typename scalar_t, typename acc_t>
void forward_kernel(const Plan<acc_t>& p, const scalar_t* const* feats, scalar_t* out, acc_t* mean_out,
                    acc_t* rstd_out, double eps) {
  const Isa isa = cpu_isa();
  parallel_for(0, p.B * p.Ltot, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(p.D);
    std::vector<uint32_t> hbuf(p.dropout ? p.D : 0);
#ifdef MMFAST_HAVE_X86_ISAS
    if (isa == Isa::kAvx512)
      return forward_rows_avx512(p, feats, out, mean_out, rstd_out, eps, begin, end, x.data(), hbuf.data());
    if (isa == Isa::kAvx2)
      return forward_rows_avx2(p, feats, out, mean_out, rstd_out, eps, begin, end, x.data(), hbuf.data());
#endif
    forward_rows_base(p, feats, out, mean_out, rstd_out, eps, begin, end, x.data(), hbuf.data());
  });
}

// Everything the first backward stage reads and writes, resolved by backward_kernel.
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const Plan<acc_t>& p;
  const scalar_t* gout;
  const scalar_t* const* feats;
  const acc_t* mean_in;
  const acc_t* rstd_in;
  scalar_t* const* gfeat;
  acc_t* const* gpos;
  const int64_t* blk_m;   // modality of each block
  const int64_t* blk_l0;  // its first position
  const int64_t* blk_l1;  // one past its last position
  acc_t* partial;         // per block: [weight | bias | type] partial sums, each D wide
  bool want_type;
};

// The gradient g of one input row goes to its feature row, and is added to its position row and
// its block's type partial sum (each when there is one): one pass over g.
template <typename scalar_t, typename acc_t>
MMFAST_INLINE void scatter_row_grad(const acc_t* g, int64_t D, scalar_t* gf, acc_t* dpos, acc_t* pt) {
  if (dpos && pt) {
    for (int64_t j = 0; j < D; ++j) {
      gf[j] = static_cast<scalar_t>(g[j]);
      dpos[j] += g[j];
      pt[j] += g[j];
    }
  } else if (dpos || pt) {
    acc_t* sum = dpos ? dpos : pt;
    for (int64_t j = 0; j < D; ++j) {
      gf[j] = static_cast<scalar_t>(g[j]);
      sum[j] += g[j];
    }
  } else {
    for (int64_t j = 0; j < D; ++j) gf[j] = static_cast<scalar_t>(g[j]);
  }
}

// Blocks [begin, end) of the first backward stage; x, g and hbuf are D-long scratch rows.
template <typename scalar_t, typename acc_t>
MMFAST_INLINE void backward_blocks(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end, acc_t* x,
                                   acc_t* g, uint32_t* hbuf) {
  const Plan<acc_t>& p = a.p;
  const int64_t D = p.D;
  const bool ln = p.w != nullptr;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t m = a.blk_m[k];
    acc_t* pw = a.partial + k * 3 * D;
    acc_t* pb = pw + D;
    acc_t* pt = pb + D;
    const int64_t l0 = a.blk_l0[k], l1 = a.blk_l1[k];
    if (a.gpos[m]) std::fill(a.gpos[m] + l0 * D, a.gpos[m] + l1 * D, acc_t(0));
    // Batch rows outside, positions inside: the block's rows of one sample are consecutive in
    // memory (the hardware prefetcher follows them; a position's rows across the batch are a whole
    // sample apart), and each position row still sums its batch rows in order b = 0, 1, ...
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t l = l0; l < l1; ++l) {
        acc_t* dpos = a.gpos[m] ? a.gpos[m] + l * D : nullptr;
        const int64_t r = b * p.Ltot + p.off[m] + l;
        const scalar_t* go = a.gout + r * D;
        for (int64_t j = 0; j < D; ++j) g[j] = static_cast<acc_t>(go[j]);
        if (p.dropout)
          dropout_row(static_cast<uint64_t>(r) * static_cast<uint64_t>(D), D, p.k0, p.k1, p.thresh, p.scale, hbuf, g);
        if (ln) {
          load_row<scalar_t, acc_t>(p, a.feats, m, b, l, x);
          const acc_t mean = a.mean_in[r], rstd = a.rstd_in[r];
          for (int64_t j = 0; j < D; ++j) {
            x[j] = (x[j] - mean) * rstd;  // x-hat
            pw[j] += g[j] * x[j];
            pb[j] += g[j];
            g[j] *= p.w[j];  // now d(loss)/d(x-hat)
          }
          const acc_t c1 = static_cast<acc_t>(lane_sum(g, D) / D);
          const acc_t c2 = static_cast<acc_t>(lane_dot(g, x, D) / D);
          for (int64_t j = 0; j < D; ++j) g[j] = rstd * (g[j] - c1 - x[j] * c2);  // now d/dx
        }
        scatter_row_grad<scalar_t, acc_t>(g, D, a.gfeat[m] + (b * p.L[m] + l) * D, dpos, a.want_type ? pt : nullptr);
      }
    }
  }
}

#define MMFAST_CONCAT_BACKWARD_BLOCKS(NAME, ATTRS)                                                         \
  template <typename scalar_t, typename acc_t>                                                            \
  ATTRS void NAME(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end, acc_t* x, acc_t* g, \
                  uint32_t* hbuf) {                                                                       \
    backward_blocks<scalar_t, acc_t>(a, begin, end, x, g, hbuf);                                          \
  }
#ifdef MMFAST_HAVE_X86_ISAS
MMFAST_CONCAT_BACKWARD_BLOCKS(backward_blocks_avx512, MMFAST_AVX512_ATTRS)
MMFAST_CONCAT_BACKWARD_BLOCKS(backward_blocks_avx2, MMFAST_AVX2_ATTRS)
#endif
MMFAST_CONCAT_BACKWARD_BLOCKS(backward_blocks_base, MMFAST_BASE_ATTRS)

template <typename scalar_t, typename acc_t>
void backward_kernel(const Plan<acc_t>& p, const scalar_t* gout, const scalar_t* const* feats,
                     const acc_t* mean_in, const acc_t* rstd_in, scalar_t* const* gfeat, acc_t* const* gpos,
                     acc_t* gtype, acc_t* gw, acc_t* gb, int64_t type_rows) {
  const int64_t D = p.D;
  // Blocks: (modality, first position, end position), never straddling modalities.
  std::vector<int64_t> blk_m, blk_l0, blk_l1;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t l = 0; l < p.L[m]; l += kPosBlock) {
      blk_m.push_back(m);
      blk_l0.push_back(l);
      blk_l1.push_back(std::min(p.L[m], l + kPosBlock));
    }
  const int64_t nblk = static_cast<int64_t>(blk_m.size());
  const bool want_type = gtype != nullptr;
  // Per-block partial sums [weight | bias | type], each D wide.
  std::vector<acc_t> partial(static_cast<size_t>(nblk) * 3 * D, acc_t(0));

  const BackwardArgs<scalar_t, acc_t> a{p, gout, feats, mean_in, rstd_in, gfeat, gpos,
                                        blk_m.data(), blk_l0.data(), blk_l1.data(), partial.data(), want_type};
  const Isa isa = cpu_isa();
  parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(D), g(D);
    std::vector<uint32_t> hbuf(p.dropout ? D : 0);
#ifdef MMFAST_HAVE_X86_ISAS
    if (isa == Isa::kAvx512) return backward_blocks_avx512(a, begin, end, x.data(), g.data(), hbuf.data());
    if (isa == Isa::kAvx2) return backward_blocks_avx2(a, begin, end, x.data(), g.data(), hbuf.data());
#endif
    backward_blocks_base(a, begin, end, x.data(), g.data(), hbuf.data());
  });

  // Stage 2: sum the partials over blocks in block order, parallel over columns.
  parallel_for(0, D, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      acc_t sw = 0, sb = 0;
      acc_t st[kMaxModalities] = {};
      for (int64_t k = 0; k < nblk; ++k) {
        const acc_t* pw = partial.data() + k * 3 * D;
        sw += pw[j];
        sb += pw[D + j];
        st[blk_m[k]] += pw[2 * D + j];
      }
      if (gw) gw[j] = sw;
      if (gb) gb[j] = sb;
      if (want_type) {
        for (int64_t m = 0; m < p.M; ++m) gtype[m * D + j] = st[m];
        for (int64_t m = p.M; m < type_rows; ++m) gtype[m * D + j] = 0;  // unused type rows
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> concat_embed_forward_cpu(
    const std::vector<Tensor>& feats, const std::optional<Tensor>& type_emb, const std::vector<Tensor>& pos,
    const std::vector<int64_t>& pos_index, const std::optional<Tensor>& ln_weight,
    const std::optional<Tensor>& ln_bias, double eps, double dropout_p, const std::optional<Tensor>& seed) {
  MMFAST_CHECK_ARG(!feats.empty(), "features", "expected at least one modality");
  Tensor out, mean, rstd;
  dispatch_floating(feats[0].scalar_type(), "features", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Plan<acc_t> p = make_plan<acc_t>(feats, type_emb, pos, pos_index, ln_weight, ln_bias, dropout_p, seed);
    out = empty({p.B, p.Ltot, p.D}, feats[0].scalar_type(), feats[0]);
    const std::vector<int64_t> stats = p.w ? std::vector<int64_t>{p.B, p.Ltot} : std::vector<int64_t>{0};
    mean = empty(stats, scalar_type_of<acc_t>, feats[0]);
    rstd = empty(stats, scalar_type_of<acc_t>, feats[0]);
    if (p.B == 0 || p.D == 0) return;
    const scalar_t* fp[kMaxModalities] = {};
    for (int64_t m = 0; m < p.M; ++m) fp[m] = feats[m].const_data_ptr<scalar_t>();
    forward_kernel<scalar_t, acc_t>(p, fp, out.mutable_data_ptr<scalar_t>(),
                                    p.w ? mean.mutable_data_ptr<acc_t>() : nullptr,
                                    p.w ? rstd.mutable_data_ptr<acc_t>() : nullptr, eps);
  });
  return {out, mean, rstd};
}

std::vector<Tensor> concat_embed_backward_cpu(
    const Tensor& grad_out, const std::vector<Tensor>& feats, const std::optional<Tensor>& type_emb,
    const std::vector<Tensor>& pos, const std::vector<int64_t>& pos_index, const std::optional<Tensor>& ln_weight,
    const std::optional<Tensor>& ln_bias, const Tensor& mean, const Tensor& rstd, double dropout_p,
    const std::optional<Tensor>& seed) {
  MMFAST_CHECK_ARG(!feats.empty(), "features", "expected at least one modality");
  std::vector<Tensor> grads;
  dispatch_floating(feats[0].scalar_type(), "features", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr ScalarType acc_dtype = scalar_type_of<acc_t>;
    const Plan<acc_t> p = make_plan<acc_t>(feats, type_emb, pos, pos_index, ln_weight, ln_bias, dropout_p, seed);
    const IntArrayRef go_sizes = grad_out.sizes();
    MMFAST_CHECK_ARG(go_sizes.size() == 3 && go_sizes[0] == p.B && go_sizes[1] == p.Ltot && go_sizes[2] == p.D,
                     "grad_out", "expected shape (", p.B, ", ", p.Ltot, ", ", p.D, "), got ", shape(grad_out));
    MMFAST_CHECK_ARG(grad_out.scalar_type() == feats[0].scalar_type(), "grad_out", "expected dtype ",
                     feats[0].scalar_type(), ", got ", grad_out.scalar_type());
    check_same_device(grad_out, feats[0], "grad_out");
    const Tensor go = as_contiguous(grad_out);
    std::optional<Tensor> mean_c, rstd_c;
    if (p.w) {
      for (const auto* s : {&mean, &rstd})
        MMFAST_CHECK_ARG(s->numel() == p.B * p.Ltot && s->scalar_type() == acc_dtype, s == &mean ? "mean" : "rstd",
                         "expected ", p.B * p.Ltot, " ", acc_dtype, " values from the forward, got ", shape(*s), " ",
                         s->scalar_type());
      mean_c = as_contiguous(mean);
      rstd_c = as_contiguous(rstd);
    }
    for (int64_t m = 0; m < p.M; ++m) grads.push_back(torch::stable::empty_like(feats[m]));
    const int64_t type_rows = type_emb.has_value() ? type_emb->size(0) : 0;
    grads.push_back(type_emb.has_value() ? torch::stable::empty_like(*type_emb) : empty({0}, acc_dtype, feats[0]));
    const size_t first_pos = grads.size();
    for (const auto& t : pos) grads.push_back(torch::stable::empty_like(t));
    grads.push_back(empty({p.w ? p.D : 0}, acc_dtype, feats[0]));
    grads.push_back(empty({p.bias ? p.D : 0}, acc_dtype, feats[0]));
    scalar_t* gf[kMaxModalities] = {};
    acc_t* gp[kMaxModalities] = {};
    const scalar_t* fp[kMaxModalities] = {};
    for (int64_t m = 0; m < p.M; ++m) {
      fp[m] = feats[m].const_data_ptr<scalar_t>();
      gf[m] = grads[m].mutable_data_ptr<scalar_t>();
      if (p.pos_k[m] >= 0) {
        Tensor& t = grads[first_pos + p.pos_k[m]];
        gp[m] = t.mutable_data_ptr<acc_t>();
        // Rows past L_m get no gradient; the kernel writes rows < L_m.
        if (t.size(0) > p.L[m]) {
          Tensor tail = torch::stable::narrow(t, 0, p.L[m], t.size(0) - p.L[m]);
          torch::stable::zero_(tail);
        }
      }
    }
    acc_t* gt = type_emb.has_value() ? grads[p.M].template mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gw = p.w ? grads[grads.size() - 2].template mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gb = p.bias ? grads.back().template mutable_data_ptr<acc_t>() : nullptr;
    if (p.B == 0 || p.D == 0) {  // nothing to reduce: parameter gradients are zero
      for (size_t i = p.M; i < grads.size(); ++i) torch::stable::zero_(grads[i]);
      return;
    }
    backward_kernel<scalar_t, acc_t>(p, go.const_data_ptr<scalar_t>(), fp,
                                     p.w ? mean_c->const_data_ptr<acc_t>() : nullptr,
                                     p.w ? rstd_c->const_data_ptr<acc_t>() : nullptr, gf, gp, gt, gw, gb, type_rows);
  });
  return grads;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CPU, m) {
  m.impl("concat_embed_forward", TORCH_BOX(&concat_embed_forward_cpu));
  m.impl("concat_embed_backward", TORCH_BOX(&concat_embed_backward_cpu));
}

}  // namespace mmfast
