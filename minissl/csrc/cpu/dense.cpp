// CPU kernels of the dense ops: fused dice_ce_entropy forward/backward and mix.
//
// dice_ce_entropy: the (B, C, N) logits are split into tasks (sample b, chunk of N voxels) run by
// at::parallel_for; inside a task at::vec::Vectorized<scalar_t> holds one voxel per lane and the
// per-voxel math of kernels/loss.h runs on whole vectors (exp per class, one log per voxel in the
// forward and none in the backward; no -ffast-math). Int64 labels are converted to float in registers
// as they are loaded. Each task writes its partial sums to its own slot; the slots are added in a fixed
// order afterwards, so the result does not depend on the thread count. The backward recomputes the
// softmax in the same pass. Where the time went (perf, 1 thread, B=4 C=2 112x112x80): a separate
// label-conversion pass and the vector division/log were half of it; see benchmarks/bench_ops.py.
//
// mix: every tensor is walked row by row along its last (contiguous) dim, the row's coordinates kept
// like an odometer (no divisions per row); consecutive pieces that come from the same source are
// merged, so outside a box a plane is one large memcpy and inside it each row is two short SIMD copies.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>
#include <cstring>

#include "../common.h"

namespace minissl {

// SIMD overloads of the math names used by kernels/loss.h (declared before the include so the
// templates see them).
template <class S>
inline at::vec::Vectorized<S> vexp(const at::vec::Vectorized<S>& x) { return x.exp_u20(); }  // < 2 ulp
template <class S>
inline at::vec::Vectorized<S> vlog(const at::vec::Vectorized<S>& x) { return x.log(); }
template <class S>
inline at::vec::Vectorized<S> vrecip(const at::vec::Vectorized<S>& x) { return x.reciprocal(); }
// float: the division and Sleef's 1-ulp log are the two slowest instructions of the loss loop; a 3.5-ulp
// log and an approximate reciprocal refined by one Newton step (r (2 - x r), about 1 ulp) cost less.
#if defined(CPU_CAPABILITY_AVX512)
inline at::vec::Vectorized<float> vlog(const at::vec::Vectorized<float>& x) { return Sleef_logf16_u35(x); }
inline at::vec::Vectorized<float> vrecip(const at::vec::Vectorized<float>& x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline at::vec::Vectorized<float> vlog(const at::vec::Vectorized<float>& x) { return Sleef_logf8_u35(x); }
inline at::vec::Vectorized<float> vrecip(const at::vec::Vectorized<float>& x) {
  const __m256 r = _mm256_rcp_ps(x);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0f)));
}
#endif
template <class S>
inline at::vec::Vectorized<S> vlog1p(const at::vec::Vectorized<S>& x) { return x.log1p(); }
template <class S>
inline at::vec::Vectorized<S> vabs(const at::vec::Vectorized<S>& x) { return x.abs(); }
template <class S>
inline at::vec::Vectorized<S> vmax(const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b) {
  return at::vec::maximum(a, b);
}
template <class S>
inline at::vec::Vectorized<S> vmin(const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b) {
  return at::vec::minimum(a, b);
}

}  // namespace minissl

#include "../kernels/loss.h"

namespace minissl {
namespace {

constexpr int64_t kChunk = 2048;  // voxels per task (multiple of every vector width)

// Loads the inputs of one vector of voxels [n, n + cnt) of sample b: logits z[c], targets t[c], weight.
// Hard labels are read as int64 and converted in registers (no separate pass over them), so their loads
// overlap the math; out-of-range labels set lanes of `bad`, checked once per task.
template <class scalar_t>
struct DceLoader {
  using Vec = at::vec::Vectorized<scalar_t>;
  static constexpr int kLab = Vec::size() / at::vec::Vectorized<int64_t>::size();  // int64 vectors per Vec
  using VecLab = at::vec::VectorizedN<int64_t, kLab>;
  const scalar_t* logits;
  const int64_t* labels;     // (B, N) or null
  const scalar_t* soft;      // (B, C, N) or null
  const scalar_t* weight;    // (B, N) or null
  int64_t N;
  scalar_t c_eff;            // labels must lie in [0, c_eff)

