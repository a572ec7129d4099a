// The sigma binary's build script: libtorch's link flags (build/libtorch.rs,
// shared with the trainer and the tests) and the commit the binary is built
// from, which `sigma --version` prints (`SIGMA_COMMIT`: the checkout's HEAD,
// short; "unknown" outside a git checkout or without git). Uncommitted
// changes are not noted: build from a commit to name what a binary holds.
#[path = "../build/libtorch.rs"]
mod libtorch;

use std::path::Path;
use std::process::Command;

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
    let commit = own
        .then(|| git(&["rev-parse", "--short=7", "HEAD"]))
        .flatten()
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SIGMA_COMMIT={commit}");
    // Built again when HEAD moves: HEAD itself, its log (a line for every
    // commit and checkout), the branches (a directory is watched whole),
    // packed refs and reftable (only paths that exist: a missing one would
    // rebuild every time).
    let watch = ["HEAD", "logs/HEAD", "refs/heads", "packed-refs", "reftable"]
        .map(|p| own.then(|| git(&["rev-parse", "--git-path", p])).flatten());
    for p in watch.into_iter().flatten() {
        let p = root.join(p);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
