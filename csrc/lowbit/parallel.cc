#include "lowbit/parallel.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace lowbit {
namespace {

int DefaultThreads() {
  // LOWBIT_NUM_THREADS, else OMP_NUM_THREADS (what torch and NumPy's BLAS obey,
  // so lowbit inside a torch program does not add threads on top of theirs),
  // else the CPUs the affinity mask allows (taskset, cgroups).
  for (const char* var : {"LOWBIT_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (const char* v = std::getenv(var)) {
      const int n = std::atoi(v);
      if (n >= 1) return n;
    }
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Workers (and the caller waiting for them) spin this long before sleeping.
// Waking a sleeping thread costs ~40 us on this VM (futex + idle vCPU), twice
// per call when both sides slept: 2 threads made a 256x4096 GEMV 9x slower than
// 1 thread with the old 400-pause spin (5 us here; PAUSE is ~12 ns on this CPU).
// 50 us covers the gap between the Linear layers of a model forward; longer
// spins take the core from torch's own threads between lowbit calls.
// LOWBIT_SPIN_US overrides it (0: sleep at once).
int64_t SpinNanos() {
  static const int64_t ns = [] {
    if (const char* v = std::getenv("LOWBIT_SPIN_US")) {
      const long us = std::atol(v);
      if (us >= 0) return static_cast<int64_t>(us) * 1000;
    }
    return static_cast<int64_t>(50'000);
  }();
  return ns;
}

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Spins (16 pauses between clock reads) until done() or the spin time is up.
template <class Done>
bool SpinUntil(const Done& done) {
  const int64_t deadline = NowNanos() + SpinNanos();
  for (;;) {
    if (done()) return true;
#if defined(__x86_64__) || defined(__i386__)
    for (int i = 0; i < 16; ++i) __builtin_ia32_pause();
#endif
    if (NowNanos() > deadline) return done();
  }
}

// Work is handed out in chunks that threads claim from one counter, not in
// fixed shares: when another process holds one of the cores, the thread on it
// runs in time slices, and with fixed halves every call waited for its half
// (2 threads slower than 1). Claiming lets the thread that runs take the rest;
// the caller never waits for a worker that has not woken up yet, only for
// chunks already claimed.
class Pool {
 public:
  using Body = std::function<void(size_t, size_t)>;

  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      stop_flag_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return threads_; }

  // Runs body over [0, n) in chunks of `chunk` indices on all threads.
  void Run(size_t n, size_t chunk, const Body& body) {
    const uint64_t job = last_job_ + 1;  // only the pool's owner (g_pool_mu) runs jobs
    last_job_ = job;
    const size_t chunks = (n + chunk - 1) / chunk;
    // Close the previous job before touching its fields: a worker may have
    // loaded claim_ = (previous job, its chunk count) and, reading the new
    // chunk count below, would take that index for a free chunk; the exchange
    // must then fail, so claim_ has to change first. The closed value's index
    // is past any chunk count.
    claim_.store((job << 32) | 0xffffffffu);
    body_.store(&body);
    n_.store(n);
    chunk_.store(chunk);
    chunks_.store(chunks);
    finished_.store(0);
    claim_.store(job << 32);  // publishes the fields above to claimers
    job_.store(job);          // seq_cst: pairs with the sleepers_ check below
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    Work(job);
    SpinUntil([&] { return finished_.load() == chunks; });
    if (finished_.load() != chunks) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [&] { return finished_.load() == chunks; });
    }
  }

 private:
  // Claims and runs chunks of `job` until none is left. claim_ holds the job
  // in its high 32 bits and the next chunk in the low 32: a worker that wakes
  // after its job ended sees another job there and claims nothing. The fields
  // read between the load and a successful compare-exchange belong to `job`:
  // Run changes claim_ (closes it) before it overwrites any of them and
  // publishes them before it opens the next job, so an exchange that succeeds
  // saw no Run in between.
  void Work(uint64_t job) {
    for (;;) {
      uint64_t state = claim_.load();
      if ((state >> 32) != (job & 0xffffffffu)) return;
      const size_t index = state & 0xffffffffu;
      const size_t chunks = chunks_.load(), n = n_.load(), chunk = chunk_.load();
      const Body* body = body_.load();
      if (index >= chunks) return;
      if (!claim_.compare_exchange_weak(state, state + 1)) continue;
      (*body)(index * chunk, std::min(n, (index + 1) * chunk));
      if (finished_.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_all();
      }
    }
  }
  void WorkerLoop() {
    uint64_t seen = 0;
    for (;;) {
      SpinUntil([&] { return job_.load() != seen || stop_flag_.load(); });
      if (job_.load() == seen && !stop_flag_.load()) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return stop_ || job_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      if (stop_flag_.load()) return;
      seen = job_.load();
      Work(seen);
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  uint64_t last_job_ = 0;
  std::atomic<const Body*> body_{nullptr};
  std::atomic<size_t> n_{0}, chunk_{1}, chunks_{0}, finished_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<uint64_t> job_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_flag_{false};
  bool stop_ = false;  // guarded by mu_
};

std::mutex g_pool_mu;  // held by whoever runs a job on the pool
std::unique_ptr<Pool> g_pool;
int g_threads = 0;     // 0: not chosen yet
constexpr size_t kChunksPerThread = 4;

}  // namespace

int NumThreads() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_threads == 0) g_threads = DefaultThreads();
  return g_threads;
}

void SetNumThreads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_threads = n;
  g_pool.reset();  // recreated lazily with the new size
}

void ParallelFor(size_t n, size_t min_chunk, const std::function<void(size_t, size_t)>& body) {
  if (n == 0) return;
  std::unique_lock<std::mutex> lock(g_pool_mu, std::try_to_lock);
  if (!lock.owns_lock()) {  // another caller has the pool: stay on this thread
    body(0, n);
    return;
  }
  if (g_threads == 0) g_threads = DefaultThreads();
  const size_t useful = std::max<size_t>(1, n / std::max<size_t>(1, min_chunk));
  if (g_threads == 1 || useful == 1) {
    body(0, n);
    return;
  }
  if (!g_pool || g_pool->threads() != g_threads) {
    g_pool.reset();
    g_pool.reset(new Pool(g_threads));
  }
  // 4 chunks per thread: a busy core's thread can hold up at most one claimed
  // chunk (1/8 of the work on 2 threads) while the other takes the rest.
  const size_t chunks = std::min(useful, static_cast<size_t>(g_threads) * kChunksPerThread);
  g_pool->Run(n, (n + chunks - 1) / chunks, body);
}

}  // namespace lowbit