  // C is passed by the caller (a compile-time constant there, so the loops unroll).
  MINISSL_INLINE void load(int64_t b, int64_t n, int64_t cnt, Vec* z, Vec* t, Vec& w, Vec& bad, int C) const {
    static const scalar_t ones[64] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                      1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                      1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    const int64_t V = Vec::size();
    const bool full = cnt == V;
    for (int c = 0; c < C; ++c) {
      const scalar_t* zp = logits + (b * C + c) * N + n;
      z[c] = full ? Vec::loadu(zp) : Vec::loadu(zp, cnt);
    }
    if (labels != nullptr) {
      const int64_t* lp = labels + b * N + n;
      const VecLab raw = full ? VecLab::loadu(lp) : VecLab::loadu(lp, cnt);  // padded lanes read 0
      const Vec lab = at::vec::convert<scalar_t, 1, int64_t, kLab>(raw);
      bad = bad | (lab < Vec(scalar_t(0))) | (lab >= Vec(c_eff));
      if (C == 1) {
        t[0] = lab;
      } else {
        for (int c = 0; c < C; ++c) t[c] = lab.eq(Vec(static_cast<scalar_t>(c)));
      }
    } else {
      for (int c = 0; c < C; ++c) {
        const scalar_t* tp = soft + (b * C + c) * N + n;
        t[c] = full ? Vec::loadu(tp) : Vec::loadu(tp, cnt);
      }
    }
    if (weight != nullptr) {
      w = full ? Vec::loadu(weight + b * N + n) : Vec::loadu(weight + b * N + n, cnt);
    } else {
      w = full ? Vec(scalar_t(1)) : Vec::loadu(ones, cnt);  // padded lanes get weight 0
    }
  }

  static bool any_bad(const Vec& bad) { return bad.zero_mask() != (1 << Vec::size()) - 1; }
};

// Scratch arrays of CC vectors: fixed-size (registers after unrolling) for CC > 0, heap for CC == 0.
template <class Vec, int CC>
struct Scratch {
  std::array<Vec, CC> z, t, p, gz, gI, gP;
  std::array<Vec, 3 * CC + 3> acc;
  explicit Scratch(int64_t) {}
};
template <class Vec>
struct Scratch<Vec, 0> {
  std::vector<Vec> z, t, p, gz, gI, gP, acc;
  explicit Scratch(int64_t C) : z(C), t(C), p(C), gz(C), gI(C), gP(C), acc(3 * C + 3) {}
};

// Runs fn.template operator()<CC>() with CC = C for the common channel counts, else CC = 0 (runtime C).
template <class F>
auto dispatch_channels(int64_t C, F&& fn) {
  switch (C) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    default: return fn(std::integral_constant<int, 0>());
  }
}

template <class scalar_t, int CC>
std::vector<at::Tensor> dce_forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                         const at::Tensor& weight, bool hard, bool squared) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t B = logits.size(0), N = numel_from(logits, 2);
  const int C = CC > 0 ? CC : static_cast<int>(logits.size(1));
  const int64_t V = Vec::size(), K = 3 * C + 3;
  const int64_t nchunks = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
  const int64_t ntasks = B * nchunks;
  const int64_t c_eff = C == 1 ? 2 : C;
  const DceLoader<scalar_t> loader{logits.data_ptr<scalar_t>(), hard ? target.data_ptr<int64_t>() : nullptr,
                                   hard ? nullptr : target.data_ptr<scalar_t>(),
                                   weight.defined() ? weight.data_ptr<scalar_t>() : nullptr, N,
                                   static_cast<scalar_t>(c_eff)};
  std::vector<double> partial(ntasks * K, 0.0);
  std::atomic<bool> bad{false};

  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<Vec, CC> sc(C);
    alignas(64) scalar_t lanes[64];
    Vec badv(scalar_t(0));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nchunks, n0 = (task % nchunks) * kChunk, n1 = std::min(N, n0 + kChunk);
      for (int64_t k = 0; k < K; ++k) sc.acc[k] = Vec(scalar_t(0));
      Vec w;
      for (int64_t n = n0; n < n1; n += V) {
        const int64_t cnt = std::min(V, n1 - n);
        loader.load(b, n, cnt, sc.z.data(), sc.t.data(), w, badv, C);
        dce_forward_voxel(sc.z.data(), sc.t.data(), w, C, squared, sc.acc.data(), sc.p.data());
      }
      double* out = partial.data() + task * K;
      for (int64_t k = 0; k < K; ++k) {
        sc.acc[k].store(lanes);
        double s = 0.0;
        for (int64_t l = 0; l < V; ++l) s += static_cast<double>(lanes[l]);
        out[k] = s;
      }
    }
    if (DceLoader<scalar_t>::any_bad(badv)) bad = true;
  });
  TORCH_CHECK_VALUE(!bad, "minissl: expected labels in [0, ", c_eff, ") for ", C,
                    " channel logits, got a label outside that range");

  // Deterministic reduction over chunks, in chunk order.
  at::Tensor acc = at::zeros({B, K}, logits.options().dtype(at::kDouble));
  double* ap = acc.data_ptr<double>();
  for (int64_t task = 0; task < ntasks; ++task) {
    const int64_t b = task / nchunks;
    for (int64_t k = 0; k < K; ++k) ap[b * K + k] += partial[task * K + k];
  }
  acc = acc.to(logits.scalar_type());
  return {acc.slice(1, 0, C).contiguous(), acc.slice(1, C, 2 * C).contiguous(), acc.slice(1, 2 * C, 3 * C).contiguous(),
          acc.select(1, 3 * C).contiguous(), acc.select(1, 3 * C + 1).contiguous(), acc.select(1, 3 * C + 2).contiguous()};
}

