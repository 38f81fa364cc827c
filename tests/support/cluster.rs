//! A 3-primary Redis Cluster (no replicas) on free loopback ports.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::binaries;
use super::server::{Launch, RedisServer, info_value};

/// How long the cluster may take to reach `cluster_state:ok` on every node.
const OK_TIMEOUT: Duration = Duration::from_secs(20);

/// `cluster-node-timeout` in ms. It bounds how long a restarted primary takes to be accepted
/// again (its rejoin delay is this value, clamped to 500..5000 ms, and a primary that was
/// marked FAIL is cleared after twice this value); lower is faster, but too low makes a busy
/// 2-core machine flag healthy nodes as failing.
const NODE_TIMEOUT_MS: u32 = 1000;

/// Three cluster primaries, each a [`RedisServer`] started with `--cluster-enabled yes
/// --cluster-config-file nodes.conf --cluster-node-timeout 1000`, joined with
/// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`.
///
/// Keys do not survive a node restart (no persistence).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// One cluster per test binary, started on first use and shared by all its tests; its
    /// processes die when the test process ends (see the watchdog in [`RedisServer`]).
    ///
    /// Tests that kill or restart nodes should use a private [`start`](Self::start)ed
    /// cluster instead, since other tests run against the shared one in parallel.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(RedisCluster::start)
    }

    /// Starts a private Redis cluster (`redis-server`) and waits until it is healthy.
    pub fn start() -> Self {
        Self::start_with(&binaries::redis_server())
    }

    /// Starts a private Valkey cluster (`valkey-server`) and waits until it is healthy.
    pub fn start_valkey() -> Self {
        Self::start_with(&binaries::valkey_server())
    }

    /// Starts a private cluster of `binary` nodes and waits until it is healthy.
    pub fn start_with(binary: &Path) -> Self {
        let node_timeout = NODE_TIMEOUT_MS.to_string();
        let label = format!(
            "{}-cluster",
            binary
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::launch(Launch {
                    label: label.clone(),
                    binary: binary.to_path_buf(),
                    config: None,
                    leading_args: Vec::new(),
                    extra_args: [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        &node_timeout,
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                })
            })
            .collect();
        let cluster = RedisCluster { nodes };

        let cli = binaries::redis_cli();
        let output = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(cluster.nodes.iter().map(RedisServer::addr))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli.display()));
        if !output.status.success() {
            panic!(
                "redis-cli --cluster create {:?} failed ({}):\n{}\n{}\n{}",
                cluster.ports(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                cluster.logs()
            );
        }
        cluster.wait_ok();
        cluster
    }

    /// fred's cluster URL:
    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let others: Vec<String> = self.nodes[1..]
            .iter()
            .map(|n| format!("node={}", n.addr()))
            .collect();
        format!(
            "redis-cluster://{}?{}",
            self.nodes[0].addr(),
            others.join("&")
        )
    }

    /// The client ports of the nodes, in node order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// Node `i` (0, 1 or 2). Each is a primary when the cluster is created.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// SIGKILLs node `i` and starts it again on the same port with the same dir (so with the
    /// same `nodes.conf`: it rejoins as itself, with its slots, and without its keys), then
    /// waits until the cluster is healthy again.
    pub fn restart_primary(&self, i: usize) {
        self.nodes[i].restart();
        self.wait_ok();
    }

    /// Waits (at most 20 s) until every node is running and reports `cluster_state:ok`, all
    /// 16384 slots ok and 3 known nodes, and sees no node flagged `fail` or `fail?` and no
    /// disconnected link in `CLUSTER NODES`; panics with the nodes' views and logs otherwise.
    pub fn wait_ok(&self) {
        let started = Instant::now();
        loop {
            match self.health() {
                Ok(()) => return,
                Err(problem) if started.elapsed() > OK_TIMEOUT => panic!(
                    "cluster {:?} not healthy after {OK_TIMEOUT:?}: {problem}\n{}",
                    self.ports(),
                    self.logs()
                ),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `Ok` if every node is up and agrees that the cluster is fine, else what is wrong.
    pub fn health(&self) -> Result<(), String> {
        for node in &self.nodes {
            if !node.is_running() {
                return Err(format!("{} is not running", node.addr()));
            }
            let info = node.command(&["CLUSTER", "INFO"])?;
            for (field, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_ok", "16384"),
                ("cluster_known_nodes", "3"),
            ] {
                let got = info_value(&info, field);
                if got.as_deref() != Some(want) {
                    return Err(format!("{}: {field} is {got:?}", node.addr()));
                }
            }
            let nodes = node.command(&["CLUSTER", "NODES"])?;
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (Some(flags), Some(link)) = (fields.get(2), fields.get(7)) else {
                    continue;
                };
                if flags.split(',').any(|f| f == "fail" || f == "fail?") || *link != "connected" {
                    return Err(format!("{} sees: {line}", node.addr()));
                }
            }
        }
        Ok(())
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.log_tail(20))
            .collect::<Vec<_>>()
            .join("")
    }
}
