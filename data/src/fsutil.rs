//! Durable file writes on the local filesystem: a file is written under a
//! temporary name beside its target, fsynced, renamed over the target, and the
//! directory fsynced, so a reader (or a crash) sees either the old file or the
//! whole new one, never a half-written one. Used for manifests, checkpoints,
//! metrics and every other file sigma writes that something later trusts.

use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DataError, Result};

/// The directory `path` lives in: its parent, or `.` for a bare file name
/// (`Path::parent` gives the empty path for `s.jsonl`, which names no directory).
pub fn parent_dir(path: &FsPath) -> &FsPath {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => FsPath::new("."),
    }
}

/// Create `dir` and whatever parents it lacks. Where a file (anything but
/// a directory) stands at `dir` or at one of its ancestors, the error names
/// that path, not only `dir`; other failures are the system's.
pub fn create_dir_all(dir: &FsPath) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| match file_in_the_way(dir) {
        Some(f) => DataError::input(
            dir.display().to_string(),
            format!(
                "cannot create this directory: {} is not a directory",
                f.display()
            ),
        ),
        None => DataError::io("create directory", dir, e),
    })
}

/// The nearest of `dir` and its ancestors that exists, where it is not a
/// directory (a file in the way of creating `dir`); None where the nearest
/// existing one is a directory or none can be read.
pub fn file_in_the_way(dir: &FsPath) -> Option<PathBuf> {
    for p in dir.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::metadata(p) {
            Ok(m) => return (!m.is_dir()).then(|| p.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // A component that is a file reads as "not a directory": keep walking up to it.
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => continue,
            Err(_) => return None,
        }
    }
    None
}

/// `path` must name a file that may be replaced: it has a file name and is not a directory.
pub fn check_file_target(path: &FsPath) -> Result<()> {
    let shown = path.display().to_string();
    if path.file_name().is_none() || shown.ends_with('/') {
        return Err(DataError::input(
            if shown.is_empty() {
                "\"\"".into()
            } else {
                shown
            },
            "not a file name: give the path of a file to write",
        ));
    }
    if path.is_dir() {
        return Err(DataError::input(
            shown,
            "is a directory: give the path of a file to write",
        ));
    }
    Ok(())
}

/// `path` may be written as a command's new output (`--output`): a file
/// name, not a directory, and not an existing file unless `overwrite`.
pub fn check_new_output(path: &FsPath, overwrite: bool) -> Result<()> {
    check_file_target(path)?;
    if !overwrite && path.symlink_metadata().is_ok() {
        return Err(DataError::flag(
            "--output",
            format!(
                "{} already exists; pass --overwrite to replace it",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// `path`'s directory (created) and a temporary name in it for writing `path`,
/// ending in `.EXT` when `ext` is given. Names are unique within the process
/// (pid and a counter), so two writers of one file never share a temporary.
fn temp_beside(path: &FsPath, ext: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    check_file_target(path)?;
    let dir = parent_dir(path).to_path_buf();
    create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut tmp = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    if let Some(ext) = ext {
        tmp.push('.');
        tmp.push_str(ext);
    }
    let tmp = dir.join(tmp);
    Ok((dir, tmp))
}

/// Write `data` to `path` so that readers see either the old file or the whole new one.
pub fn write_atomic(path: &FsPath, data: &[u8]) -> Result<()> {
    use std::io::Write;
    replace_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| DataError::io("create", tmp, e))?;
        f.write_all(data)
            .map_err(|e| DataError::io("write", tmp, e))?;
        f.sync_all().map_err(|e| DataError::io("sync", tmp, e))
    })
}

/// Write `path` with `write`, which creates the file at the path it is given
/// (a temporary name beside `path`, with `path`'s extension) and fsyncs it,
/// then rename it into place and fsync the directory; on failure the
/// temporary goes and `path` is untouched.
pub fn replace_with<E>(
    path: &FsPath,
    write: impl FnOnce(&FsPath) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<DataError>,
{
    // Keep the extension: writers that pick the format by it see the real one.
    let ext = path.extension().map(|e| e.to_string_lossy().into_owned());
    let (dir, tmp) = temp_beside(path, ext.as_deref())?;
    let r = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| DataError::io("rename into", path, e).into())
    });
    if r.is_err() {
        // Nothing half-written stays behind.
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    sync_dir(&dir).map_err(E::from)
}

/// Copy `src` to `dst` through a temporary name in `dst`'s directory, fsynced.
pub fn copy_atomic(src: &FsPath, dst: &FsPath) -> Result<()> {
    replace_with(dst, |tmp| {
        std::fs::copy(src, tmp).map_err(|e| DataError::io("copy into", tmp, e))?;
        std::fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| DataError::io("sync", tmp, e))
    })
}

