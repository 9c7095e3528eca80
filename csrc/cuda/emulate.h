// A CPU emulation of the CUDA features the kernels of csrc/cuda/ use, for testing their
// algorithms on a machine without a GPU (define CDM_CUDA_EMULATE and compile the .cu
// files as C++20). Every CUDA thread is an OS thread; a block's threads run together:
// __syncthreads is a barrier over the block, __syncwarp and every shuffle / ballot a
// barrier over the warp (so a divergent shuffle deadlocks here as it would misbehave on
// a GPU), shared memory is one buffer per block, filled with 0xFF bytes (NaN) before
// every block so a read of unwritten shared memory shows. Blocks run one after another.
// Numerics differ from the GPU (libm exp/log for the fast __expf/__logf), never the algorithm.
// Not part of any build: only the emulation test harness includes it.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  uint64_t slots[32];
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local Warp* tl_warp = nullptr;
inline thread_local int tl_lane = 0;

inline unsigned char* shared_memory() { return tl_block->smem; }

template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Warp* w = tl_warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slots[tl_lane] = bits;
  w->bar.arrive_and_wait();
  const uint64_t got = w->slots[src & 31];
  w->bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

// Global-memory traffic, counted for tests (emulate_ops.cpp: _traffic_start / _traffic_stop):
// the bytes every row load and store of cuda_common.cuh (load_raw, store_raw, load_one)
// moves, per registered tensor, and the rest in `other`. Shared memory (a block's row
// cache) is not global traffic and is not counted. Ranges change only between launches.
struct Traffic {
  struct Range {
    const unsigned char* lo;
    const unsigned char* hi;
    std::atomic<int64_t> loads{0}, stores{0};
  };
  std::vector<std::unique_ptr<Range>> ranges;
  std::atomic<int64_t> other_loads{0}, other_stores{0};
  bool on = false;
};

inline Traffic& traffic() {
  static Traffic t;
  return t;
}

inline void count_global(const void* p, int64_t bytes, bool store) {
  Traffic& t = traffic();
  if (!t.on) return;
  const auto* c = static_cast<const unsigned char*>(p);
  if (tl_block != nullptr && c >= tl_block->smem && c < tl_block->smem + tl_block->smem_bytes) return;
  for (auto& r : t.ranges) {
    if (c >= r->lo && c < r->hi) {
      (store ? r->stores : r->loads).fetch_add(bytes, std::memory_order_relaxed);
      return;
    }
  }
  (store ? t.other_stores : t.other_loads).fetch_add(bytes, std::memory_order_relaxed);
}

// Runs fn as `blocks` blocks of `threads` threads with `smem_bytes` of dynamic shared memory.
inline void launch(unsigned blocks, unsigned threads, size_t smem_bytes, const std::function<void()>& fn) {
  if (threads % 32 != 0) std::abort();
  Block blk;
  blk.bar = std::make_unique<std::barrier<>>(threads);
  for (unsigned w = 0; w < threads / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
  blk.smem_bytes = smem_bytes;
  blk.smem = static_cast<unsigned char*>(std::aligned_alloc(16, (smem_bytes + 16) / 16 * 16));
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t]() {
      tl_block = &blk;
      tl_warp = blk.warps[t / 32].get();
      tl_lane = static_cast<int>(t % 32);
      threadIdx = dim3(t);
      blockDim = dim3(threads);
      gridDim = dim3(blocks);
      for (unsigned b = 0; b < blocks; ++b) {
        if (t == 0) std::memset(blk.smem, 0xFF, blk.smem_bytes);
        blk.bar->arrive_and_wait();
        blockIdx = dim3(b);
        fn();
        blk.bar->arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  std::free(blk.smem);
}

}  // namespace emu

inline void __syncthreads() { emu::tl_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::tl_warp->bar.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return emu::exchange(v, emu::tl_lane ^ lane_mask);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const int src = emu::tl_lane - static_cast<int>(delta);
  return emu::exchange(v, src >= 0 ? src : emu::tl_lane);
}
template <class T>
T __shfl_sync(unsigned, T v, int src_lane) {
  return emu::exchange(v, src_lane);
}

inline unsigned __ballot_sync(unsigned, int pred) {
  emu::Warp* w = emu::tl_warp;
  w->slots[emu::tl_lane] = pred ? 1u : 0u;
  w->bar.arrive_and_wait();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= (w->slots[l] ? 1u : 0u) << l;
  w->bar.arrive_and_wait();
  return mask;
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// the fast intrinsics, as the correctly rounded functions (the tests' tolerances cover both)
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
