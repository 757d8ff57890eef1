// Page residency of memory-mapped weights: bring a range in ahead of use and
// give it back afterwards (weight streaming, python/lowbit/stream.py). Plain
// POSIX, no SIMD: the work is the kernel's page-cache I/O, not arithmetic.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit {

// Queues read-ahead of [ptr, ptr + bytes) and returns without waiting for it
// (madvise WILLNEED). Issuing it for several layers before populating any keeps
// the disk busy with many requests (1.0 -> 1.5 GB/s on this VM's disk).
void AdviseWillNeed(const void* ptr, size_t bytes);

// Starts read-ahead of [ptr, ptr + bytes) (madvise WILLNEED: the kernel queues
// the whole range at once, far deeper than the 128 KiB fault read-ahead), then
// touches one byte per page so the pages are mapped before the kernels read
// them (one MADV_POPULATE_READ call where the kernel has it). Returns the
// number of pages brought in. Safe on any readable range.
uint64_t PrefetchPages(const void* ptr, size_t bytes);

// Drops the mapping of whole pages inside [ptr, ptr + bytes) (madvise
// DONTNEED). Only for read-only use of MAP_PRIVATE or MAP_SHARED file
// mappings: unmodified pages are re-read from the file on the next access, so
// results never change, only the resident set shrinks. Partial pages at the
// ends are kept (they may hold a neighbour's bytes). Returns bytes released.
uint64_t ReleasePages(const void* ptr, size_t bytes);

}  // namespace lowbit
