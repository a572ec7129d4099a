// Shared build script of the crates that link libtorch (trainer, launch, tests).
// tch's torch-sys links libtorch; this adds what it leaves out:
//  - `libtorch_cuda.so` with --no-as-needed, or the linker drops it and CUDA is
//    silently unavailable at run time;
//  - an rpath to libtorch's directory so the binaries run without LD_LIBRARY_PATH
//    on the machine that built them (elsewhere, set LD_LIBRARY_PATH).
// libtorch is found like torch-sys finds it with LIBTORCH_USE_PYTORCH=1: from the
// `torch` package of the python3 on PATH (scripts/setup.sh puts .venv first), or $LIBTORCH.
// The trainer's own build script (trainer/build.rs) calls `link` and also compiles
// its C++ shim against the headers of the same libtorch.
use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)]
fn main() {
    link();
}

/// Link flags; returns libtorch's `lib` directory.
pub fn link() -> PathBuf {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PATH");
    let lib = match std::env::var("LIBTORCH") {
        Ok(p) => PathBuf::from(p).join("lib"),
        Err(_) => {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import torch, os; print(os.path.dirname(torch.__file__))",
                ])
                .output()
                .expect(
                    "python3 not found: run scripts/setup.sh, which builds with .venv/bin on PATH",
                );
            assert!(
                out.status.success(),
                "python3 cannot import torch: run scripts/setup.sh (it installs torch into .venv)"
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib")
        }
    };
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    lib
}
