//! What a binary says about itself: `sigma --version` names the package's
//! version and the commit it was built from, so a figure measured with a
//! binary on another machine can name the commit it ran (a GPU machine's
//! checkout may name another: docs/gpu-checks.md).

use sigma_tests::*;

#[test]
fn the_version_names_the_commit_the_binary_was_built_from() {
    let o = sigma(&["--version"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let want_version = format!("sigma {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(out.starts_with(&want_version), "{out}");
    let commit = out
        .trim()
        .strip_prefix(&want_version)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no commit in {out:?}"));
    // The tests build the binary from this checkout (scripts/test.sh), so it
    // names its HEAD; "unknown" only where git cannot tell.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(h) => assert_eq!(commit, h, "the binary's commit against the checkout's HEAD"),
        None => assert_eq!(commit, "unknown"),
    }
}
