// Selects ATen's vector width from what the compiler targets (setup.py builds with -march=native),
// so at::vec::Vectorized<float> is 16 lanes under AVX-512, 8 under AVX2, and a portable fallback otherwise;
// and the helpers the CPU kernels walk a row of lanes with, fp16/bf16 ones loaded as fp32 and stored back.
// Include this before any ATen vector header.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

namespace fastlm {

// n lanes from p: a whole vector, or a masked load of the first n (the rest zero).
template <typename T>
at::vec::Vectorized<T> load(const T* p, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
}

// n values of S from p as a vector of T (S is T, or fp16/bf16 widened to T = float; n at most T's width).
template <typename T, typename S>
at::vec::Vectorized<T> load_as(const S* p, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    return load(p, n);
  } else {
    static_assert(std::is_same_v<T, float>, "fp16/bf16 widen to float");
    at::vec::Vectorized<float> v;
    if (n == v.size()) {
      at::vec::load_to_float<S>(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<S>(at::vec::Vectorized<S>::loadu(p, n)));
  }
}

// The first n lanes of v into p as S (T, or fp16/bf16 rounded to nearest even).
template <typename T, typename S>
void store_as(const at::vec::Vectorized<T>& v, S* p, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<S>(v, v).store(p, n);
  }
}

// f(k, n) for lanes [k, k + n) in vector-sized steps; n is short only at the tail.
template <typename T, typename F>
void for_each_vector(int64_t lanes, const F& f) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  int64_t k = 0;
  for (; k + kWidth <= lanes; k += kWidth) f(k, kWidth);
  if (k < lanes) f(k, lanes - k);
}

// dst[0:n] += src[0:n].
template <typename T>
void add_row(T* dst, const T* src, int64_t n) {
  at::vec::map2([](at::vec::Vectorized<T> a, at::vec::Vectorized<T> b) { return a + b; }, dst, dst, src, n);
}

}  // namespace fastlm
