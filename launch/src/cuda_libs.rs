//! NCCL for the collectives must be the very libnccl that libtorch loaded
//! (a second NCCL in the process gives "corrupted comm object" errors), and
//! the CUDA runtime must be libtorch's too. cudarc opens them by the names
//! `libnccl.so` and `libcudart.so`, which the pip-installed libraries do not
//! have (they are `libnccl.so.2`, `libcudart.so.13`), and the dynamic loader
//! reads `LD_LIBRARY_PATH` only when a process starts. So on a machine with an
//! NVIDIA GPU, `sigma` first links those names to the files libtorch loaded,
//! in a directory of its own user's, and restarts itself once (same process
//! id, same arguments) with that directory first on `LD_LIBRARY_PATH`. Ranks
//! started by `srun`, torchrun-style launchers or `sigma launch` all get the
//! right libraries without any set-up; child processes inherit the setting.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Set in the restarted process: the directory of links (also a guard against a second restart).
pub use sigma_data::env::CUDA_LIBS_DIR;

/// A directory only this user can write, holding `name -> target` links for
/// `libs`; made under a temporary name and renamed into place, so concurrent
/// ranks on one node never see it half made.
fn links_dir(libs: &[(&str, PathBuf)]) -> Option<PathBuf> {
    let uid = nix::unistd::getuid().as_raw();
    let mut h = DefaultHasher::new();
    libs.hash(&mut h);
    let dir = std::env::temp_dir().join(format!("sigma-{uid}-cuda-libs-{:016x}", h.finish()));
    let good = |d: &Path| {
        std::fs::symlink_metadata(d)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
            && libs.iter().all(|(name, target)| {
                std::fs::read_link(d.join(name)).ok().as_deref() == Some(target)
            })
    };
    if good(&dir) {
        return Some(dir);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).ok()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).ok()?;
    for (name, target) in libs {
        std::os::unix::fs::symlink(target, tmp.join(name)).ok()?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another rank made it first (or a stale one is in the way).
        let _ = std::fs::remove_dir_all(&tmp);
    }
    good(&dir).then_some(dir)
}

/// On a GPU machine, restart this process once with libtorch's NCCL and CUDA
/// runtime first on the library path (see the module docs). Returns when no
/// restart is needed or possible (CPU-only machines, a second start).
pub fn ensure() {
    if sigma_data::env::is_set(CUDA_LIBS_DIR) || !Path::new("/dev/nvidiactl").exists() {
        return;
    }
    let libs = sigma_trainer::dist::nccl::loaded_cuda_libs();
    if libs.is_empty() {
        return;
    }
    let Some(dir) = links_dir(&libs) else {
        eprintln!(
            "warning: could not link libtorch's NCCL and CUDA runtime in {}; NCCL collectives may load another libnccl",
            std::env::temp_dir().display()
        );
        return;
    };
    let ld = match sigma_data::env::var("LD_LIBRARY_PATH") {
        Some(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", ld)
        .env(CUDA_LIBS_DIR, &dir)
        .exec();
    eprintln!("warning: could not restart sigma with libtorch's NCCL on the library path: {err}");
}
