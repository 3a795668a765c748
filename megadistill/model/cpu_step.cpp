// The recurrent branch of one CPU decoding step of a hybrid layer, as one function; the whole
// attention of a shared_norm layer's decoding step, as one function (sn_step below); and the
// mLSTM, or a shared_norm layer's attention, over a whole sequence without autograd (a prefill,
// an evaluation), as one scan (scan_rows, sn_scan_rows below).
//
// Loaded by megadistill/model/cpu_step.py (built on first use with the system's C++ compiler,
// no torch headers). It computes, for every row b and head h, what attention.py's eager
// HybridAttention._step does after its q/k/v/gate product (y) and RoPE (qk):
//   feature maps of q and k (hedgehog: softmax(x W), with both signs: [softmax(z), softmax(-z)]),
//   the mLSTM step on the joint state cn = [C | n] (mlstm.mlstm_step_joint_), the read-out
//   h = q.C / (max(|q.n|, exp(-m)) + eps), the output gate sigmoid(W [q|k|v] + b) (times its
//   per-head scale) and the mix lerp(swa, h, o); or h alone (gate mode "mlstm").
// Same operations in the same order as the eager step; sums run in another order than the BLAS
// products, so values agree to rounding (tests/model/test_cpu_step.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

// x86-64 Linux with GCC: the sequence scan below is also built for AVX2 and picked at load time
// (no -march=native: a library in a cache shared by a cluster's nodes runs on every node).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MEGADISTILL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEGADISTILL_CLONES
#endif

namespace {

template <typename T>
void softmax_into(const T* z, int64_t f, T sign, T* out) {
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < f; ++c) top = std::max(top, sign * z[c]);
  T sum = 0;
  for (int64_t c = 0; c < f; ++c) {
    out[c] = std::exp(sign * z[c] - top);
    sum += out[c];
  }
  for (int64_t c = 0; c < f; ++c) out[c] /= sum;
}

// x (d) -> features (f or 2f): z = x W with W (d, f) row-major.
template <typename T>
void feature_map(const T* x, const T* w, int64_t d, int64_t f, bool both, T* z, T* out) {
  std::fill(z, z + f, T(0));
  for (int64_t j = 0; j < d; ++j) {
    const T xj = x[j];
    const T* row = w + j * f;
    for (int64_t c = 0; c < f; ++c) z[c] += xj * row[c];
  }
  softmax_into(z, f, T(1), out);
  if (both) softmax_into(z, f, T(-1), out + f);
}

// a . b over n elements in 8 interleaved partial sums (a chain of one sum cannot be vectorized
// without reassociating: this is the reassociation, written out).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t whole = n - n % 8;
  for (int64_t e = 0; e < whole; e += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[e + u] * b[e + u];
  T sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (int64_t e = whole; e < n; ++e) sum += a[e] * b[e];
  return sum;
}

template <typename T>
T log_sigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

// torch.lerp's formula (exact at both ends).
template <typename T>
T lerp(T start, T end, T weight) {
  return std::abs(weight) < T(0.5) ? start + weight * (end - start)
                                   : end - (end - start) * (T(1) - weight);
}

