// The shared libtorch link flags (build/libtorch.rs), and the C++ shims for
// what tch does not bind: the CUDA caching allocator's statistics
// (csrc/cuda_memory.cpp), libtorch's profiler (csrc/profiler.cpp) and its fused
// AdamW (csrc/fused_adamw.cpp).
#[path = "../build/libtorch.rs"]
mod libtorch;

fn main() {
    let lib = libtorch::link();
    let include = lib.join("../include");
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_memory.cpp")
        .file("csrc/profiler.cpp")
        .file("csrc/fused_adamw.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("sigma_libtorch_shims");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