/// Move the finished file `src` to `dst` (same file system) and fsync `dst`'s directory.
pub fn rename_durable(src: &FsPath, dst: &FsPath) -> Result<()> {
    let dir = parent_dir(dst);
    create_dir_all(dir)?;
    std::fs::rename(src, dst).map_err(|e| DataError::io("rename into", dst, e))?;
    sync_dir(dir)
}

/// Size and sha256 (hex) of a local file, read in pieces (memory stays small).
pub fn sha256_file(path: &FsPath) -> Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| DataError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(h.finalize())))
}

/// fsync a directory, so the renames inside it survive a crash. An empty
/// path means the current directory.
pub fn sync_dir(dir: &FsPath) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        FsPath::new(".")
    } else {
        dir
    };
    let d = std::fs::File::open(dir).map_err(|e| DataError::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| DataError::io("sync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &FsPath) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        // (Writing one is tested through the binary, which can run in its own
        // directory; the unit tests share one current directory.)
        assert_eq!(parent_dir(FsPath::new("s.jsonl")), FsPath::new("."));
        assert_eq!(parent_dir(FsPath::new("a/s.jsonl")), FsPath::new("a"));
        assert_eq!(parent_dir(FsPath::new("/s.jsonl")), FsPath::new("/"));
        sync_dir(FsPath::new("")).expect("the empty path is the current directory");
    }

    /// A file at any depth above a directory to create is named, whether
    /// it is the directory itself, its parent or further up; nothing is
    /// created; a directory in the way is no obstacle.
    #[test]
    fn a_file_in_the_way_of_a_directory_is_named() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("f.txt");
        std::fs::write(&f, b"x").expect("write");
        for (dir, blocker) in [(f.clone(), &f), (f.join("a"), &f), (f.join("a/b/c"), &f)] {
            assert_eq!(
                file_in_the_way(&dir).as_ref(),
                Some(blocker),
                "{}",
                dir.display()
            );
            let e = create_dir_all(&dir)
                .expect_err("created under a file")
                .to_string();
            assert!(
                e.starts_with(&format!("{}: ", dir.display()))
                    && e.contains(&format!("{} is not a directory", f.display())),
                "{e}"
            );
        }
        let free = d.path().join("new/deeper");
        assert_eq!(file_in_the_way(&free), None);
        create_dir_all(&free).expect("create");
        assert!(free.is_dir());
        assert_eq!(file_in_the_way(&free), None);
        assert_eq!(names(d.path()), ["f.txt", "new"]);
    }

    #[test]
    fn temporaries_keep_the_extension_and_go_away() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("p.png");
        replace_with(&p, |tmp| {
            assert!(tmp.to_string_lossy().ends_with(".png"), "{}", tmp.display());
            std::fs::write(tmp, b"png").map_err(|e| DataError::io("write", tmp, e))
        })
        .expect("replace_with");
        copy_atomic(&p, &d.path().join("c.png")).expect("copy");
        assert_eq!(names(d.path()), ["c.png", "p.png"]);
    }

    #[test]
    fn directories_and_empty_names_are_refused_before_anything_is_written() {
        let d = tempfile::tempdir().expect("tmp");
        let e = write_atomic(d.path(), b"x").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = write_atomic(FsPath::new(""), b"x").unwrap_err().to_string();
        assert!(e.contains("not a file name"), "{e}");
        assert!(names(d.path()).is_empty());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("m.json");
        write_atomic(&p, b"old").expect("write");
        let r: Result<()> = replace_with(&p, |tmp| {
            std::fs::write(tmp, b"half").expect("write");
            Err(DataError::Other("stop".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        assert_eq!(names(d.path()), ["m.json"]);
    }
}