// Layouts (row-major, contiguous):
//   y     (B, ystride): [q (H d) | k (KV d) | v (KV d) | i (H) | f (H) | ...]; g = (H + 2 KV) d
//   qk    (B, H + KV, d): the RoPE'd q and k heads
//   feat  (H + KV, d, f): the q heads' feature maps, then the k heads'
//   ogw   (H, g), ogb (H), ogs (H) or null: the output gate (mix 1 only)
//   swa   (B, H, d): the SWA branch's output (mix 1 only)
//   cn    (B, H, fx, d + 1) and m (B, H): the state, updated in place (fx = f, or 2 f)
//   out   (B, H, d)
template <typename T>
int step(int64_t B, int64_t H, int64_t KV, int64_t d, int64_t f, int64_t both, int64_t ystride,
         const T* y, const T* qk, const T* feat, const T* ogw, const T* ogb, const T* ogs,
         const T* swa, T* cn, T* m, T* out, double eps, int64_t mix) {
  if (B < 1 || H < 1 || KV < 1 || H % KV != 0 || d < 1 || f < 1) return 1;
  const int64_t fx = both ? 2 * f : f, rep = H / KV, d1 = d + 1, g = (H + 2 * KV) * d;
  // mlstm_step_joint_ scales q by fd ** -0.5: a Python float, rounded to the state's dtype
  const T scale = static_cast<T>(std::pow(static_cast<double>(fx), -0.5));
  const T eps_t = static_cast<T>(eps);
  std::vector<T> z(f), fq(fx), fk(KV * fx), ka(fx), v1(d1), r(d1);
  for (int64_t b = 0; b < B; ++b) {
    const T* yb = y + b * ystride;
    const T* vb = yb + g - KV * d;
    const T* qkb = qk + b * (H + KV) * d;
    for (int64_t k = 0; k < KV; ++k)
      feature_map(qkb + (H + k) * d, feat + (H + k) * d * f, d, f, both, z.data(),
                  fk.data() + k * fx);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / rep;
      feature_map(qkb + h * d, feat + h * d * f, d, f, both, z.data(), fq.data());
      // gates: [i, log f + m, 0] - m_new, exponentiated (mlstm_step_joint_)
      T& mh = m[b * H + h];
      const T ip = yb[g + h];
      const T a = log_sigmoid(yb[g + H + h]) + mh;
      const T mn = std::max(ip, a);
      const T ei = std::exp(ip - mn), ef = std::exp(a - mn), em = std::exp(T(0) - mn);
      mh = mn;
      // cn <- ef cn + (ei k) [v | 1]^T
      for (int64_t j = 0; j < d; ++j) v1[j] = vb[kh * d + j];
      v1[d] = T(1);
      for (int64_t c = 0; c < fx; ++c) ka[c] = fk[kh * fx + c] * ei;
      T* cnh = cn + (b * H + h) * fx * d1;
      for (int64_t c = 0; c < fx; ++c) {
        T* row = cnh + c * d1;
        for (int64_t j = 0; j < d1; ++j) row[j] = row[j] * ef;
        for (int64_t j = 0; j < d1; ++j) row[j] = row[j] + ka[c] * v1[j];
      }
      // read-out [q.C | q.n] with the scaled q
      std::fill(r.begin(), r.end(), T(0));
      for (int64_t c = 0; c < fx; ++c) {
        const T qc = fq[c] * scale;
        const T* row = cnh + c * d1;
        for (int64_t j = 0; j < d1; ++j) r[j] += qc * row[j];
      }
      const T den = std::max(std::abs(r[d]), em) + eps_t;
      T* o_out = out + (b * H + h) * d;
      if (mix == 0) {
        for (int64_t j = 0; j < d; ++j) o_out[j] = r[j] / den;
        continue;
      }
      T pre = 0;
      const T* w = ogw + h * g;
      for (int64_t j = 0; j < g; ++j) pre += yb[j] * w[j];
      T o = T(1) / (T(1) + std::exp(-(pre + ogb[h])));
      if (ogs != nullptr) o = o * ogs[h];
      const T* s = swa + (b * H + h) * d;
      for (int64_t j = 0; j < d; ++j) o_out[j] = lerp(s[j], r[j] / den, o);
    }
  }
  return 0;
}

