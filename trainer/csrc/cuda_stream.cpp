// libtorch's current stream of a CUDA device, as a raw handle, for kernels
// launched outside libtorch (trainer/src/kernels.rs) that must be ordered
// with libtorch's own work. Device-generic c10 API: no CUDA headers needed.
// No exception crosses into Rust (a failure is a non-zero return).
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

extern "C" int sigma_cuda_current_stream(int device, void** out) {
  try {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    *out = impl->getStream(d).native_handle();
    return 0;
  } catch (...) {
    return 2;
  }
}
