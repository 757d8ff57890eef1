// Which Highway targets this module holds, which one dispatch picks, and the
// test hook that restricts dispatch so every compiled target can be checked.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "lowbit/targets.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <stdexcept>

#include "hwy/highway.h"
#include "lowbit/kernels.h"

HWY_BEFORE_NAMESPACE();
namespace lowbit {
namespace HWY_NAMESPACE {
int64_t ThisTarget() { return HWY_TARGET; }
}  // namespace HWY_NAMESPACE
}  // namespace lowbit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lowbit {

HWY_EXPORT(ThisTarget);

std::vector<std::pair<int64_t, std::string>> CompiledTargets() {
  std::vector<std::pair<int64_t, std::string>> out;
  // Every target compiled into this module (the same HWY_TARGETS in every
  // kernel file: they share compile flags), whether or not this CPU has it.
  for (int64_t bits = HWY_TARGETS; bits != 0; bits &= bits - 1) {
    const int64_t t = bits & -bits;
    out.emplace_back(t, hwy::TargetName(t));
  }
  return out;
}

int64_t DispatchedTarget() { return HWY_DYNAMIC_DISPATCH(ThisTarget)(); }

// Highway 1.0.3's test hook replaces the CPU's targets instead of narrowing
// them: restricting to AVX3 on an AVX2-only CPU (Zen 3) dispatches AVX-512 code
// and dies of SIGILL. So a mask is first intersected with what the CPU runs.
int64_t CpuTargets() {
  hwy::SetSupportedTargetsForTest(0);
  return hwy::SupportedTargets();
}

void RestrictTargets(int64_t mask) {
  if (mask == 0) return hwy::SetSupportedTargetsForTest(0);
  const int64_t runnable = mask & CpuTargets();
  if (runnable == 0) throw std::invalid_argument("restrict_targets: none of these targets runs on this CPU");
  hwy::SetSupportedTargetsForTest(runnable);
}

}  // namespace lowbit
#endif  // HWY_ONCE