// One decoding step of the shared_norm mix (attention.py HybridAttention._shared_step with
// shared_norm.absorb and shared_norm.shared_norm_step), for a step that is real, starts no
// document and is no sink. Per row b and K/V head g: the key leaving ring slot ``slot`` (if
// ``leaves[b]``) joins each of the g's query heads' state (C, n, m) with log weight
// gate_i + decay + log f, the state decays by log f; every slot's decay grows by log f and the
// slot takes this token's input gate, decay 0, key and value; then each query head reads
// softmax over the visible slots (``mask``) and the state, under one normaliser.
//   y      (B, ystride): [q (H d) | k (KV d) | v (KV d) | i (H) | f (H) | ...]
//   qk     (B, H + KV, d): the RoPE'd q and k heads;  feat (H + KV, d, f): their feature maps
//   qp     (B, H + KV, d) or null: q and k before RoPE (rope_on "none": the feature maps read
//          these, and the leaving key is featured from kp, where this step's plain key goes)
//   leaves (B), mask (B, N): bytes (0/1); the mask is the one after this step's write
//   kb, vb (B, KV, N, d): the buffer; kp (B, KV, N, d): its keys before RoPE (with qp only)
//   gi, dec (B, H, N): each slot's input gate and decay
//   c (B, H, fx, d), n (B, H, fx), m (B, H): the state, updated in place;  out (B, H, d)
template <typename T>
int sn_step(int64_t B, int64_t H, int64_t KV, int64_t d, int64_t f, int64_t both,
            int64_t ystride, int64_t N, int64_t slot, const T* y, const T* qk, const T* qp,
            const T* feat, const uint8_t* leaves, const uint8_t* mask, T* kb, T* kp, T* vb,
            T* gi, T* dec, T* c, T* n, T* m, T* out, double scaling) {
  if (B < 1 || H < 1 || KV < 1 || H % KV != 0 || d < 1 || f < 1 || slot < 0 || slot >= N ||
      (qp == nullptr) != (kp == nullptr))
    return 1;
  const bool plain = qp != nullptr;
  const int64_t fx = both ? 2 * f : f, rep = H / KV, g = (H + 2 * KV) * d;
  const T neg = T(-1.0e30), sc = static_cast<T>(scaling);
  std::vector<T> z(f), fk(fx), fq(fx), vold(d), a(N), num(d), qc(d);
  for (int64_t b = 0; b < B; ++b) {
    const T* yb = y + b * ystride;
    const T* qkb = qk + b * (H + KV) * d;
    const T* qfb = plain ? qp + b * (H + KV) * d : qkb;  // what the feature maps read
    for (int64_t kh = 0; kh < KV; ++kh) {
      T* ks = kb + ((b * KV + kh) * N + slot) * d;
      T* kfs = plain ? kp + ((b * KV + kh) * N + slot) * d : ks;
      T* vs = vb + ((b * KV + kh) * N + slot) * d;
      // the leaving key's features (computed whether or not it joins: the eager ops do, and a
      // weight of exp(NEG - m) leaves the state as they leave it)
      feature_map(kfs, feat + (H + kh) * d * f, d, f, both, z.data(), fk.data());
      std::copy(vs, vs + d, vold.begin());
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t h = kh * rep + r, bh = b * H + h;
        const T logf = log_sigmoid(yb[g + H + h]);
        T* gih = gi + bh * N;
        T* dech = dec + bh * N;
        const T log_w = leaves[b] ? (gih[slot] + dech[slot]) + logf : neg;
        T& mh = m[bh];
        const T mn = std::max(logf + mh, log_w);
        const T old = std::exp(logf + mh - mn), nw = std::exp(log_w - mn);
        mh = mn;
        T* ch = c + bh * fx * d;
        T* nh = n + bh * fx;
        for (int64_t i = 0; i < fx; ++i) {
          T* row = ch + i * d;
          const T ki = fk[i];
          for (int64_t j = 0; j < d; ++j) row[j] = old * row[j] + nw * (ki * vold[j]);
          nh[i] = old * nh[i] + nw * ki;
        }
        for (int64_t s = 0; s < N; ++s) dech[s] += logf;
        gih[slot] = yb[g + h];
        dech[slot] = T(0);
      }
      std::copy(qkb + (H + kh) * d, qkb + (H + kh + 1) * d, ks);
      if (plain) std::copy(qfb + (H + kh) * d, qfb + (H + kh + 1) * d, kfs);
      const T* vnew = yb + (H + KV) * d + kh * d;
      std::copy(vnew, vnew + d, vs);
    }
    const uint8_t* mb = mask + b * N;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / rep, bh = b * H + h;
      const T* qh = qkb + h * d;
      const T* kbh = kb + (b * KV + kh) * N * d;
      const T* vbh = vb + (b * KV + kh) * N * d;
      T top = neg;
      for (int64_t s = 0; s < N; ++s) {
        if (!mb[s]) continue;
        a[s] = dot(qh, kbh + s * d, d) * sc;
        top = std::max(top, a[s]);
      }
      std::fill(num.begin(), num.end(), T(0));
      T wsum = 0;
      for (int64_t s = 0; s < N; ++s) {
        if (!mb[s]) continue;
        const T p = std::exp(a[s] - top);
        wsum += p;
        const T* vs = vbh + s * d;
        for (int64_t j = 0; j < d; ++j) num[j] += p * vs[j];
      }
      feature_map(qfb + h * d, feat + h * d * f, d, f, both, z.data(), fq.data());
      const T mh = m[bh], zz = std::max(mh, T(0));
      const T sw = std::exp(-zz), ss = std::exp(mh - zz);
      const T* ch = c + bh * fx * d;
      const T* nh = n + bh * fx;
      std::fill(qc.begin(), qc.end(), T(0));
      for (int64_t i = 0; i < fx; ++i) {
        const T qi = fq[i];
        const T* row = ch + i * d;
        for (int64_t j = 0; j < d; ++j) qc[j] += qi * row[j];
      }
      const T qn = dot(fq.data(), nh, fx);
      const T den = sw * wsum + ss * qn;
      T* o = out + bh * d;
      for (int64_t j = 0; j < d; ++j) o[j] = (sw * num[j] + ss * qc[j]) / den;
    }
  }
  return 0;
}

