//! Durable file writes on the local filesystem: a file is written under a
//! temporary name beside its target, fsynced, renamed over the target, and the
//! directory fsynced, so a reader (or a crash) sees either the old file or the
//! whole new one, never a half-written one. Used for manifests, checkpoints,
//! metrics and every other file sigma writes that something later trusts.

use std::path::Path as FsPath;

use crate::error::{DataError, Result};

/// `path`'s directory (created) and a temporary name in it for writing `path`.
fn temp_beside(path: &FsPath) -> Result<(&FsPath, std::path::PathBuf)> {
    let dir = path.parent().unwrap_or(FsPath::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    Ok((dir, tmp))
}

/// Write `data` to `path` so that readers see either the old file or the whole new one.
pub fn write_atomic(path: &FsPath, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let (dir, tmp) = temp_beside(path)?;
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| DataError::io("create", &tmp, e))?;
        f.write_all(data)
            .map_err(|e| DataError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| DataError::io("sync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| DataError::io("rename into", path, e))
    })();
    if written.is_err() {
        // Nothing half-written stays behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// Write `path` with `write`, which creates the file at the path it is given
/// (a temporary name beside `path`, with `path`'s extension), then rename it
/// into place; on failure the temporary goes.
pub fn replace_with<E>(
    path: &FsPath,
    write: impl FnOnce(&FsPath) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<DataError>,
{
    let (dir, tmp) = temp_beside(path)?;
    // Keep the extension: writers that pick the format by it see the real one.
    let tmp = match path.extension() {
        Some(ext) => tmp.with_extension(format!("tmp.{}", ext.to_string_lossy())),
        None => tmp,
    };
    let r = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| DataError::io("rename into", path, e).into())
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    sync_dir(dir).map_err(E::from)
}

/// Copy `src` to `dst` through a temporary name in `dst`'s directory, fsynced.
pub fn copy_atomic(src: &FsPath, dst: &FsPath) -> Result<()> {
    let (dir, tmp) = temp_beside(dst)?;
    std::fs::copy(src, &tmp).map_err(|e| DataError::io("copy into", &tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| DataError::io("sync", &tmp, e))?;
    std::fs::rename(&tmp, dst).map_err(|e| DataError::io("rename into", dst, e))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &FsPath) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| DataError::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| DataError::io("sync directory", dir, e))
}
