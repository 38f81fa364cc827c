//! A network namespace joined to the test's own namespace by veth pairs, so that a test can
//! put a server behind real network paths and cut one (`ip link set <dev> down`) while
//! others stay up. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and `ip` from iproute2; without
//! either, [`Netns::create`] panics saying so: the test fails, it never skips.
//!
//! Names carry the pid and a counter, so concurrent test processes never share a namespace or
//! a device. Each link gets a random /30 in 10.213.0.0/16 that no address or route of the
//! test's namespace overlaps.
//!
//! Cleanup: dropping a `Netns` deletes its host-side devices (each takes its peer with it),
//! SIGKILLs whatever still runs inside and deletes the namespace. A watchdog (the servers'
//! mechanism, [`Watchdog`]) does the same when the test process dies without dropping it
//! (SIGKILL included).

use std::collections::HashSet;
use std::env;
use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::ports::RandomSeq;
use super::server::Watchdog;

/// Linux interface names hold at most 15 bytes (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;
/// The /16 the links' subnets come from (its first two octets): private, and unlikely to
/// be in use on a test machine.
const RANGE: [u8; 2] = [10, 213];
/// Each link is one /30: the test's side gets .1, the namespace's side .2 of it.
const LINK_PREFIX: u8 = 30;
/// How long the kernel may take to destroy a deleted namespace's devices.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

const INSTALL: &str = "install it with `apt-get install -y iproute2` (scripts/test installs it)";