// The shared_norm mix over a whole sequence without autograd (a prefill, an evaluation):
// shared_norm.shared_norm_parallel's function, token by token with the state in cache, for
// (row, head) pairs [lo, hi). Per query t of document D it reads, under one normaliser, the
// window set (keys s <= t of D with t - s < W, D's sinks, and t itself: swa.visible) exactly,
// and the keys of D that have left the window (no sinks, real) through the state
//   C = sum_s exp(i_s + cum_t - cum_s - m) fk_s v_s^T,   n likewise with fk_s,
// which the key leaving at t (s = t - W) joins and which empties when a document starts.
//   q (B, H, T, d), k, v (B, KV, T, d), fq (B, H, T, fx), fk (B, KV, T, fx), ig, fg (B, H, T)
//   doc, pos (B, T) int64 and ok (B, T) bytes: swa.Tokens;  out (B, H, T, d)
// D: d when known at compile time (0: not), as update_read.
template <typename T, int64_t D>
inline __attribute__((always_inline)) void sn_scan_rows(
    int64_t lo, int64_t hi, int64_t H, int64_t KV, int64_t len, int64_t d_run, int64_t fx,
    int64_t W, int64_t S, const T* q, const T* k, const T* v, const T* fq, const T* fk,
    const T* ig, const T* fg, const int64_t* doc, const int64_t* pos, const uint8_t* ok, T* out,
    double scaling) {
  const int64_t d = D > 0 ? D : d_run, rep = H / KV;
  const T neg = T(-1.0e30), sc = static_cast<T>(scaling);
  std::vector<T> c(fx * d), n(fx), num(d), qc(d), a, cum(len);
  std::vector<int64_t> keys, sinks;
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t b = p / H, kh = (p % H) / rep, pk = b * KV + kh;
    const T* qp = q + p * len * d;
    const T* kp = k + pk * len * d;
    const T* vp = v + pk * len * d;
    const T* fqp = fq + p * len * fx;
    const T* fkp = fk + pk * len * fx;
    const T* igp = ig + p * len;
    const T* fgp = fg + p * len;
    const int64_t* db = doc + b * len;
    const int64_t* pb = pos + b * len;
    const uint8_t* ob = ok + b * len;
    T* op = out + p * len * d;
    T m = neg, run = 0;
    bool empty = true;
    int64_t cur = len > 0 ? db[0] : 0;
    sinks.clear();
    for (int64_t t = 0; t < len; ++t) {
      const T logf = log_sigmoid(fgp[t]);
      run += logf;
      cum[t] = run;
      if (db[t] != cur) {  // a document starts: the state holds none of its keys
        cur = db[t];
        empty = true;
        m = neg;
        sinks.clear();
      }
      const int64_t s = t - W;  // the key leaving the window
      if (s >= 0 && ob[s] && pb[s] >= S && db[s] == cur) {
        const T log_w = igp[s] + (cum[t] - cum[s]);
        const T* fks = fkp + s * fx;
        const T* vs = vp + s * d;
        if (empty) {
          m = log_w;
          for (int64_t i = 0; i < fx; ++i) {
            for (int64_t j = 0; j < d; ++j) c[i * d + j] = fks[i] * vs[j];
            n[i] = fks[i];
          }
          empty = false;
        } else {
          const T mn = std::max(m + logf, log_w);
          const T old = std::exp(m + logf - mn), nw = std::exp(log_w - mn);
          for (int64_t i = 0; i < fx; ++i) {
            const T ki = nw * fks[i];
            T* row = c.data() + i * d;
            for (int64_t j = 0; j < d; ++j) row[j] = old * row[j] + ki * vs[j];
            n[i] = old * n[i] + ki;
          }
          m = mn;
        }
      } else if (!empty) {
        m += logf;
      }
      if (ob[t] && pb[t] < S) sinks.push_back(t);
      keys.clear();
      for (int64_t sk : sinks)
        if (t - sk >= W) keys.push_back(sk);
      for (int64_t r = std::max<int64_t>(0, t - W + 1); r <= t; ++r)
        if (r == t || (ob[r] && db[r] == cur)) keys.push_back(r);
      a.resize(keys.size());
      const T* qt = qp + t * d;
      T top = neg;
      for (size_t j = 0; j < keys.size(); ++j) {
        a[j] = dot(qt, kp + keys[j] * d, d) * sc;
        top = std::max(top, a[j]);
      }
      std::fill(num.begin(), num.end(), T(0));
      T wsum = 0;
      for (size_t j = 0; j < keys.size(); ++j) {
        const T pw = std::exp(a[j] - top);
        wsum += pw;
        const T* vr = vp + keys[j] * d;
        for (int64_t e = 0; e < d; ++e) num[e] += pw * vr[e];
      }
      T* ot = op + t * d;
      if (empty) {
        for (int64_t e = 0; e < d; ++e) ot[e] = num[e] / wsum;
        continue;
      }
      const T* fqt = fqp + t * fx;
      std::fill(qc.begin(), qc.end(), T(0));
      for (int64_t i = 0; i < fx; ++i) {
        const T* row = c.data() + i * d;
        for (int64_t e = 0; e < d; ++e) qc[e] += fqt[i] * row[e];
      }
      const T qn = dot(fqt, n.data(), fx);
      const T z = std::max(m, T(0)), sw = std::exp(-z), ss = std::exp(m - z);
      const T den = sw * wsum + ss * qn;
      for (int64_t e = 0; e < d; ++e) ot[e] = (sw * num[e] + ss * qc[e]) / den;
    }
  }
}

