// libtorch's scaled-dot-product attention, with one CPU failure avoided.
//
// libtorch 2.11's CPU flash attention in bf16/fp16 asks oneDNN whether the
// CPU can pack its operands for AMX tiles (it asks the CPU, not the kernel
// build ATen dispatched to) and then packs them with `pack_vnni2`, which only
// its AVX-512 build has. On a CPU with AMX whose ATen kernels run below
// AVX-512 (`ATEN_CPU_CAPABILITY=avx2`, as the tests pin for reproducible
// numbers) a bf16 attention over 64 or more tokens fails with "pack_vnni2 is
// only supported when avx512 is supported". Those calls (x86, CPU, bf16 or
// fp16, ATen below AVX-512) run libtorch's math attention instead: the same
// softmax(q k^T) v, differentiable, its scores materialised, computed in
// fp32 and rounded once to the inputs' dtype. No process-wide setting is touched, so other
// threads' operations are not affected. Every other call is passed straight
// to libtorch's SDPA.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_attention_math.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <cstddef>
#include <optional>
#include <string>
#include <tuple>

#include "shim_error.h"

namespace {
// Whether the flash kernel could take the packing path that fails: x86 (AMX
// and oneDNN's packing are x86-only) with ATen's CPU kernels below their
// AVX-512 build. ATen picks its capability once per process.
bool flash_may_fail_to_pack() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool below = at::get_cpu_capability() != "AVX512";
  return below;
#else
  return false;
#endif
}
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
    const bool reduced =
        qt.scalar_type() == at::kBFloat16 || qt.scalar_type() == at::kHalf;
    auto& o = *static_cast<at::Tensor*>(out);
    if (qt.is_cpu() && reduced && flash_may_fail_to_pack()) {
      o = std::get<0>(at::_scaled_dot_product_attention_math(
          qt, kt, vt, m, 0.0, causal != 0, std::nullopt, scale, gqa != 0));
    } else {
      o = at::scaled_dot_product_attention(qt, kt, vt, m, 0.0, causal != 0, scale, gqa != 0);
    }
  });
}
