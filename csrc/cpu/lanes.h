// Short rows (N <= kLanesMaxN): one position per vector lane.
//
// For a vocabulary of a few dozen states a row is one or two vectors, and the per-row
// costs of the row layout (horizontal reductions, scalar coefficient math, padding to 16)
// dominate. Here a group of VV::L consecutive positions is transposed into a scratch
// tile t[b * L + j] = row (p0 + j), element b; then every pass is a loop over b of plain
// vector operations, per-row reductions are lane-wise, and per-row scalars are vectors.
// Lanes past the end of the task replicate its last row (finite work, never stored).
#pragma once

#include "cpu/cpu_common.h"

namespace cdm {
namespace cpu {

constexpr int64_t kLanesMaxN = 96;  // rows up to this length take the lanes layout

template <class VV>
struct Group {
  using T = typename VV::T;
  using V = typename VV::V;
  using M = typename VV::M;
  static constexpr int L = VV::L;
  using E = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;  // lane integer
  int64_t p0 = 0;  // first position
  int cnt = 0;     // valid lanes
  int64_t n = 0;

  CDM_INLINE int64_t row(int j) const { return p0 + (j < cnt ? j : cnt - 1); }

  // t[b * L + j] = element b of row(j), converted to T; with `errors`, flags kRowsNotFinite
  // unless every value is finite (-inf allowed with allow_minus_inf)
  CDM_INLINE void load(const void* base, DT dt, T* t, ValueErrors* errors = nullptr,
                       bool allow_minus_inf = false) const {
    load_tile(base, dt, t);
    if (errors == nullptr) return;
    typename VV::M bad{};
    for (int64_t b = 0; b < n; ++b) bad |= not_finite<VV>(at(t, b), allow_minus_inf);
    if (any_lane<VV>(bad)) errors->flag(kRowsNotFinite);
  }

  // the probability checks of check_probability_row on every row of the tile
  CDM_INLINE void check_probabilities(const T* t, ValueErrors* errors) const {
    typename VV::M bad{}, negative{};
    V sum{};
    for (int64_t b = 0; b < n; ++b) {
      const V v = at(t, b);
      bad |= not_finite<VV>(v, false);
      negative |= v < T(0);
      sum += v;
    }
    if (any_lane<VV>(bad)) errors->flag(kSecondNotFinite);
    if (any_lane<VV>(negative)) errors->flag(kSecondNegative);
    for (int j = 0; j < L; ++j) {
      if (!(std::abs(static_cast<double>(sum[j]) - 1.0) <= kTargetSumTolerance)) errors->flag(kSecondRowSum);
    }
  }

  CDM_INLINE void load_tile(const void* base, DT dt, T* t) const {
    for (int j = 0; j < L; ++j) {
      const int64_t off = row(j) * n;
      switch (dt) {
        case DT::F32: {
          const float* src = static_cast<const float*>(base) + off;
          for (int64_t b = 0; b < n; ++b) t[b * L + j] = static_cast<T>(src[b]);
          break;
        }
        case DT::F64: {
          const double* src = static_cast<const double*>(base) + off;
          for (int64_t b = 0; b < n; ++b) t[b * L + j] = static_cast<T>(src[b]);
          break;
        }
        case DT::BF16: {
          const c10::BFloat16* src = static_cast<const c10::BFloat16*>(base) + off;
          for (int64_t b = 0; b < n; ++b) t[b * L + j] = static_cast<T>(static_cast<float>(src[b]));
          break;
        }
        default: {
          const c10::Half* src = static_cast<const c10::Half*>(base) + off;
          for (int64_t b = 0; b < n; ++b) t[b * L + j] = static_cast<T>(static_cast<float>(src[b]));
        }
      }
    }
  }

  CDM_INLINE void store(void* base, DT dt, const T* t) const {
    for (int j = 0; j < cnt; ++j) {
      const int64_t off = (p0 + j) * n;
      switch (dt) {
        case DT::F32: {
          float* dst = static_cast<float*>(base) + off;
          for (int64_t b = 0; b < n; ++b) dst[b] = static_cast<float>(t[b * L + j]);
          break;
        }
        case DT::F64: {
          double* dst = static_cast<double*>(base) + off;
          for (int64_t b = 0; b < n; ++b) dst[b] = static_cast<double>(t[b * L + j]);
          break;
        }
        case DT::BF16: {
          c10::BFloat16* dst = static_cast<c10::BFloat16*>(base) + off;
          for (int64_t b = 0; b < n; ++b) dst[b] = c10::BFloat16(static_cast<float>(t[b * L + j]));
          break;
        }
        default: {
          c10::Half* dst = static_cast<c10::Half*>(base) + off;
          for (int64_t b = 0; b < n; ++b) dst[b] = c10::Half(static_cast<float>(t[b * L + j]));
        }
      }
    }
  }

  // per-lane values f(position) as a vector of T / of lane integers
  template <class F>
  CDM_INLINE V lanes(const F& f) const {
    V v;
    for (int j = 0; j < L; ++j) v[j] = static_cast<T>(f(row(j)));
    return v;
  }
  CDM_INLINE M lanes_index(const int64_t* x) const {
    M v;
    for (int j = 0; j < L; ++j) v[j] = static_cast<E>(x[row(j)]);
    return v;
  }
  // t[x_j, j] = value for every lane
  CDM_INLINE void set_at(T* t, const int64_t* x, T value) const {
    for (int j = 0; j < L; ++j) t[x[row(j)] * L + j] = value;
  }
  CDM_INLINE static M eq(M xv, int64_t b) { return xv == static_cast<E>(b); }
  CDM_INLINE static M ne(M xv, int64_t b) { return xv != static_cast<E>(b); }
  CDM_INLINE V at(const T* t, int64_t b) const { return VV::load(t + b * L); }
  CDM_INLINE void put(T* t, int64_t b, V v) const { VV::store(t + b * L, v); }
};

// the group of positions starting at p0 in a task ending at e
template <class VV>
CDM_INLINE Group<VV> make_group(int64_t p0, int64_t e, int64_t n) {
  Group<VV> g;
  g.p0 = p0;
  g.cnt = static_cast<int>(std::min<int64_t>(VV::L, e - p0));
  g.n = n;
  return g;
}

template <class VV>
CDM_INLINE typename VV::V vselect(typename VV::M m, typename VV::V a, typename VV::V b) {
  return m ? a : b;
}

}  // namespace cpu
}  // namespace cdm
