//! Free loopback ports.

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
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
/// handed out twice in one test process. If the ephemeral range leaves no room, it falls back
/// to asking the kernel (`bind 127.0.0.1:0`). A port can still be taken by another process
/// before the server binds it: `RedisServer` retries a start that fails with "Address already
/// in use" on a new port.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    let mut handed_out = handed_out.lock().unwrap_or_else(|e| e.into_inner());

    let ephemeral_low = ephemeral_low();
    let low: u32 = 12_000;
    let high: u32 = u32::from(ephemeral_low).saturating_sub(u32::from(CLUSTER_BUS_OFFSET));
    if high > low + 1_000 {
        let mut random = RandomSeq::new();
        for _ in 0..500 {
            let port = (low + (random.next() % u64::from(high - low)) as u32) as u16;
            if usable(port, &handed_out) {
                handed_out.insert(port);
                return port;
            }
        }
    }
    for _ in 0..500 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        if port <= u16::MAX - CLUSTER_BUS_OFFSET && usable(port, &handed_out) {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port P with P+{CLUSTER_BUS_OFFSET} also free after 1000 tries");
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
