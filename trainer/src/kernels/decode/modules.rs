//! The modules of sigma's run-time compiled kernels on a device: machine
//! code that NVRTC makes for the device's compute capability, kept in a
//! cache directory between processes ([`sigma_data::env::kernel_cache_dir`],
//! `SIGMA_KERNEL_CACHE`). A file is named by the sha256 of everything
//! that went into its compile (NVRTC's version, the options with the
//! macros and the target, the whole source) and starts with a line
//! carrying that hash and the code's length and sha256, so a file is only
//! ever used for the compile that made it, and only whole; files are written whole under a temporary name and renamed
//! into place. The directory is kept within [`CACHE_BYTES`]: a process
//! that writes a file first removes the least recently used ones beyond
//! that (a file's time is renewed whenever a process loads it), and the
//! temporaries of writers that died. Each file is the code of one source,
//! macro set and device (tens to a few hundred KB), and the directory may
//! be deleted at any time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cudarc::driver::{CudaContext, CudaModule};

use super::nvrtc::{full_source, nvrtc_version, options, run_nvrtc};

/// The first line of a kernel cache file, before the machine code: the
/// format, the hash of everything that made it, and the code's length and
/// sha256 (checked before the driver, which takes no length, reads it).
fn cache_header(hash: &str, code: &[u8]) -> String {
    format!(
        "sigma kernel cache 2 {hash} {} {}\n",
        code.len(),
        sigma_data::tokenizer::sha256_hex(code)
    )
}

/// The hash naming the machine code of `text` compiled with `options` by
/// NVRTC `version`: every input of the compile, so that a different source,
/// macro, device or compiler is a different file.
fn cache_hash(version: &str, options: &[String], text: &str) -> String {
    let mut key = format!("nvrtc {version}\0");
    for o in options {
        key.push_str(o);
        key.push('\0');
    }
    key.push_str(text);
    sigma_data::tokenizer::sha256_hex(key.as_bytes())
}

/// The machine code kept in the cache file at `path` for `hash`, if the
/// file is there, was written for it, holds the code its header describes
/// (length and sha256) and that code is an ELF image (the driver takes
/// PTX text too, so anything else is refused here).
fn read_cached(path: &Path, hash: &str) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let end = bytes.iter().position(|&b| b == b'\n')?;
    let code = &bytes[end + 1..];
    let intact = bytes[..=end] == *cache_header(hash, code).as_bytes();
    let found = (intact && code.starts_with(ELF)).then(|| code.to_vec());
    if found.is_some() {
        renew(path);
    }
    found
}

/// Mark the file at `path` as just used (the last to be pruned): its
/// times set to now, which write access to the file allows (so the loads
/// of every user of a shared cache count, not only its owner's); a cache
/// that cannot be written stays as it is.
fn renew(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: an open descriptor; null times mean "now" for both.
        let _ = unsafe { nix::libc::futimens(f.as_raw_fd(), std::ptr::null()) };
    }
}

/// Whether `name` is a file of the cache (`<sha256>.cubin`, as
/// [`write_cached`] names them), or the temporary of one being written
/// (`.<sha256>.cubin.tmp-<pid>-<n>.cubin`, fsutil's); nothing else in the
/// directory is ever removed.
fn cache_file(name: &str) -> bool {
    let hex = |s: &str| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    name.strip_suffix(".cubin").is_some_and(hex)
}

fn cache_temporary(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".cubin"))
    else {
        return false;
    };
    let Some((file, tag)) = rest.split_once(".tmp-") else {
        return false;
    };
    let pid_n = tag.split_once('-');
    cache_file(file) && pid_n.is_some_and(|(p, n)| digits(p) && digits(n))
}

/// The most bytes the kernel cache directory keeps (about a thousand
/// modules): beyond it, the least recently used files are removed.
const CACHE_BYTES: u64 = 256 << 20;

/// Temporaries older than this are a dead writer's and removed.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// Bring the cache directory `dir` within `bound` bytes of cache files
/// ([`cache_file`]): when they take more, the least recently used (by
/// their time, renewed at each load) are removed until they take at most
/// three quarters of it; temporaries of cache files older than an hour go
/// too. Other files are never touched. A file another process removed
/// meanwhile counts as removed (so processes pruning at once do not
/// empty the cache between them); one that cannot be removed is skipped.
fn prune(dir: &Path, bound: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut kept: Vec<(SystemTime, u64, std::path::PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = e.metadata() else { continue };
        let time = meta.modified().unwrap_or(now);
        if cache_temporary(&name) {
            if now.duration_since(time).unwrap_or_default() > STALE_TEMPORARY {
                let _ = std::fs::remove_file(e.path());
            }
        } else if meta.is_file() && cache_file(&name) {
            kept.push((time, meta.len(), e.path()));
        }
    }
    let mut total: u64 = kept.iter().map(|k| k.1).sum();
    if total <= bound {
        return;
    }
    kept.sort();
    for (_, len, path) in kept {
        if total <= bound / 4 * 3 {
            break;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => total -= len,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
            Err(_) => {}
        }
    }
}

