// The shared libtorch link flags (build/libtorch.rs), and the C++ shims for
// what tch does not bind: the CUDA caching allocator's statistics
// (csrc/cuda_memory.cpp), libtorch's profiler (csrc/profiler.cpp) and its fused
// AdamW (csrc/fused_adamw.cpp), a linear layer that adds its weight
// gradient into the fp32 gradient buffer (csrc/linear_accum.cpp), SwiGLU
// and RoPE as autograd functions over NVRTC kernels (csrc/kernel_ops.cpp),
// autograd's grad with seeded outputs (csrc/autograd_grad.cpp), libtorch's
// current CUDA stream for the NVRTC kernels (csrc/cuda_stream.cpp), the
// FP8 linear layer over `_scaled_mm` and its emulation (csrc/fp8_linear.cpp),
// scaled-dot-product attention clear of a CPU packing failure (csrc/sdpa.cpp),
// and libtorch's CUDA graphs (csrc/cuda_graph.cpp, the one shim that needs the
// CUDA runtime's headers: built without graphs where they are not found).
#[path = "../build/libtorch.rs"]
mod libtorch;

/// The C++ ABI libtorch was built with, found as torch-sys finds it: from
/// the `torch` package of the python3 on PATH, or `LIBTORCH_CXX11_ABI`
/// (default 1) with `$LIBTORCH`.
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    if let Ok(v) = std::env::var("LIBTORCH_CXX11_ABI") {
        return v;
    }
    if std::env::var("LIBTORCH").is_err() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output();
        if let Ok(o) = out {
            let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() && (v == "0" || v == "1") {
                return v;
            }
        }
    }
    "1".into()
}

/// Include directories holding the CUDA runtime's headers and the `crt/`
/// headers they include: `$CUDA_HOME` (or /usr/local/cuda), or pip's CUDA
/// wheels beside torch (`nvidia/cu13/include` from nvidia-cuda-runtime and
/// nvidia-cuda-crt; the CUDA 12 wheels' `nvidia/cuda_runtime` and
/// `nvidia/cuda_nvcc`). None: not found, graphs are left out.
fn cuda_includes(torch_lib: &std::path::Path) -> Option<Vec<std::path::PathBuf>> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let site = torch_lib.join("../..");
    let home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
    let candidates = [
        vec![std::path::PathBuf::from(home).join("include")],
        vec![site.join("nvidia/cu13/include")],
        vec![
            site.join("nvidia/cuda_runtime/include"),
            site.join("nvidia/cuda_nvcc/include"),
        ],
    ];
    candidates.into_iter().find(|dirs| {
        let has = |f: &str| dirs.iter().any(|d| d.join(f).is_file());
        has("cuda_runtime_api.h") && has("crt/host_config.h")
    })
}

fn main() {
    let lib = libtorch::link();
    let include = lib.join("../include");
    // A new libtorch in the same place (a torch upgrade in the venv) rebuilds the shims.
    println!(
        "cargo:rerun-if-changed={}",
        include
            .join("torch/csrc/autograd/profiler_kineto.h")
            .display()
    );
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_stream.cpp");
    println!("cargo:rerun-if-changed=csrc/linear_accum.cpp");
    println!("cargo:rerun-if-changed=csrc/kernel_ops.cpp");
    println!("cargo:rerun-if-changed=csrc/autograd_grad.cpp");
    println!("cargo:rerun-if-changed=csrc/fp8_linear.cpp");
    println!("cargo:rerun-if-changed=csrc/sdpa.cpp");
    println!("cargo:rerun-if-changed=csrc/wgrad.h");
    println!("cargo:rerun-if-changed=csrc/shim_error.h");
    println!("cargo:rerun-if-changed=csrc/kernel_args.h");
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_memory.cpp")
        .file("csrc/profiler.cpp")
        .file("csrc/fused_adamw.cpp")
        .file("csrc/cuda_stream.cpp")
        .file("csrc/linear_accum.cpp")
        .file("csrc/kernel_ops.cpp")
        .file("csrc/autograd_grad.cpp")
        .file("csrc/fp8_linear.cpp")
        .file("csrc/sdpa.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .warnings(false)
        .compile("sigma_libtorch_shims");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    let mut graphs = cc::Build::new();
    graphs
        .cpp(true)
        .file("csrc/cuda_graph.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .warnings(false);
    let cuda = lib
        .join("libtorch_cuda.so")
        .is_file()
        .then(|| cuda_includes(&lib))
        .flatten();
    if let Some(dirs) = &cuda {
        graphs.define("SIGMA_CUDA_GRAPHS", None);
        for d in dirs {
            graphs.include(d);
        }
    } else {
        println!("cargo:warning=no CUDA runtime headers found (pip's nvidia-cuda-crt, or CUDA_HOME): sigma is built without CUDA graphs");
    }
    graphs.compile("sigma_cuda_graph_shim");
    if cuda.is_some() {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
