// libtorch's scaled-dot-product attention, with one CPU failure avoided.
//
// libtorch 2.11's CPU flash attention in bf16/fp16 asks oneDNN whether the
// CPU can pack its operands for AMX tiles (it asks the CPU, not the kernel
// build ATen dispatched to) and then packs them with `pack_vnni2`, which only
// its AVX-512 build has. On a CPU with AMX whose ATen kernels run below
// AVX-512 (`ATEN_CPU_CAPABILITY=avx2`, as the tests pin for reproducible
// numbers) a bf16 attention over 64 or more tokens (where libtorch's size
// heuristic packs) fails with "pack_vnni2 is only supported when avx512 is
// supported". For exactly
// those calls oneDNN is switched off for the forward (the flag libtorch's
// heuristic reads; the kernel then multiplies unpacked: against the packed
// kernel of an unpinned run, in five shapes tried, three bit for bit and
// the others in under 0.004 % of the outputs, by one bf16 unit), and
// restored afterwards, also when the call throws. The backward
// does not pack. Everything else is passed straight to libtorch.
#include <ATen/Context.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <cstddef>
#include <optional>
#include <string>

#include "shim_error.h"

namespace {
// Whether ATen's CPU kernels run below their AVX-512 build (the build that
// has `pack_vnni2`). ATen picks its capability once per process.
bool aten_below_avx512() {
  static const bool below = at::get_cpu_capability() != "AVX512";
  return below;
}

struct OneDnnOff {
  bool was;
  OneDnnOff() : was(at::globalContext().userEnabledMkldnn()) {
    at::globalContext().setUserEnabledMkldnn(false);
  }
  ~OneDnnOff() { at::globalContext().setUserEnabledMkldnn(was); }
};
}  // namespace

// out = scaled_dot_product_attention(q, k, v, mask (or null), dropout 0,
// causal, scale, gqa) into the (undefined) tensor handle `out`.
extern "C" int sigma_sdpa(void* q, void* k, void* v, void* mask, int causal, double scale,
                          int gqa, void* out, char* err, size_t err_len) {
  return sigma_shim::guarded(err, err_len, [&] {
    const auto& qt = *static_cast<const at::Tensor*>(q);
    const auto& kt = *static_cast<const at::Tensor*>(k);
    const auto& vt = *static_cast<const at::Tensor*>(v);
    std::optional<at::Tensor> m;
    if (mask != nullptr) m = *static_cast<const at::Tensor*>(mask);
    auto call = [&] {
      return at::scaled_dot_product_attention(qt, kt, vt, m, 0.0, causal != 0, scale, gqa != 0);
    };
    const bool reduced =
        qt.scalar_type() == at::kBFloat16 || qt.scalar_type() == at::kHalf;
    if (qt.is_cpu() && reduced && aten_below_avx512()) {
      OneDnnOff off;
      *static_cast<at::Tensor*>(out) = call();
    } else {
      *static_cast<at::Tensor*>(out) = call();
    }
  });
}
