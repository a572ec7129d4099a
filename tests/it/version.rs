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
    // names its HEAD, with "-dirty" only where a tracked file differs (the
    // build script looks at the binary's sources only, so a change to the
    // docs alone leaves it clean); "unknown" only where git cannot tell.
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(repo_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=7", "HEAD"]) else {
        assert_eq!(commit, "unknown");
        return;
    };
    let changed = git(&["status", "--porcelain", "--untracked-files=no"])
        .expect("git status in the checkout");
    if changed.is_empty() {
        assert_eq!(
            commit, head,
            "the binary's commit against the clean checkout's HEAD"
        );
    } else {
        let dirty = format!("{head}-dirty");
        assert!(
            commit == head || commit == dirty,
            "the binary's commit {commit:?} against the changed checkout's HEAD {head}"
        );
    }
}
