// The sigma binary's build script: libtorch's link flags (build/libtorch.rs,
// shared with the trainer and the tests) and the commit the binary is built
// from, which `sigma --version` prints (`SIGMA_COMMIT`: the checkout's HEAD,
// short, with "-dirty" where a tracked file the binary is built from differs
// from it; "unknown" outside a git checkout or without git).
#[path = "../build/libtorch.rs"]
mod libtorch;

use std::path::Path;
use std::process::Command;

/// What the binary is built from, relative to the workspace: the crates it
/// links (sources, kernels, embedded assets), the shared build code, the
/// manifests and lock file, and the embedded config.
const SOURCES: [&str; 10] = [
    "Cargo.toml",
    "Cargo.lock",
    "build",
    "data/src",
    "data/Cargo.toml",
    "trainer",
    "launch/src",
    "launch/build.rs",
    "launch/Cargo.toml",
    "configs/sigma-1.5b.toml",
];

fn main() {
    libtorch::link();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    // Only the workspace's own checkout (not a repository it was unpacked into).
    let own = git(&["rev-parse", "--show-toplevel"])
        .and_then(|t| Path::new(&t).canonicalize().ok())
        .is_some_and(|t| root.canonicalize().is_ok_and(|r| r == t));
    let head = own
        .then(|| git(&["rev-parse", "--short=7", "HEAD"]))
        .flatten();
    let commit = match head {
        // Clean: `git status` succeeds and prints nothing; a failure counts
        // as changed (the binary cannot be said to be the commit's).
        Some(h) => {
            let status = Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no", "--"])
                .args(SOURCES)
                .current_dir(root)
                .output();
            match status {
                Ok(o) if o.status.success() && o.stdout.is_empty() => h,
                _ => format!("{h}-dirty"),
            }
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=SIGMA_COMMIT={commit}");
    // Built again when HEAD moves: HEAD itself, its log (a line for every
    // commit and checkout), the branches (a directory is watched whole),
    // packed refs and reftable (only paths that exist: a missing one would
    // rebuild every time); and when a source changes (dirty or clean again).
    let watch = ["HEAD", "logs/HEAD", "refs/heads", "packed-refs", "reftable"]
        .map(|p| own.then(|| git(&["rev-parse", "--git-path", p])).flatten());
    let sources = SOURCES.map(|p| own.then(|| p.to_string()));
    for p in watch.into_iter().chain(sources).flatten() {
        let p = root.join(p);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