template <class scalar_t, int CC>
at::Tensor dce_backward_impl(const at::Tensor& gI, const at::Tensor& gP, const at::Tensor& gCE, const at::Tensor& gH,
                             const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight, bool hard,
                             bool squared) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t B = logits.size(0), N = numel_from(logits, 2);
  const int C = CC > 0 ? CC : static_cast<int>(logits.size(1));
  const int64_t V = Vec::size();
  const int64_t nchunks = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
  at::Tensor grad = at::empty_like(logits);
  scalar_t* gp = grad.data_ptr<scalar_t>();
  const int64_t c_eff = C == 1 ? 2 : C;
  const DceLoader<scalar_t> loader{logits.data_ptr<scalar_t>(), hard ? target.data_ptr<int64_t>() : nullptr,
                                   hard ? nullptr : target.data_ptr<scalar_t>(),
                                   weight.defined() ? weight.data_ptr<scalar_t>() : nullptr, N,
                                   static_cast<scalar_t>(c_eff)};
  const scalar_t *gIp = gI.data_ptr<scalar_t>(), *gPp = gP.data_ptr<scalar_t>();
  const scalar_t *gCEp = gCE.data_ptr<scalar_t>(), *gHp = gH.data_ptr<scalar_t>();
  std::atomic<bool> bad{false};

  at::parallel_for(0, B * nchunks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<Vec, CC> sc(C);
    Vec badv(scalar_t(0));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nchunks, n0 = (task % nchunks) * kChunk, n1 = std::min(N, n0 + kChunk);
      for (int c = 0; c < C; ++c) {
        sc.gI[c] = Vec(gIp[b * C + c]);
        sc.gP[c] = Vec(gPp[b * C + c]);
      }
      const Vec vCE(gCEp[b]), vH(gHp[b]);
      Vec w;
      for (int64_t n = n0; n < n1; n += V) {
        const int64_t cnt = std::min(V, n1 - n);
        loader.load(b, n, cnt, sc.z.data(), sc.t.data(), w, badv, C);
        dce_backward_voxel(sc.z.data(), sc.t.data(), w, C, squared, sc.gI.data(), sc.gP.data(), vCE, vH,
                           sc.gz.data(), sc.p.data());
        for (int c = 0; c < C; ++c) {
          scalar_t* dst = gp + (b * C + c) * N + n;
          if (cnt == V) sc.gz[c].store(dst); else sc.gz[c].store(dst, cnt);
        }
      }
    }
    if (DceLoader<scalar_t>::any_bad(badv)) bad = true;
  });
  TORCH_CHECK_VALUE(!bad, "minissl: expected labels in [0, ", c_eff, ") for ", C,
                    " channel logits, got a label outside that range");
  return grad;
}