/// The first bytes of an ELF image, as NVRTC's machine code is.
const ELF: &[u8] = b"\x7fELF";

/// Keep `code` for `hash` at `path` (written whole, then renamed into
/// place), the directory first brought within [`CACHE_BYTES`] when this
/// process writes there the first time; a failure is a warning, once a
/// process.
fn write_cached(path: &Path, hash: &str, code: &[u8]) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    static PRUNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    if let Some(dir) = path.parent() {
        let mut pruned = PRUNED.lock().unwrap_or_else(|e| e.into_inner());
        if !pruned.iter().any(|d| d == dir) {
            pruned.push(dir.to_path_buf());
            prune(dir, CACHE_BYTES);
        }
    }
    let mut bytes = cache_header(hash, code).into_bytes();
    bytes.extend_from_slice(code);
    if let Err(e) = sigma_data::fsutil::write_atomic(path, &bytes) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "warning: the GPU kernel cache ({}) could not be written, so each process compiles its kernels again: {e}",
                path.parent().map(|d| d.display().to_string()).unwrap_or_default()
            );
        }
    }
}

/// The module of CUDA C `src` with `defines` on `ctx`, a device of compute
/// capability `arch`: machine code for that capability (`sm_XX`), from
/// the kernel cache ([`sigma_data::env::kernel_cache_dir`]) where it holds
/// the code of exactly this source, macros, capability and NVRTC (its
/// major.minor version: patch releases share files), else compiled now
/// and kept there once the driver has loaded it. NVRTC makes the machine code itself, so
/// that several threads compile in parallel (the driver's compiling of
/// PTX did not go faster in parallel threads: docs/benchmarks.md), and a
/// later process loads it without compiling. A cached file the driver refuses is compiled again and
/// replaced.
pub(crate) fn load_module(
    ctx: &Arc<CudaContext>,
    src: &str,
    defines: &[(&str, i64)],
    arch: i32,
) -> std::result::Result<Arc<CudaModule>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let load = |code: Vec<u8>| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(code));
    let text = full_source(src);
    let opts = options(defines, &format!("sm_{arch}"));
    let cached = match sigma_data::env::kernel_cache_dir() {
        Some(dir) => {
            let hash = cache_hash(&nvrtc_version()?, &opts, &text);
            Some((dir.join(format!("{hash}.cubin")), hash))
        }
        None => None,
    };
    if let Some((path, hash)) = &cached {
        if let Some(code) = read_cached(path, hash) {
            if let Ok(m) = load(code) {
                return Ok(m);
            }
        }
    }
    let code = run_nvrtc(&text, &opts, true)?;
    let module = load(code.clone()).map_err(drv)?;
    // Kept only once the driver took it.
    if let Some((path, hash)) = &cached {
        write_cached(path, hash, &code);
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input of a compile names another file; the same inputs the same one.
    #[test]
    fn the_cache_names_a_file_by_every_input_of_the_compile() {
        let opts = |a: &str, d: &str| vec![d.to_string(), format!("--gpu-architecture={a}")];
        let base = cache_hash("13.0", &opts("sm_90", "-DX=1"), "kernel text");
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            cache_hash("13.0", &opts("sm_90", "-DX=1"), "kernel text")
        );
        for other in [
            cache_hash("12.8", &opts("sm_90", "-DX=1"), "kernel text"),
            cache_hash("13.0", &opts("sm_80", "-DX=1"), "kernel text"),
            cache_hash("13.0", &opts("sm_90", "-DX=2"), "kernel text"),
            cache_hash("13.0", &opts("sm_90", "-DX=1"), "kernel text "),
            // Where one input ends and the next begins counts too.
            cache_hash(
                "13.0",
                &["-DX=1--gpu-architecture=sm_90".into()],
                "kernel text",
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    /// A kept file reads back as written, and only for its own hash and
    /// whole; a file of another hash, a header without its code, cut code,
    /// damaged code behind an intact header, no header, code that is no
    /// ELF image or a missing file read as nothing; no temporary file
    /// stays behind; an unwritable directory is a warning, not an error.
    #[test]
    fn cached_code_reads_back_only_for_its_own_hash() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (h1, h2) = ("a".repeat(64), "b".repeat(64));
        let p1 = dir.path().join("kernels").join(format!("{h1}.cubin"));
        assert_eq!(read_cached(&p1, &h1), None);
        let code = b"\x7fELF machine code".to_vec();
        write_cached(&p1, &h1, &code);
        assert_eq!(read_cached(&p1, &h1), Some(code.clone()));
        assert_eq!(read_cached(&p1, &h2), None, "another hash's file");
        let header = cache_header(&h1, &code);
        let kept = std::fs::read(&p1).expect("read");
        assert_eq!(kept, [header.as_bytes(), &code].concat());
        let cases: [(&str, Vec<u8>); 5] = [
            ("a header without its code", header.as_bytes().to_vec()),
            ("cut code", kept[..kept.len() - 1].to_vec()),
            (
                "damaged code",
                [header.as_bytes(), b"\x7fELF machine codE"].concat(),
            ),
            ("no header", code.clone()),
            (
                "not an ELF image",
                [
                    cache_header(&h1, b".version 8.0").as_bytes(),
                    b".version 8.0",
                ]
                .concat(),
            ),
        ];
        for (what, bytes) in cases {
            std::fs::write(&p1, bytes).expect("write");
            assert_eq!(read_cached(&p1, &h1), None, "{what}");
        }
        write_cached(&p1, &h1, &code);
        assert_eq!(read_cached(&p1, &h1), Some(code.clone()));
        let names: Vec<String> = std::fs::read_dir(dir.path().join("kernels"))
            .expect("the directory")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, vec![format!("{h1}.cubin")]);
        // A directory that is a file: nothing written, nothing panics.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").expect("write");
        write_cached(&blocked.join("k.cubin"), &h1, &code);
        assert_eq!(read_cached(&blocked.join("k.cubin"), &h1), None);
    }

    /// Beyond its bound the cache loses its least recently used files
    /// (a load renews a file's time) down to three quarters of the bound;
    /// within it nothing goes; stale temporaries go, fresh ones (a writer
    /// at work) and other files stay.
    #[test]
    fn the_cache_keeps_its_most_recently_used_files_within_its_bound() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let now = SystemTime::now();
        let at = |name: &str, len: usize, age_s: u64| {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![1u8; len]).expect("write");
            std::fs::File::options()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_modified(now - Duration::from_secs(age_s)))
                .expect("set the time");
            p
        };
        // Ten cache files of 100 bytes, the first the oldest.
        let files: Vec<_> = (0..10)
            .map(|i| at(&format!("{i:064x}.cubin"), 100, 1000 - 10 * i as u64))
            .collect();
        let h5 = format!("{:064x}", 5);
        let stale = at(&format!(".{h5}.cubin.tmp-1-0.cubin"), 50, 7200);
        let fresh = at(&format!(".{h5}.cubin.tmp-1-1.cubin"), 50, 10);
        // Files sigma did not write stay, however old or large.
        let others = [
            at("notes.txt", 5000, 9000),
            at("mine.cubin", 5000, 9000),
            at(&format!("{}.cubin", "A".repeat(64)), 5000, 9000),
            at(".mine.cubin.tmp-1-0.cubin", 50, 9000),
            at(&format!(".{h5}.cubin.tmp-x-0.cubin"), 50, 9000),
        ];
        prune(dir.path(), 1000);
        assert!(
            files.iter().all(|f| f.exists()),
            "within the bound nothing goes"
        );
        assert!(!stale.exists() && fresh.exists());
        assert!(others.iter().all(|f| f.exists()));
        // A load renews the oldest; over a bound of 800, down to 600.
        let h = "c".repeat(64);
        let code = b"\x7fELF code".to_vec();
        let first = dir.path().join(format!("{h}.cubin"));
        write_cached(&first, &h, &code);
        std::fs::File::options()
            .write(true)
            .open(&first)
            .and_then(|f| f.set_modified(now - Duration::from_secs(5000)))
            .expect("set the time");
        assert_eq!(read_cached(&first, &h), Some(code));
        prune(dir.path(), 800);
        let left: Vec<bool> = files.iter().map(|f| f.exists()).collect();
        // The files' 1,000 bytes and the loaded one's 162: the six oldest go
        // (562 left; five would leave 662).
        assert_eq!(std::fs::metadata(&first).map(|m| m.len()).ok(), Some(162));
        assert_eq!(
            left,
            [false, false, false, false, false, false, true, true, true, true]
        );
        assert!(first.exists(), "the file just loaded stays");
        assert!(fresh.exists() && others.iter().all(|f| f.exists()));
        assert!(cache_file(&format!("{h}.cubin")) && !cache_file("x.cubin"));
    }

    /// A process's first write to a cache directory prunes it: an old
    /// file (sparse, so the test writes nothing) taking more than the
    /// bound goes, and a second write there does not scan again.
    #[test]
    fn the_first_write_to_a_directory_prunes_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let big = dir.path().join(format!("{}.cubin", "d".repeat(64)));
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(CACHE_BYTES + 1).expect("a sparse file");
        f.set_modified(SystemTime::now() - Duration::from_secs(60))
            .expect("set the time");
        drop(f);
        let (h1, h2) = ("e".repeat(64), "f".repeat(64));
        write_cached(&dir.path().join(format!("{h1}.cubin")), &h1, b"\x7fELF 1");
        assert!(!big.exists(), "the file beyond the bound went");
        // Beyond the bound again: the same process does not prune twice.
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(CACHE_BYTES + 1).expect("a sparse file");
        drop(f);
        write_cached(&dir.path().join(format!("{h2}.cubin")), &h2, b"\x7fELF 2");
        assert!(big.exists());
        assert!(read_cached(&dir.path().join(format!("{h1}.cubin")), &h1).is_some());
        assert!(read_cached(&dir.path().join(format!("{h2}.cubin")), &h2).is_some());
    }
}
