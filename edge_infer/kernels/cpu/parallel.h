// Work split over torch's OpenMP threads that degrades gracefully when the cores are shared.
//
// A parallel region ends when its slowest thread arrives; when another process keeps a core
// busy, a helper thread may wait a whole scheduler time slice before it runs, and a region of
// a few microseconds then takes milliseconds. So threads take chunks from a shared counter (a
// thread that starts late finds the work done), and a helper that starts late marks the
// machine as contended: regions run on the calling thread alone for a while, then try again.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace edge_parallel {

constexpr int64_t LATE_US = 300;          // a helper this late means the cores are shared
constexpr int64_t BACKOFF_US = 100000;    // then stay on one thread this long

inline int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline std::atomic<int64_t>& contended_until() {
  static std::atomic<int64_t> until{0};
  return until;
}

// fn(begin, end) over [0, n), in chunks of at least `grain`; on one thread when the work is
// one chunk, when nested, or while the cores are contended.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  const int threads = at::get_num_threads();
  grain = std::max<int64_t>(grain, 1);
  if (threads <= 1 || n <= grain || at::in_parallel_region() ||
      now_us() < contended_until().load(std::memory_order_relaxed)) {
    fn(0, n);
    return;
  }
  const int64_t chunk = std::max(grain, n / (4 * static_cast<int64_t>(threads)));
  const int64_t used = std::min<int64_t>(threads, (n + chunk - 1) / chunk);
  std::atomic<int64_t> next{0};
  const int64_t start = now_us();
  at::parallel_for(0, used, 1, [&](int64_t, int64_t) {
    if (at::get_thread_num() != 0) {
      const int64_t t = now_us();
      if (t - start > LATE_US)
        contended_until().store(t + BACKOFF_US, std::memory_order_relaxed);
    }
    for (;;) {
      const int64_t a = next.fetch_add(chunk, std::memory_order_relaxed);
      if (a >= n) break;
      fn(a, std::min(n, a + chunk));
    }
  });
}

}  // namespace edge_parallel