// sn_scan_rows with the loops compiled for common head dims (64, 128: lengths the compiler
// unrolls) where d is one of them.
template <typename T>
inline __attribute__((always_inline)) void sn_scan_rows_by_dim(
    int64_t lo, int64_t hi, int64_t H, int64_t KV, int64_t len, int64_t d, int64_t fx, int64_t W,
    int64_t S, const T* q, const T* k, const T* v, const T* fq, const T* fk, const T* ig,
    const T* fg, const int64_t* doc, const int64_t* pos, const uint8_t* ok, T* out,
    double scaling) {
  if (d == 64)
    sn_scan_rows<T, 64>(lo, hi, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok,
                        out, scaling);
  else if (d == 128)
    sn_scan_rows<T, 128>(lo, hi, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok,
                         out, scaling);
  else
    sn_scan_rows<T, 0>(lo, hi, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok,
                       out, scaling);
}

// The instantiations, each also built for AVX2 where MEGADISTILL_CLONES says so.
MEGADISTILL_CLONES void sn_scan_rows_of(int64_t lo, int64_t hi, int64_t H, int64_t KV,
                                        int64_t len, int64_t d, int64_t fx, int64_t W, int64_t S,
                                        const float* q, const float* k, const float* v,
                                        const float* fq, const float* fk, const float* ig,
                                        const float* fg, const int64_t* doc, const int64_t* pos,
                                        const uint8_t* ok, float* out, double scaling) {
  sn_scan_rows_by_dim<float>(lo, hi, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos,
                             ok, out, scaling);
}

