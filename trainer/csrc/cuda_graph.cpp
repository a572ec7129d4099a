// libtorch's CUDA graphs (at::cuda::CUDAGraph) for the decode step
// (trainer/src/kernels/cuda_graph.rs): a graph owns a side stream (shared
// with the graphs made after it, which also share its private memory pool),
// work runs on that stream between `enter` and `leave` (ordered after and
// before the caller's stream by events), a capture records the work of one
// call on it, and a replay launches the recording on the current stream.
// Only libtorch's own functions are called (guards, events and device
// synchronisation through c10's device-generic interfaces), so the binary
// needs no CUDA runtime of its own. Needs the CUDA runtime headers: built
// with SIGMA_CUDA_GRAPHS where the
// build script finds them (pip's nvidia-cuda-runtime and nvidia-cuda-crt);
// without them every call reports that graphs are not built. No exception
// crosses into Rust (a failure is a non-zero return and a message).
#include "shim_error.h"

#include <cstddef>

#ifdef SIGMA_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  // The pool of the graph this one shares with ({0, 0}: its own).
  at::cuda::MempoolId_t pool{0, 0};
  std::optional<c10::cuda::CUDAStream> outer;
  explicit Graph(c10::cuda::CUDAStream s) : side(s) {}
};

// `waiter` waits for the work queued so far on `on`.
void order(const c10::cuda::CUDAStream& on, const c10::cuda::CUDAStream& waiter) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(on.unwrap());
  ev.block(waiter.unwrap());
}
}  // namespace

extern "C" int sigma_graph_built() { return 1; }

extern "C" int sigma_graph_new(int device, void* share, void** out, char* err, size_t n) {
  return sigma_shim::guarded(err, n, [&] {
    const auto d = static_cast<c10::DeviceIndex>(device);
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, d));
    auto* s = static_cast<Graph*>(share);
    auto* g = new Graph(s ? s->side : c10::cuda::getStreamFromPool(false, d));
    if (s) g->pool = s->graph.pool();
    *out = g;
  });
}

extern "C" void sigma_graph_free(void* g) { delete static_cast<Graph*>(g); }

// Make the side stream current, after the work queued on the current one.
extern "C" int sigma_graph_enter(void* p, char* err, size_t n) {
  return sigma_shim::guarded(err, n, [&] {
    auto* g = static_cast<Graph*>(p);
    TORCH_CHECK(!g->outer.has_value(), "the graph's stream is already entered");
    auto outer = c10::cuda::getCurrentCUDAStream(g->side.device_index());
    order(outer, g->side);
    c10::cuda::setCurrentCUDAStream(g->side);
    g->outer = outer;
  });
}

// Back to the stream current at `enter`, ordered after the side stream's work.
extern "C" int sigma_graph_leave(void* p, char* err, size_t n) {
  return sigma_shim::guarded(err, n, [&] {
    auto* g = static_cast<Graph*>(p);
    TORCH_CHECK(g->outer.has_value(), "the graph's stream is not entered");
    auto outer = *g->outer;
    g->outer.reset();
    c10::cuda::setCurrentCUDAStream(outer);
    order(g->side, outer);
  });
}

// Start recording the side stream (entered): nothing queued may be in
// flight, so the device is synchronised first (outside the capture).
extern "C" int sigma_graph_begin(void* p, char* err, size_t n) {
  return sigma_shim::guarded(err, n, [&] {
    auto* g = static_cast<Graph*>(p);
    TORCH_CHECK(g->outer.has_value(), "capture outside the graph's stream");
    c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->synchronizeDevice(g->side.device_index());
    g->graph.capture_begin(g->pool, cudaStreamCaptureModeThreadLocal);
  });
}

extern "C" int sigma_graph_end(void* p, char* err, size_t n) {
  return sigma_shim::guarded(err, n, [&] { static_cast<Graph*>(p)->graph.capture_end(); });
}

// Launch the recording on the current stream.
extern "C" int sigma_graph_replay(void* p, char* err, size_t n) {
  return sigma_shim::guarded(err, n, [&] {
    auto* g = static_cast<Graph*>(p);
    c10::DeviceGuard guard(g->side.device());
    g->graph.replay();
  });
}

#else  // no CUDA headers at build time

namespace {
int not_built(char* err, size_t n) {
  sigma_shim::set_err(err, n,
                      "this sigma was built without the CUDA runtime headers (pip's "
                      "nvidia-cuda-runtime and nvidia-cuda-crt; scripts/setup.sh installs "
                      "them), so it has no CUDA graphs");
  return 1;
}
}  // namespace

extern "C" int sigma_graph_built() { return 0; }
extern "C" int sigma_graph_new(int, void*, void**, char* err, size_t n) { return not_built(err, n); }
extern "C" void sigma_graph_free(void*) {}
extern "C" int sigma_graph_enter(void*, char* err, size_t n) { return not_built(err, n); }
extern "C" int sigma_graph_leave(void*, char* err, size_t n) { return not_built(err, n); }
extern "C" int sigma_graph_begin(void*, char* err, size_t n) { return not_built(err, n); }
extern "C" int sigma_graph_end(void*, char* err, size_t n) { return not_built(err, n); }
extern "C" int sigma_graph_replay(void*, char* err, size_t n) { return not_built(err, n); }

#endif
