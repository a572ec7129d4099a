//! Which shared libraries this process has loaded (libtorch's CUDA runtime,
//! NCCL, ...): cudarc must use the very files libtorch loaded, and NVRTC is
//! found beside them.

use std::path::{Path, PathBuf};

/// The first loaded library whose file name contains `needle` (from
/// /proc/self/maps; None where it is not loaded or maps cannot be read).
pub fn loaded_library(needle: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().contains(needle))
        })
        .map(PathBuf::from)
}
