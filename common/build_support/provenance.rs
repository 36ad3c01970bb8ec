// Shared by the build scripts of the crates whose binaries report what they
// were built from (included with `include!`): sets `FLGFN_BUILD` for
// `env!`, as "<version> (commit <hash>)", with ", modified" when the code
// built differs from that commit, or "(commit unknown)" outside a git
// checkout. `FLGFN_BUILD_COMMIT` in the build's environment gives the
// commit instead (a build from an exported tree, not checked).
//
// The script reruns when the commit moves, or when a file it checks
// changes (`paths`: the crate's own sources and those of what it
// builds on, not its tests), so the "modified" mark is never stale and
// editing a test recompiles nothing more than it did.
#[allow(dead_code)]
fn record_provenance(paths: &[&str]) {
    use std::path::Path;
    use std::process::Command;

    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir).join("..");
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    for path in paths {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
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
    // Only this checkout's own commit: a tree copied into another
    // repository's folder would otherwise take that one's.
    let own_checkout = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| Path::new(&top).canonicalize().ok())
        .is_some_and(|top| root.canonicalize().is_ok_and(|root| root == top));
    let commit = own_checkout
        .then(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .flatten();
    let Some(commit) = commit else {
        println!("cargo:rustc-env=FLGFN_BUILD={version} (commit unknown)");
        return;
    };
    // Git's own files that move with the commit: HEAD, the branch it
    // names and the packed refs (a branch's file may be packed into them).
    // Not the index, which commands like `git status` rewrite: staging
    // does not change what the tree holds. Only files that exist: cargo
    // reruns a script for a missing path on every build.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    // Read-only: a status that refreshed the index would move it and
    // rerun this script at the next build.
    let mut status = vec![
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=normal",
        "--",
    ];
    status.extend_from_slice(paths);
    // A status that fails leaves the state unknown: say so rather than
    // claim the commit.
    let mark = match git(&status) {
        Some(changes) if changes.is_empty() => "",
        Some(_) => ", modified",
        None => ", status unknown",
    };
    println!("cargo:rustc-env=FLGFN_BUILD={version} (commit {commit}{mark})");
}
