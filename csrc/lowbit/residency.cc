#include "lowbit/residency.h"

#include <sys/mman.h>
#include <unistd.h>

namespace lowbit {
namespace {

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

void AdviseWillNeed(const void* ptr, size_t bytes) {
  if (bytes == 0) return;
  const size_t page = PageSize();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(ptr) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(ptr) + bytes;
  (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
}

uint64_t PrefetchPages(const void* ptr, size_t bytes) {
  if (bytes == 0) return 0;
  const size_t page = PageSize();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(ptr) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(ptr) + bytes;
  // Advice failures (e.g. on anonymous memory) only cost speed: ignore them.
  (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
  // Linux >= 5.14 maps the whole range in one call (MADV_POPULATE_READ): for a
  // warm page cache that is several times faster than a fault per 64 KiB block.
#ifdef MADV_POPULATE_READ
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ) == 0) {
    return (end - begin + page - 1) / page;
  }
#endif
  uint64_t touched = 0;
  volatile const unsigned char* p = static_cast<const unsigned char*>(ptr);
  unsigned char sink = 0;
  // First byte of the range, then the first byte of every following page.
  for (uintptr_t a = reinterpret_cast<uintptr_t>(ptr); a < end; a = (a & ~(page - 1)) + page) {
    sink ^= p[a - reinterpret_cast<uintptr_t>(ptr)];
    ++touched;
  }
  (void)sink;
  return touched;
}

uint64_t ReleasePages(const void* ptr, size_t bytes) {
  const size_t page = PageSize();
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(page - 1);
  if (end <= begin) return 0;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED) != 0) return 0;
  return end - begin;
}

}  // namespace lowbit
