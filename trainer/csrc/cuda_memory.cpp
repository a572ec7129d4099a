// The CUDA caching allocator's own statistics (bytes allocated and reserved,
// current and peak, all pools), which tch does not bind. Compiled by the
// trainer's build script against the libtorch that torch-sys links; no
// exception crosses into Rust (a failure is a non-zero return).
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

namespace {
c10::DeviceAllocator* cuda_allocator() {
  auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
  return (a != nullptr && a->initialized()) ? a : nullptr;
}
}  // namespace

// out: allocated current, allocated peak, reserved current, reserved peak (bytes).
extern "C" int sigma_cuda_memory_stats(int device, int64_t* out) {
  try {
    auto* a = cuda_allocator();
    if (a == nullptr) return 1;
    auto s = a->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.allocated_bytes[all].peak;
    out[2] = s.reserved_bytes[all].current;
    out[3] = s.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return 2;
  }
}

extern "C" int sigma_cuda_reset_peak_memory(int device) {
  try {
    auto* a = cuda_allocator();
    if (a == nullptr) return 1;
    a->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 2;
  }
}
