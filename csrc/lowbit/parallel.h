// A persistent thread pool: workers are created once (and again only when the
// thread count changes), so a kernel call costs a wake-up, not a thread spawn.
#pragma once

#include <cstddef>
#include <functional>

namespace lowbit {

// Calls body(begin, end) over contiguous chunks covering [0, n), on up to
// NumThreads() threads (the caller is one of them), up to 4 chunks per thread
// claimed in order by whichever thread is free, so a thread on a busy core
// does not hold the call up. Chunks never overlap, so results do not depend on
// the thread count or on which thread ran a chunk. min_chunk keeps small jobs on the
// calling thread, where a wake-up would cost more than the work. If another
// thread is already using the pool, runs everything on the calling thread.
void ParallelFor(size_t n, size_t min_chunk, const std::function<void(size_t, size_t)>& body);

void SetNumThreads(int n);  // n >= 1
int NumThreads();

}  // namespace lowbit
