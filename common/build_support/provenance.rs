// Shared by the build scripts of the crates whose binaries report what they
// were built from (included with `include!`): sets `FLGFN_BUILD` for
// `env!`, as "<version> (commit <hash>)", with ", modified" when the code
// built differs from that commit, or "(commit unknown)" outside a git
// checkout. `FLGFN_BUILD_COMMIT` in the build's environment gives the
// commit instead, unchecked (a build from an exported tree).
//
// The script reruns when HEAD moves (its reflog, which every commit,
// checkout and reset appends to, in this worktree), or when a file it
// checks changes or goes (`paths`: the crate's own sources and those of
// what it builds on, not its tests: `record_provenance_of`). Files are watched one by one, tracked
// ones and untracked Rust, proto and TOML files, so an editor's swap file
// neither marks the build nor reruns it, and editing a test rebuilds
// nothing more than it did.
include!("git.rs");

#[allow(dead_code)]
fn record_provenance_of(krate: &str) {
    let own = [
        format!("{krate}/src"),
        format!("{krate}/Cargo.toml"),
        format!("{krate}/build.rs"),
    ];
    // What every crate builds on: common (its sources and build support),
    // the protocol and the workspace's manifest and lock.
    let shared = [
        "common/src",
        "common/Cargo.toml",
        "common/build.rs",
        "common/build_support",
        "proto",
        "Cargo.toml",
        "Cargo.lock",
    ];
    let paths: Vec<&str> = own.iter().map(String::as_str).chain(shared).collect();
    record_provenance(&paths);
}

#[allow(dead_code)]
fn record_provenance(paths: &[&str]) {
    use std::path::Path;

    println!("cargo:rerun-if-env-changed=FLGFN_BUILD_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    if let Ok(commit) = std::env::var("FLGFN_BUILD_COMMIT")
        && !commit.trim().is_empty()
    {
        println!(
            "cargo:rustc-env=FLGFN_BUILD={version} (commit {})",
            commit.trim()
        );
        return;
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir).join("..");
    let git = |args: &[&str]| git_in(&root, args);
    let Some(commit) = own_commit(&root) else {
        println!("cargo:rustc-env=FLGFN_BUILD={version} (commit unknown)");
        return;
    };
    // Git's files that move with HEAD, in this worktree: HEAD itself, its
    // reflog, the branch's loose ref, and the reftable folder where refs
    // are kept that way. (`--git-path` prints a path relative to the
    // checkout, or absolute: joined to it, either works, with any git.)
    // Only those that exist: cargo reruns a script for a missing path on
    // every build.
    let mut watched = vec![
        "HEAD".to_owned(),
        "logs/HEAD".to_owned(),
        "reftable".to_owned(),
    ];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in &watched {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            let path = root.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    let listed = |which: &str| -> Option<Vec<String>> {
        let mut args = vec!["ls-files", which, "--exclude-standard", "--"];
        args.extend_from_slice(paths);
        git(&args).map(|text| text.lines().map(str::to_owned).collect())
    };
    let code = |name: &String| {
        Path::new(name)
            .extension()
            .is_some_and(|ext| ext == "rs" || ext == "proto" || ext == "toml")
    };
    let tracked = listed("--cached");
    let untracked: Option<Vec<String>> =
        listed("--others").map(|names| names.into_iter().filter(code).collect());
    for name in tracked.iter().chain(untracked.iter()).flatten() {
        let path = root.join(name);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    // Read-only: a status that refreshed the index would move it for
    // nothing.
    let mut status = vec![
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
    ];
    status.extend_from_slice(paths);
    // A git that fails leaves the state unknown: say so rather than claim
    // the commit.
    let mark = match (git(&status), &tracked, &untracked) {
        (Some(changes), Some(_), Some(new)) if changes.is_empty() && new.is_empty() => "",
        (Some(_), Some(_), Some(_)) => ", modified",
        _ => ", status unknown",
    };
    println!("cargo:rustc-env=FLGFN_BUILD={version} (commit {commit}{mark})");
}
