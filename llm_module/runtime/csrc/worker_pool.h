// The kernels' own worker threads, used instead of torch's OpenMP (at::parallel_for) by a thread
// that asked for them (set_own_workers): the serving thread, for a lone row's decoding steps.
//
// Why: libgomp stops spin-waiting between parallel regions once the process holds more OpenMP
// threads than cores, which happens as soon as another thread has run torch work (the caller's
// thread before it called us, another library's model thread). Every one of a decode step's
// hundreds of short matmuls then waits for a futex wake-up, and generation ran at under half its
// speed (bench/findings.md). These workers spin a short while after each job and then sleep,
// whatever other threads do. The serving thread then runs with one OpenMP thread of its own
// (runtime/threads.py), so no OpenMP team competes with these workers for the cores.
//
// One pool per library, used by one caller at a time: a second caller arriving while a job runs
// (two engines in one process) computes its job alone in its own thread. The threads are never
// joined (the pool lives until the process ends); a forked child starts a fresh pool.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace worker_pool {

using Range = std::function<void(int64_t, int64_t)>;

class Pool {
 public:
  // Threads a job is split over, the caller included (1: every job runs in the caller's thread).
  void set_threads(int threads) { threads_.store(std::max(1, threads)); }
  int threads() const { return threads_.load(); }

  // Run fn over [0, n) in contiguous parts, one per thread (the caller takes part 0); returns
  // when every part is done.
  void run(int64_t n, const Range& fn) {
    const int parts = static_cast<int>(std::min<int64_t>(threads_.load(), n));
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (parts <= 1 || !busy.owns_lock()) {
      fn(0, n);
      return;
    }
    grow(parts - 1);
    job_ = &fn;
    size_ = n;
    parts_ = parts;
    done_.store(0, std::memory_order_relaxed);
    epoch_.fetch_add(1);  // seq_cst: ordered before the read of sleeping_ below (see wait_for_job)
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    fn(0, n / parts);
    const int helpers = workers_;
    while (done_.load(std::memory_order_acquire) < helpers) _mm_pause();
  }

  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); }); });
    return *instance();
  }

 private:
  // How long a helper spins for the next job before it sleeps: longer than the gap between two
  // matmuls of a decode step, far shorter than the gap between two requests.
  static constexpr auto kSpin = std::chrono::microseconds(300);

  static Pool*& instance() {
    static Pool* pool = new Pool();  // never destroyed: its threads may still be spinning at exit
    return pool;
  }

  // Called with busy_ held, before the next job is published: a new helper starts from the epoch
  // it must wait past (read here, not in the thread, which may start after the job is out).
  void grow(int helpers) {
    while (workers_ < helpers) {
      const int index = ++workers_;
      const uint64_t before = epoch_.load();
      std::thread([this, index, before] { work(index, before); }).detach();
    }
  }

  void work(int index, uint64_t seen) {
    for (;;) {
      seen = wait_for_job(seen);
      const int64_t parts = parts_, n = size_;
      if (index < parts) (*job_)(n * index / parts, n * (index + 1) / parts);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      const uint64_t now = epoch_.load(std::memory_order_acquire);
      if (now != seen) return now;
      _mm_pause();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(sleep_);
    sleeping_.fetch_add(1);  // seq_cst: a job published before this is seen by the check below
    wake_.wait(lock, [&] { return epoch_.load() != seen; });
    sleeping_.fetch_sub(1);
    return epoch_.load(std::memory_order_acquire);
  }

  std::atomic<int> threads_{1};
  int workers_ = 0;  // helpers started; changed only with busy_ held
  std::mutex busy_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleeping_{0}, done_{0};
  const Range* job_ = nullptr;
  int64_t size_ = 0;
  int64_t parts_ = 1;
};

// Whether this thread's matmuls run on the pool (else on torch's OpenMP threads).
inline thread_local bool use_own_workers = false;

// at::parallel_for's shape: on the pool where this thread asked for it, else at::parallel_for.
inline void parallel_for(int64_t begin, int64_t end, const Range& fn) {
  if (end <= begin) return;
  if (!use_own_workers) {
    at::parallel_for(begin, end, 1, fn);
    return;
  }
  Pool::get().run(end - begin, [&](int64_t a, int64_t b) { fn(begin + a, begin + b); });
}

}  // namespace worker_pool