at::Tensor optional_weight(const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_ce_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, bool squared) {
  const bool hard = check_dce(logits, target, weight);
  check_device_type(logits, c10::DeviceType::CPU, "logits");
  const at::Tensor lg = logits.contiguous(), tg = target.contiguous(), w = optional_weight(weight);
  auto out = MINISSL_DISPATCH_FLOAT(lg.scalar_type(), "dice_ce_entropy", [&] {
    return dispatch_channels(lg.size(1), [&](auto cc) {
      return dce_forward_impl<scalar_t, decltype(cc)::value>(lg, tg, w, hard, squared);
    });
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

at::Tensor dice_ce_entropy_backward_cpu(const at::Tensor& gI, const at::Tensor& gP, const at::Tensor& gCE,
                                        const at::Tensor& gH, const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, bool squared) {
  const bool hard = check_dce(logits, target, weight);
  check_device_type(logits, c10::DeviceType::CPU, "logits");
  const int64_t B = logits.size(0), C = logits.size(1);
  for (const at::Tensor* g : {&gI, &gP}) {
    TORCH_CHECK_VALUE(g->dim() == 2 && g->size(0) == B && g->size(1) == C, "minissl: expected a (", B, ", ", C,
                ") gradient, got ", g->sizes());
  }
  for (const at::Tensor* g : {&gCE, &gH}) {
    TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == B, "minissl: expected a (", B, ",) gradient, got ", g->sizes());
  }
  const auto dt = logits.scalar_type();
  const at::Tensor lg = logits.contiguous(), tg = target.contiguous(), w = optional_weight(weight);
  const at::Tensor i = gI.to(dt).contiguous(), p = gP.to(dt).contiguous(), ce = gCE.to(dt).contiguous(),
                   h = gH.to(dt).contiguous();
  return MINISSL_DISPATCH_FLOAT(dt, "dice_ce_entropy_backward", [&] {
    return dispatch_channels(C, [&](auto cc) {
      return dce_backward_impl<scalar_t, decltype(cc)::value>(i, p, ce, h, lg, tg, w, hard, squared);
    });
  });
}

// ---- mix -------------------------------------------------------------------------------------------

// Copies n bytes. Inside a box the runs are short (tens to hundreds of bytes, two per row), where a
// libc call per run costs as much as the copy: short runs use inline SIMD moves (bit-exact, the float
// type only carries bytes), long ones memcpy.
MINISSL_INLINE void copy_run(char* dst, const char* src, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kVecBytes = Vec::size() * sizeof(float);
  if (n >= 2048) {
    std::memcpy(dst, src, n);
    return;
  }
  int64_t i = 0;
  for (; i + kVecBytes <= n; i += kVecBytes) Vec::loadu(src + i).store(dst + i);
  const int64_t words = (n - i) / 4;
  if (words > 0) {
    Vec::loadu(src + i, words).store(dst + i, words);
    i += 4 * words;
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Walks the rows (last spatial dim) of rows [r0, r1) of a (B, L, S) tensor and copies each piece from
// a or b, merging consecutive pieces of the same source into one copy.
struct RunCopier {
  const char* a;
  const char* b;
  char* out;
  int64_t es;
  int64_t start = -1;  // element offset of the pending run, -1 when none
  int64_t end = 0;
  bool from_b = false;

  void add(int64_t lo, int64_t hi, bool src_b) {
    if (lo >= hi) return;
    if (start >= 0 && (src_b != from_b || lo != end)) flush();
    if (start < 0) {
      start = lo;
      from_b = src_b;
    }
    end = hi;
  }
  void flush() {
    if (start >= 0) copy_run(out + start * es, (from_b ? b : a) + start * es, (end - start) * es);
    start = -1;
  }
};

void mix_one_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const MixGeometry& g, int64_t L,
                 const int64_t* boxes, const bool* blocks) {
  const int sd = g.sd;
  const int64_t W = g.S[sd - 1];
  int64_t R = 1;  // rows per (b, l) plane
  for (int d = 0; d < sd - 1; ++d) R *= g.S[d];
  const int64_t rows = g.B * L * R;
  if (rows == 0 || W == 0) return;
  const int64_t es = a.element_size();
  const char* ap = static_cast<const char*>(a.data_ptr());
  const char* bp = static_cast<const char*>(b.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (W * es));

  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    RunCopier cp{ap, bp, op, es};
    // Coordinates of the row within its (b, l) plane, advanced like an odometer (no divisions per row):
    // coord[d] on spatial dim d < sd - 1, and for blocks the block index blk[d] and offset in it inb[d].
    int64_t coord[3] = {0, 0, 0}, blk[3] = {0, 0, 0}, inb[3] = {0, 0, 0}, bs[3] = {1, 1, 1};
    int64_t plane = r0 / R, rr = r0 % R;
    for (int d = sd - 2; d >= 0; --d) {
      coord[d] = rr % g.S[d];
      rr /= g.S[d];
      if (boxes == nullptr) {
        bs[d] = g.S[d] / g.G[d];
        blk[d] = coord[d] / bs[d];
        inb[d] = coord[d] % bs[d];
      }
    }
    int64_t s = plane / L;
    const int64_t GL = boxes == nullptr ? g.G[sd - 1] : 1, bw = W / GL;
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t base = row * W;
      if (boxes != nullptr) {
        const int64_t* bx = boxes + s * 2 * sd;
        bool inside = bx[sd - 1] < bx[2 * sd - 1];
        for (int d = 0; d < sd - 1; ++d) inside &= coord[d] >= bx[d] && coord[d] < bx[sd + d];
        if (!inside) {
          cp.add(base, base + W, false);
        } else {
          cp.add(base, base + bx[sd - 1], false);
          cp.add(base + bx[sd - 1], base + bx[2 * sd - 1], true);
          cp.add(base + bx[2 * sd - 1], base + W, false);
        }
      } else {
        int64_t gi = s;  // flat index of this row's first block in (B, *G)
        for (int d = 0; d < sd - 1; ++d) gi = gi * g.G[d] + blk[d];
        gi *= GL;
        for (int64_t k = 0; k < GL; ++k) cp.add(base + k * bw, base + (k + 1) * bw, blocks[gi + k]);
      }
      for (int d = sd - 2; d >= 0; --d) {  // next row
        ++coord[d];
        if (++inb[d] == bs[d]) {
          inb[d] = 0;
          ++blk[d];
        }
        if (coord[d] < g.S[d]) break;
        coord[d] = blk[d] = inb[d] = 0;
        if (d == 0) s = ++plane / L;
      }
    }
    cp.flush();
  });
}