MEGADISTILL_CLONES void sn_scan_rows_of(int64_t lo, int64_t hi, int64_t H, int64_t KV,
                                        int64_t len, int64_t d, int64_t fx, int64_t W, int64_t S,
                                        const double* q, const double* k, const double* v,
                                        const double* fq, const double* fk, const double* ig,
                                        const double* fg, const int64_t* doc, const int64_t* pos,
                                        const uint8_t* ok, double* out, double scaling) {
  sn_scan_rows_by_dim<double>(lo, hi, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos,
                              ok, out, scaling);
}

// The B * H pairs split over up to ``threads`` threads (this one included), as scan below.
template <typename T>
int sn_scan(int64_t B, int64_t H, int64_t KV, int64_t len, int64_t d, int64_t fx, int64_t W,
            int64_t S, const T* q, const T* k, const T* v, const T* fq, const T* fk, const T* ig,
            const T* fg, const int64_t* doc, const int64_t* pos, const uint8_t* ok, T* out,
            double scaling, int64_t threads) {
  if (B < 1 || H < 1 || KV < 1 || H % KV != 0 || len < 0 || d < 1 || fx < 1 || W < 1 || S < 0)
    return 1;
  const int64_t rows = B * H;
  const int64_t nt = std::max<int64_t>(1, std::min(threads, rows));
  std::vector<std::thread> pool;
  int64_t lo = 0;
  try {
    for (int64_t w = 1; w < nt; ++w) {
      const int64_t hi = rows * w / nt;
      pool.emplace_back([=] {
        sn_scan_rows_of(lo, hi, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok,
                        out, scaling);
      });
      lo = hi;
    }
  } catch (...) {  // no thread to be had: this one does the rest
  }
  sn_scan_rows_of(lo, rows, H, KV, len, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok, out,
                  scaling);
  for (auto& t : pool) t.join();
  return 0;
}

// One step of one head: each row i of [C | n] (stride d + 1) <- ef row + (ei k_i) [v | 1], and
// the read-out r = [q.C | q.n] of the updated rows with q scaled, in one pass. D: d when known
// at compile time (0: not).
template <typename T, int64_t D>
inline __attribute__((always_inline)) void update_read(int64_t f, int64_t d_run, T* __restrict c,
                                                        const T* kt, const T* qt,
                                                        const T* __restrict vt, T ei, T ef,
                                                        T scale, T* __restrict r) {
  const int64_t d = D > 0 ? D : d_run, d1 = d + 1;
  std::fill(r, r + d1, T(0));
  for (int64_t i = 0; i < f; ++i) {
    T* __restrict row = c + i * d1;
    const T ka = kt[i] * ei, qs = qt[i] * scale;
    for (int64_t j = 0; j < d; ++j) {
      row[j] = row[j] * ef + ka * vt[j];
      r[j] += qs * row[j];
    }
    row[d] = row[d] * ef + ka;
    r[d] += qs * row[d];
  }
}

