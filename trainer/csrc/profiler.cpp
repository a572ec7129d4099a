// libtorch's own profiler (Kineto) for sigma's per-step profile, which tch
// does not bind: start it for CPU operators (and CUDA kernels), stop it and
// hand every event to a callback. Compiled by the trainer's build script
// against the linked libtorch; no exception crosses into Rust (a failure is a
// non-zero return).
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdint>
#include <set>
#include <string>

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

namespace {
std::set<impl::ActivityType> activities(int cuda) {
  std::set<impl::ActivityType> a{impl::ActivityType::CPU};
  if (cuda != 0) a.insert(impl::ActivityType::CUDA);
  return a;
}
}  // namespace

extern "C" int sigma_profiler_start(int cuda) {
  try {
    impl::ProfilerConfig config(impl::ProfilerState::KINETO);
    prof::prepareProfiler(config, activities(cuda));
    prof::enableProfiler(config, activities(cuda));
    return 0;
  } catch (...) {
    return 1;
  }
}

// One event: its name, whether it ran on a CUDA device (a kernel, copy or
// set) or is a CPU operator, the id of the thread it started on, and its
// start and duration in nanoseconds.
typedef void (*sigma_profile_event)(void* ctx, const char* name, size_t len, int on_cuda,
                                    uint64_t thread, uint64_t start_ns, uint64_t duration_ns);

extern "C" int sigma_profiler_stop(sigma_profile_event emit, void* ctx) {
  try {
    auto result = prof::disableProfiler();
    if (!result) return 1;
    for (const auto& e : result->events()) {
      const std::string name = e.name();
      const int on_cuda = e.deviceType() == c10::DeviceType::CUDA ? 1 : 0;
      emit(ctx, name.data(), name.size(), on_cuda, e.startThreadId(), e.startNs(), e.durationNs());
    }
    return 0;
  } catch (...) {
    return 2;
  }
}
