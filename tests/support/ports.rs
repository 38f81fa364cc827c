//! Free loopback ports.

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::fs::{self, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Offset of the Redis Cluster bus port from the client port (Redis' default).
pub(crate) const CLUSTER_BUS_OFFSET: u16 = 10_000;

/// A port `P` on 127.0.0.1 that is free now, and so is `P + 10000` (a Redis Cluster node's bus
/// port), so every port it returns can host a cluster node.
///
/// Ports are picked at random below the kernel's ephemeral range (both `P` and `P + 10000`),
/// so an outgoing connection's local port can never take one between this check and the
/// server's bind, nor while a killed server waits to be restarted on it. A port is never
/// handed out twice in one test process, and it is reserved across processes (test binaries
/// run side by side, or another checkout's tests) by a file `<temp dir>/cachet-test-ports/<P>`
/// holding the owner's pid, for `P` and `P + 10000`; a reservation whose process is gone is
/// taken over. [`release_port`] (called when a `RedisServer` is dropped) gives it back. If the
/// ephemeral range leaves no room, it falls back to asking the kernel (`bind 127.0.0.1:0`). A
/// process that does not use this code can still take a port before the server binds it:
/// `RedisServer` retries a start that fails with "Address already in use" on a new port.
pub fn free_port() -> u16 {
    let mut handed_out = handed_out().lock().unwrap_or_else(|e| e.into_inner());

    let ephemeral_low = ephemeral_low();
    let low: u32 = 12_000;
    let high: u32 = u32::from(ephemeral_low).saturating_sub(u32::from(CLUSTER_BUS_OFFSET));
    if high > low + 1_000 {
        let mut random = RandomSeq::new();
        for _ in 0..500 {
            let port = (low + (random.next() % u64::from(high - low)) as u32) as u16;
            if usable(port, &handed_out) && reserve(port) {
                handed_out.insert(port);
                return port;
            }
        }
    }
    for _ in 0..500 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        if port <= u16::MAX - CLUSTER_BUS_OFFSET && usable(port, &handed_out) && reserve(port) {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port P with P+{CLUSTER_BUS_OFFSET} also free after 1000 tries");
}

/// Drops this process's cross-process reservation of `port` (and of `port + 10000`). The port
/// is still never handed out again by this process.
pub fn release_port(port: u16) {
    for path in reservation_files(port) {
        if fs::read_to_string(&path).ok().as_deref() == Some(my_pid().as_str()) {
            let _ = fs::remove_file(path);
        }
    }
}

/// The files that reserve `port` and `port + 10000` across processes.
pub(crate) fn reservation_files(port: u16) -> Vec<PathBuf> {
    [port, port + CLUSTER_BUS_OFFSET]
        .iter()
        .map(|p| reservation_dir().join(p.to_string()))
        .collect()
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    HANDED_OUT.get_or_init(|| {
        remove_stale_reservations();
        Mutex::new(HashSet::new())
    })
}

/// Removes the reservations of processes that are gone (the watchdogs remove those of
/// servers; this catches ports taken with `free_port()` alone).
fn remove_stale_reservations() {
    let Ok(entries) = fs::read_dir(reservation_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let owner = fs::read_to_string(&path).unwrap_or_default();
        if owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        {
            let _ = fs::remove_file(path);
        }
    }
}

fn usable(port: u16, handed_out: &HashSet<u16>) -> bool {
    let bus = port + CLUSTER_BUS_OFFSET;
    !handed_out.contains(&port)
        && !handed_out.contains(&bus)
        && handed_out
            .iter()
            .all(|&p| p + CLUSTER_BUS_OFFSET != port && p + CLUSTER_BUS_OFFSET != bus)
        && is_free(port)
        && is_free(bus)
}

fn reservation_dir() -> PathBuf {
    std::env::temp_dir().join("cachet-test-ports")
}

fn my_pid() -> String {
    std::process::id().to_string()
}

/// Reserves `port` and `port + 10000` across processes; false if another live process holds
/// either.
fn reserve(port: u16) -> bool {
    let dir = reservation_dir();
    if fs::create_dir_all(&dir).is_err() {
        return true; // no shared dir: rely on the bind checks and the start retries
    }
    let bus = port + CLUSTER_BUS_OFFSET;
    if !reserve_one(&dir, port) {
        return false;
    }
    if !reserve_one(&dir, bus) {
        let _ = fs::remove_file(dir.join(port.to_string()));
        return false;
    }
    true
}

fn reserve_one(dir: &Path, port: u16) -> bool {
    let path = dir.join(port.to_string());
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => return file.write_all(my_pid().as_bytes()).is_ok(),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let owner = fs::read_to_string(&path).unwrap_or_default();
                let stale = owner
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if !stale {
                    return false;
                }
                let _ = fs::remove_file(&path);
            }
            Err(_) => return true, // cannot write there: rely on the bind checks
        }
    }
    false
}

fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The low end of the kernel's ephemeral port range (32768 if it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(32_768)
}

/// Random numbers from std only (a randomly keyed hasher over a counter).
pub(crate) struct RandomSeq {
    state: RandomState,
    counter: u64,
}

impl RandomSeq {
    pub(crate) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            state: RandomState::new(),
            counter: nanos ^ u64::from(std::process::id()).rotate_left(32),
        }
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        let mut hasher = self.state.build_hasher();
        hasher.write_u64(self.counter);
        hasher.finish()
    }
}
