// Git as the build scripts ask it (included with `include!` by
// provenance.rs, and by the test that checks what they recorded).

/// Runs git in `root` with `args`: its output, trimmed, where it succeeds.
#[allow(dead_code)]
fn git_in(root: &std::path::Path, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The commit of the checkout whose top folder is `root`, abbreviated to
/// 12 digits; `None` outside one. Only that checkout's own: a tree copied
/// into another repository's folder would otherwise take that one's.
#[allow(dead_code)]
fn own_commit(root: &std::path::Path) -> Option<String> {
    let top = std::path::Path::new(&git_in(root, &["rev-parse", "--show-toplevel"])?)
        .canonicalize()
        .ok()?;
    if top != root.canonicalize().ok()? {
        return None;
    }
    git_in(root, &["rev-parse", "--short=12", "HEAD"])
}