// The mLSTM over a sequence, step by step (mlstm.mlstm_recurrent's function), for rows
// [lo, hi) of the B * H (row, head) pairs; the prefill's mLSTM without autograd. Per step and
// head it reads and writes the state once (the update and the read-out in one pass over [C | n],
// which stays in L1 at these sizes): O(T f d), against the chunkwise form's extra O(T L (f + d))
// of small products.
//   q, k  (B, H, T, f)   v, h (B, H, T, d)   ig, fg (B, H, T)   reset (B, T) or null
//   cn    (B, H, f, d + 1) and m (B, H): the state entering (updated to the state leaving)
template <typename T>
inline __attribute__((always_inline)) void scan_rows(
    int64_t lo, int64_t hi, int64_t H, int64_t len, int64_t f, int64_t d, const T* q,
    const T* k, const T* v, const T* ig, const T* fg, const uint8_t* reset, T* cn, T* m, T* h,
    double eps) {
  const int64_t d1 = d + 1;
  const T scale = static_cast<T>(std::pow(static_cast<double>(f), -0.5));
  const T eps_t = static_cast<T>(eps);
  std::vector<T> rv(d1);
  T* __restrict r = rv.data();
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t b = p / H;
    const T* qp = q + p * len * f;
    const T* kp = k + p * len * f;
    const T* vp = v + p * len * d;
    const T* ip = ig + p * len;
    const T* fp = fg + p * len;
    const uint8_t* rs = reset == nullptr ? nullptr : reset + b * len;
    T* __restrict c = cn + p * f * d1;
    T mh = m[p];
    for (int64_t t = 0; t < len; ++t) {
      if (rs != nullptr && rs[t]) {  // a document starts: (C, n, m) = 0
        std::fill(c, c + f * d1, T(0));
        mh = T(0);
      }
      const T a = log_sigmoid(fp[t]) + mh;
      const T mn = std::max(ip[t], a);
      const T ei = std::exp(ip[t] - mn), ef = std::exp(a - mn), em = std::exp(T(0) - mn);
      mh = mn;
      const T* __restrict vt = vp + t * d;
      const T* qt = qp + t * f;
      const T* kt = kp + t * f;
      if (d == 64) {  // common head dims, known when compiled: loops the compiler unrolls
        update_read<T, 64>(f, d, c, kt, qt, vt, ei, ef, scale, r);
      } else if (d == 128) {
        update_read<T, 128>(f, d, c, kt, qt, vt, ei, ef, scale, r);
      } else {
        update_read<T, 0>(f, d, c, kt, qt, vt, ei, ef, scale, r);
      }
      const T den = std::max(std::abs(r[d]), em) + eps_t;
      T* ht = h + (p * len + t) * d;
      for (int64_t j = 0; j < d; ++j) ht[j] = r[j] / den;
    }
    m[p] = mh;
  }
}

// The scan's instantiations, each also built for AVX2 where MEGADISTILL_CLONES says so.
MEGADISTILL_CLONES void scan_rows_of(int64_t lo, int64_t hi, int64_t H, int64_t len, int64_t f,
                                     int64_t d, const float* q, const float* k, const float* v,
                                     const float* ig, const float* fg, const uint8_t* reset,
                                     float* cn, float* m, float* h, double eps) {
  scan_rows<float>(lo, hi, H, len, f, d, q, k, v, ig, fg, reset, cn, m, h, eps);
}

MEGADISTILL_CLONES void scan_rows_of(int64_t lo, int64_t hi, int64_t H, int64_t len, int64_t f,
                                     int64_t d, const double* q, const double* k,
                                     const double* v, const double* ig, const double* fg,
                                     const uint8_t* reset, double* cn, double* m, double* h,
                                     double eps) {
  scan_rows<double>(lo, hi, H, len, f, d, q, k, v, ig, fg, reset, cn, m, h, eps);
}

// The B * H rows split over up to ``threads`` threads (this one included); serially where a
// thread cannot be started.
template <typename T>
int scan(int64_t B, int64_t H, int64_t len, int64_t f, int64_t d, const T* q, const T* k,
         const T* v, const T* ig, const T* fg, const uint8_t* reset, T* cn, T* m, T* h,
         double eps, int64_t threads) {
  if (B < 1 || H < 1 || len < 0 || f < 1 || d < 1) return 1;
  const int64_t rows = B * H;
  const int64_t n = std::max<int64_t>(1, std::min(threads, rows));
  std::vector<std::thread> pool;
  int64_t lo = 0;
  try {
    for (int64_t w = 1; w < n; ++w) {
      const int64_t hi = rows * w / n;
      pool.emplace_back(
          [=] { scan_rows_of(lo, hi, H, len, f, d, q, k, v, ig, fg, reset, cn, m, h, eps); });
      lo = hi;
    }
  } catch (...) {  // no thread to be had: this one does the rest
  }
  scan_rows_of(lo, rows, H, len, f, d, q, k, v, ig, fg, reset, cn, m, h, eps);
  for (auto& t : pool) t.join();
  return 0;
}

}  // namespace