/// Runs once the pipe closes: kills what runs inside the namespace, then deletes it (`$1` is
/// the `ip` binary, `$2` the namespace). The devices of a namespace go when it does.
const NETNS_WATCHDOG_SCRIPT: &str = r#"
trap '' INT HUP QUIT TERM
while read -r _line; do :; done
for pid in $("$1" netns pids "$2" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
"$1" netns del "$2" 2>/dev/null
exit 0
"#;

/// One veth pair between the test's namespace (`host_*`) and the namespace (`ns_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    /// The device in the test's own namespace.
    pub host_dev: String,
    /// Its peer, inside the namespace.
    pub ns_dev: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// A network namespace of this test process; see the module docs.
pub struct Netns {
    name: String,
    ip: PathBuf,
    links: Vec<Veth>,
    /// Every test-side device created, addressed or not (cleanup deletes them).
    host_devs: Vec<String>,
    watchdog: Option<Watchdog>,
    deleted: bool,
}

impl Netns {
    /// Creates a namespace named `cn<pid hex>-<counter hex>` with its `lo` up. Panics with
    /// the reason (no `ip`, not root, ...) if it cannot.
    pub fn create() -> Netns {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("cn{:x}-{n:x}", std::process::id());
        assert!(
            name.len() + 2 <= MAX_NAME,
            "namespace name {name} leaves no room for device names"
        );
        let ip = ip_binary();
        // The watchdog first: a test process killed right after `netns add` leaves nothing.
        let watchdog =
            Watchdog::spawn_script(NETNS_WATCHDOG_SCRIPT, &[ip.as_os_str(), OsStr::new(&name)]);
        let netns = Netns {
            name,
            ip,
            links: Vec::new(),
            host_devs: Vec::new(),
            watchdog: Some(watchdog),
            deleted: false,
        };
        if let Err(e) = netns.ip(&["netns", "add", &netns.name]) {
            panic!(
                "cannot create a network namespace, which this test needs: {e}\n\
                 It needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); this process runs with \
                 effective uid {}.",
                effective_uid().map_or("unknown".to_string(), |u| u.to_string())
            );
        }
        netns.ip_ok(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's name (for `ip netns exec <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `ip` binary in use.
    pub fn ip_binary(&self) -> &Path {
        &self.ip
    }

    /// The links added so far.
    pub fn links(&self) -> &[Veth] {
        &self.links
    }

    /// Adds a veth pair to the namespace, addresses both ends with a fresh /30 and brings
    /// them up.
    pub fn add_link(&mut self) -> Veth {
        let i = self.host_devs.len();
        let host_dev = format!("{}{i}h", self.name);
        let ns_dev = format!("{}{i}n", self.name);
        assert!(
            host_dev.len() <= MAX_NAME,
            "device name {host_dev} is longer than {MAX_NAME} bytes"
        );
        self.ip_ok(&[
            "link", "add", &host_dev, "type", "veth", "peer", "name", &ns_dev, "netns", &self.name,
        ]);
        self.host_devs.push(host_dev.clone());
        let mut random = RandomSeq::new();
        let mut tried = HashSet::new();
        for _ in 0..100 {
            let (net, host_addr, ns_addr) = random_link_subnet(&mut random);
            if !tried.insert(net) || self.overlaps_existing(net, None) {
                continue;
            }
            let host_cidr = format!("{host_addr}/{LINK_PREFIX}");
            let ns_cidr = format!("{ns_addr}/{LINK_PREFIX}");
            self.ip_ok(&["addr", "add", &host_cidr, "dev", &host_dev]);
            // Another process may have picked the same subnet between the check and the add:
            // look again, now that ours is there, and move on if so.
            if self.overlaps_existing(net, Some(&host_dev)) {
                self.ip_ok(&["addr", "flush", "dev", &host_dev]);
                continue;
            }
            self.ip_ok(&["-n", &self.name, "addr", "add", &ns_cidr, "dev", &ns_dev]);
            self.ip_ok(&["link", "set", &host_dev, "up"]);
            self.ip_ok(&["-n", &self.name, "link", "set", &ns_dev, "up"]);
            let veth = Veth {
                host_dev,
                ns_dev,
                host_addr,
                ns_addr,
                prefix_len: LINK_PREFIX,
            };
            self.links.push(veth.clone());
            return veth;
        }
        panic!(
            "no free /{LINK_PREFIX} in {}.{}.0.0/16 after 100 tries (ip -4 addr / route)",
            RANGE[0], RANGE[1]
        );
    }

    /// Cuts the link: its namespace side goes down, so packets sent either way are dropped.
    /// The test's side stays up on purpose: down, its connected route would go, and packets
    /// for the namespace's address would follow the default route out of the machine.
    pub fn cut(&self, link: &Veth) {
        self.ip_ok(&["-n", &self.name, "link", "set", &link.ns_dev, "down"]);
    }

    /// Undoes [`cut`](Self::cut).
    pub fn restore(&self, link: &Veth) {
        self.ip_ok(&["-n", &self.name, "link", "set", &link.ns_dev, "up"]);
    }

    /// Runs `program args...` inside the namespace and returns its output.
    pub fn exec(&self, program: &Path, args: &[&str]) -> Output {
        Command::new(&self.ip)
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.ip.display()))
    }

    /// Deletes the namespace now and panics if anything of it is left (the namespace, or a
    /// device that should have gone with it). Dropping does the same cleanup but only prints.
    pub fn delete(mut self) {
        let leftovers = self.cleanup();
        if !leftovers.is_empty() {
            panic!("network namespace cleanup left: {}", leftovers.join("; "));
        }
    }

    /// Deletes everything; returns what is still there afterwards.
    fn cleanup(&mut self) -> Vec<String> {
        if self.deleted {
            return Vec::new();
        }
        self.deleted = true;
        for dev in &self.host_devs {
            // Deleting one end deletes the pair; a missing device is fine.
            let _ = self.ip(&["link", "del", dev]);
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.finish(); // kills what runs inside, deletes the namespace
        }
        let mut leftovers = Vec::new();
        let listed = self.ip(&["netns", "list"]).unwrap_or_default();
        if listed
            .lines()
            .any(|line| line.split_whitespace().next() == Some(self.name.as_str()))
        {
            leftovers.push(format!("namespace {} (ip netns list)", self.name));
        }
        // A namespace's devices go when the kernel destroys it, shortly after the last
        // process in it exits.
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        for dev in &self.host_devs {
            while self.device_exists(dev) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if self.device_exists(dev) {
                leftovers.push(format!("device {dev}"));
            }
        }
        leftovers
    }

    fn device_exists(&self, dev: &str) -> bool {
        self.ip(&["link", "show", "dev", dev]).is_ok()
    }

    /// Whether `net` (a /30) overlaps an address or a route of the test's namespace, other
    /// than those on `except`.
    fn overlaps_existing(&self, net: Ipv4Addr, except: Option<&str>) -> bool {
        let addrs = self.ip_ok(&["-4", "-o", "addr", "show"]);
        let routes = self.ip_ok(&["-4", "route", "show", "table", "all"]);
        let mut taken = Vec::new();
        for line in addrs.lines() {
            // "2: eth0    inet 192.0.2.2/24 brd ... scope global eth0"
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dev = fields.get(1).map(|d| d.trim_end_matches(':'));
            if except.is_some() && dev == except {
                continue;
            }
            if let Some(i) = fields.iter().position(|f| *f == "inet")
                && let Some(prefix) = fields.get(i + 1).and_then(|f| parse_prefix(f))
            {
                taken.push(prefix);
            }
        }
        for line in routes.lines() {
            // "[type] 10.1.2.0/24 dev x ...", "default via ...": the destination is the
            // first field that parses as an address.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dev = fields
                .iter()
                .position(|f| *f == "dev")
                .and_then(|i| fields.get(i + 1).copied());
            if except.is_some() && dev == except {
                continue;
            }
            if let Some(prefix) = fields.iter().take(2).find_map(|f| parse_prefix(f)) {
                taken.push(prefix);
            }
        }
        taken
            .into_iter()
            .any(|(addr, len)| overlaps((net, LINK_PREFIX), (addr, len)))
    }

    /// Runs `ip args...`; stdout, or an error with the command and its stderr.
    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(&self.ip)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.ip.display()))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "`{} {}` failed ({}): {}",
                self.ip.display(),
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    fn ip_ok(&self, args: &[&str]) -> String {
        self.ip(args).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let leftovers = self.cleanup();
        if !leftovers.is_empty() {
            eprintln!(
                "WARNING: network namespace cleanup left: {}",
                leftovers.join("; ")
            );
        }
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

/// The `ip` binary: `$IP` if set, else `ip` on `PATH`, else /usr/sbin/ip or /sbin/ip (sbin is
/// often not on a non-root `PATH`). Panics with how to install it.
pub fn ip_binary() -> PathBuf {
    if let Some(value) = env::var_os("IP").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if is_executable(&path) {
            return path;
        }
        panic!("IP={} is not an executable file; {INSTALL}", path.display());
    }
    let on_path: Vec<PathBuf> = env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).map(|d| d.join("ip")).collect())
        .unwrap_or_default();
    let fallbacks = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].map(PathBuf::from);
    on_path
        .into_iter()
        .chain(fallbacks)
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "`ip` (iproute2) not found on PATH nor in /usr/sbin, /sbin: this test makes \
                 network namespaces with it; {INSTALL}"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The effective uid, from /proc/self/status (std has no geteuid).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A random /30 in 10.213.0.0/16: (network, the test side's address, the namespace side's).
fn random_link_subnet(random: &mut RandomSeq) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    let index = (random.next() % (1 << 14)) as u32; // 2^(30 - 16) subnets
    let base = u32::from(Ipv4Addr::new(RANGE[0], RANGE[1], 0, 0)) + index * 4;
    (
        Ipv4Addr::from(base),
        Ipv4Addr::from(base + 1),
        Ipv4Addr::from(base + 2),
    )
}

/// "a.b.c.d/len" or "a.b.c.d" (a /32).
fn parse_prefix(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, len.parse().ok().filter(|l| *l <= 32)?),
        None => (text, 32),
    };
    Some((addr.parse().ok()?, len))
}

/// Whether two prefixes share an address: the shorter one contains the other's network.
fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a.0) & mask == u32::from(b.0) & mask
}
