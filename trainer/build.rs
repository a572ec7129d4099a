// The shared libtorch link flags (build/libtorch.rs), and the C++ shim that
// reads the CUDA caching allocator's statistics (csrc/cuda_memory.cpp).
#[path = "../build/libtorch.rs"]
mod libtorch;

fn main() {
    let lib = libtorch::link();
    let include = lib.join("../include");
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_memory.cpp")
        .include(&include)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("sigma_cuda_memory");
    println!("cargo:rustc-link-lib=dylib=c10");
}
