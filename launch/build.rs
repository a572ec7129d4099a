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
    let commit = git(&["rev-parse", "--short=7", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SIGMA_COMMIT={commit}");
    // Built again when HEAD moves: HEAD itself, the branch it names, packed refs
    // (only files that exist: a missing one would rebuild every time).
    let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watch.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for p in watch.into_iter().flatten() {
        let p = root.join(p);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