extern "C" {

int megadistill_step_f32(int64_t B, int64_t H, int64_t KV, int64_t d, int64_t f, int64_t both,
                         int64_t ystride, const float* y, const float* qk, const float* feat,
                         const float* ogw, const float* ogb, const float* ogs, const float* swa,
                         float* cn, float* m, float* out, double eps, int64_t mix) {
  return step<float>(B, H, KV, d, f, both, ystride, y, qk, feat, ogw, ogb, ogs, swa, cn, m, out,
                     eps, mix);
}

int megadistill_step_f64(int64_t B, int64_t H, int64_t KV, int64_t d, int64_t f, int64_t both,
                         int64_t ystride, const double* y, const double* qk, const double* feat,
                         const double* ogw, const double* ogb, const double* ogs,
                         const double* swa, double* cn, double* m, double* out, double eps,
                         int64_t mix) {
  return step<double>(B, H, KV, d, f, both, ystride, y, qk, feat, ogw, ogb, ogs, swa, cn, m, out,
                      eps, mix);
}

int megadistill_sn_step_f32(int64_t B, int64_t H, int64_t KV, int64_t d, int64_t f,
                            int64_t both, int64_t ystride, int64_t N, int64_t slot,
                            const float* y, const float* qk, const float* qp,
                            const float* feat, const uint8_t* leaves, const uint8_t* mask,
                            float* kb, float* kp, float* vb,
                            float* gi, float* dec, float* c, float* n, float* m, float* out,
                            double scaling) {
  return sn_step<float>(B, H, KV, d, f, both, ystride, N, slot, y, qk, qp, feat, leaves, mask,
                        kb, kp, vb, gi, dec, c, n, m, out, scaling);
}

int megadistill_sn_step_f64(int64_t B, int64_t H, int64_t KV, int64_t d, int64_t f,
                            int64_t both, int64_t ystride, int64_t N, int64_t slot,
                            const double* y, const double* qk, const double* qp,
                            const double* feat, const uint8_t* leaves, const uint8_t* mask,
                            double* kb, double* kp, double* vb,
                            double* gi, double* dec, double* c, double* n, double* m,
                            double* out, double scaling) {
  return sn_step<double>(B, H, KV, d, f, both, ystride, N, slot, y, qk, qp, feat, leaves, mask,
                         kb, kp, vb, gi, dec, c, n, m, out, scaling);
}

int megadistill_sn_scan_f32(int64_t B, int64_t H, int64_t KV, int64_t T, int64_t d,
                            int64_t fx, int64_t W, int64_t S, const float* q, const float* k,
                            const float* v, const float* fq, const float* fk, const float* ig,
                            const float* fg, const int64_t* doc, const int64_t* pos,
                            const uint8_t* ok, float* out, double scaling, int64_t threads) {
  return sn_scan<float>(B, H, KV, T, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok, out,
                        scaling, threads);
}

int megadistill_sn_scan_f64(int64_t B, int64_t H, int64_t KV, int64_t T, int64_t d,
                            int64_t fx, int64_t W, int64_t S, const double* q, const double* k,
                            const double* v, const double* fq, const double* fk,
                            const double* ig, const double* fg, const int64_t* doc,
                            const int64_t* pos, const uint8_t* ok, double* out, double scaling,
                            int64_t threads) {
  return sn_scan<double>(B, H, KV, T, d, fx, W, S, q, k, v, fq, fk, ig, fg, doc, pos, ok, out,
                         scaling, threads);
}

int megadistill_scan_f32(int64_t B, int64_t H, int64_t T, int64_t f, int64_t d, const float* q,
                         const float* k, const float* v, const float* ig, const float* fg,
                         const uint8_t* reset, float* cn, float* m, float* h, double eps,
                         int64_t threads) {
  return scan<float>(B, H, T, f, d, q, k, v, ig, fg, reset, cn, m, h, eps, threads);
}

int megadistill_scan_f64(int64_t B, int64_t H, int64_t T, int64_t f, int64_t d, const double* q,
                         const double* k, const double* v, const double* ig, const double* fg,
                         const uint8_t* reset, double* cn, double* m, double* h, double eps,
                         int64_t threads) {
  return scan<double>(B, H, T, f, d, q, k, v, ig, fg, reset, cn, m, h, eps, threads);
}

}  // extern "C"