std::vector<at::Tensor> mix_cpu(at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& boxes,
                                const std::optional<at::Tensor>& blocks) {
  const MixGeometry g = check_mix(a, b, boxes, blocks);
  check_device_type(a[0], c10::DeviceType::CPU, "a[0]");
  at::Tensor bx, bl;
  if (boxes.has_value() && boxes->defined()) {
    bx = boxes->contiguous();
    const int64_t* p = bx.data_ptr<int64_t>();
    for (int64_t s = 0; s < g.B; ++s) {
      for (int d = 0; d < g.sd; ++d) {
        const int64_t lo = p[s * 2 * g.sd + d], hi = p[s * 2 * g.sd + g.sd + d];
        TORCH_CHECK_VALUE(0 <= lo && lo <= hi && hi <= g.S[d], "minissl: mix expected 0 <= lo <= hi <= ", g.S[d],
                    " on spatial dim ", d, ", got box (", lo, ", ", hi, ") for sample ", s);
      }
    }
  } else {
    bl = blocks->contiguous();
  }
  std::vector<at::Tensor> out;
  out.reserve(a.size());
  for (size_t k = 0; k < a.size(); ++k) {
    const at::Tensor ak = a[k].contiguous(), bk = b[k].contiguous();
    at::Tensor ok = at::empty(ak.sizes(), ak.options());
    mix_one_cpu(ak, bk, ok, g, g.L[k], bx.defined() ? bx.data_ptr<int64_t>() : nullptr,
                bl.defined() ? bl.data_ptr<bool>() : nullptr);
    out.push_back(ok);
  }
  return out;
}

}  // namespace
}  // namespace minissl

TORCH_LIBRARY_IMPL(minissl, CPU, m) {
  m.impl("dice_ce_entropy", &minissl::dice_ce_entropy_cpu);
  m.impl("dice_ce_entropy_backward", &minissl::dice_ce_entropy_backward_cpu);
  m.impl("mix", &minissl::mix_cpu);
}
