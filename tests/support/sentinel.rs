//! One primary, one replica and one sentinel watching them, on free loopback ports.

use std::collections::HashMap;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::binaries;
use super::server::{Launch, RedisServer};

const SERVICE_NAME: &str = "mymaster";
/// How long the replica and the sentinel may take to see each other at startup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a failover may take, from killing the primary to the sentinel naming the replica.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// The sentinel's `down-after-milliseconds`.
const DOWN_AFTER_MS: u32 = 3000;

/// A primary, a replica (`--replicaof 127.0.0.1 <primary port>`) and a sentinel
/// (`redis-server <conf> --sentinel`) configured with
///
/// ```text
/// sentinel resolve-hostnames no
/// sentinel monitor mymaster 127.0.0.1 <primary port> 1
/// sentinel down-after-milliseconds mymaster 3000
/// sentinel failover-timeout mymaster 5000
/// ```
///
/// `start()` returns once the replica is in sync and the sentinel lists it with an ok link.
///
/// With one sentinel and a quorum of 1, a server that misses PINGs for `down-after` is failed
/// over at once. 1 s was too short on a loaded 2-core CI machine: right after a failover, the
/// sentinel's fresh link to the promoted replica went unanswered for a second, and it failed
/// back to the restarted old primary. 3 s makes that rare and costs 2 s per deliberate
/// failover.
#[derive(Debug)]
pub struct SentinelSetup {
    primary: RedisServer,
    replica: RedisServer,
    sentinel: RedisServer,
}

impl SentinelSetup {
    /// Starts the three `redis-server` processes and waits until the sentinel knows the
    /// primary and the replica.
    pub fn start() -> Self {
        Self::start_with(&binaries::redis_server())
    }

    /// The same with `valkey-server` for all three.
    pub fn start_valkey() -> Self {
        Self::start_with(&binaries::valkey_server())
    }

    /// The same with `binary` for all three processes.
    pub fn start_with(binary: &Path) -> Self {
        // No 5 s pause before a full sync (the default `repl-diskless-sync-delay`), on both,
        // since after a failover the replica is the one that feeds the old primary.
        let no_sync_delay = ["--repl-diskless-sync-delay", "0"];
        let primary = RedisServer::start_with(binary, &no_sync_delay);
        let primary_port = primary.port().to_string();
        let replica = RedisServer::start_with(
            binary,
            &[
                &no_sync_delay[..],
                &["--replicaof", "127.0.0.1", &primary_port],
            ]
            .concat(),
        );
        // The sentinel finds replicas in the primary's INFO, which it reads when it connects
        // and then every 10 s: start it once the replica is in sync, so it sees it at once.
        wait_for(
            SETUP_TIMEOUT,
            "the replica in sync with the primary",
            || {
                replica
                    .info_field("replication", "master_link_status")
                    .as_deref()
                    == Some("up")
            },
            || format!("{}{}", primary.log_tail(15), replica.log_tail(15)),
        );
        let config = format!(
            "sentinel resolve-hostnames no\n\
             sentinel monitor {SERVICE_NAME} 127.0.0.1 {primary_port} 1\n\
             sentinel down-after-milliseconds {SERVICE_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {SERVICE_NAME} 5000\n"
        );
        let sentinel = RedisServer::launch(Launch {
            label: "sentinel".to_string(),
            binary: binary.to_path_buf(),
            config: Some(config),
            leading_args: vec!["--sentinel".to_string()],
            extra_args: Vec::new(),
        });
        let setup = SentinelSetup {
            primary,
            replica,
            sentinel,
        };
        setup.wait_until(SETUP_TIMEOUT, "replica known to the sentinel", |s| {
            s.sentinel_sees_replica()
        });
        setup
    }

    /// fred's sentinel URL:
    /// `redis-sentinel://127.0.0.1:<sentinel port>/0?sentinelServiceName=mymaster`.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SERVICE_NAME}",
            self.sentinel.port()
        )
    }

    /// The monitored service's name, `mymaster`.
    pub fn service_name(&self) -> &'static str {
        SERVICE_NAME
    }

    /// The server started as the primary (after a failover, no longer the primary).
    pub fn primary(&self) -> &RedisServer {
        &self.primary
    }

    /// The server started as the replica (the primary after a failover).
    pub fn replica(&self) -> &RedisServer {
        &self.replica
    }

    /// The sentinel.
    pub fn sentinel(&self) -> &RedisServer {
        &self.sentinel
    }

    /// The primary's port as the sentinel reports it (`SENTINEL get-master-addr-by-name`).
    pub fn current_primary_port(&self) -> Option<u16> {
        let (_host, port) = self
            .sentinel
            .query::<Option<(String, u16)>>(&["SENTINEL", "get-master-addr-by-name", SERVICE_NAME])
            .ok()??;
        Some(port)
    }

    /// SIGKILLs the primary and waits (at most 30 s) until the sentinel reports the replica's
    /// port as the primary's, has ended the failover (no `failover_in_progress` flag), and the
    /// replica says it is a master; returns that port.
    ///
    /// Waiting for the end matters to a caller that restarts the old primary next: restarted
    /// while the sentinel is still reconfiguring, it races the switch of the monitored address.
    pub fn kill_primary_and_wait_failover(&self) -> u16 {
        self.primary.kill();
        let new_port = self.replica.port();
        self.wait_until(FAILOVER_TIMEOUT, "the failover to the replica", |s| {
            s.current_primary_port() == Some(new_port)
                && s.master_flags().as_deref() == Some("master")
                && s.replica.info_field("replication", "role").as_deref() == Some("master")
        });
        new_port
    }

    /// The `flags` field of `SENTINEL master mymaster`: `master` when it is up and no
    /// failover is running.
    fn master_flags(&self) -> Option<String> {
        let mut fields = self
            .sentinel
            .query::<HashMap<String, String>>(&["SENTINEL", "master", SERVICE_NAME])
            .ok()?;
        fields.remove("flags")
    }

    fn sentinel_sees_replica(&self) -> bool {
        let Ok(replicas) = self.sentinel.query::<Vec<HashMap<String, String>>>(&[
            "SENTINEL",
            "replicas",
            SERVICE_NAME,
        ]) else {
            return false;
        };
        let port = self.replica.port().to_string();
        replicas.iter().any(|fields| {
            let get = |name: &str| fields.get(name).map(String::as_str);
            get("port") == Some(port.as_str())
                && get("flags") == Some("slave")
                && get("master-link-status") == Some("ok")
        })
    }

    fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        wait_for(
            timeout,
            what,
            || done(self),
            || {
                format!(
                    "sentinel says: {:?}\n{}{}{}",
                    self.sentinel
                        .command(&["SENTINEL", "master", SERVICE_NAME])
                        .map(|s| s.replace('\n', " ")),
                    self.sentinel.log_tail(30),
                    self.primary.log_tail(15),
                    self.replica.log_tail(15)
                )
            },
        );
    }
}

/// Polls `done` every 50 ms; panics with `context()` if it is still false after `timeout`.
fn wait_for(timeout: Duration, what: &str, done: impl Fn() -> bool, context: impl Fn() -> String) {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > timeout {
            panic!("sentinel setup: no {what} after {timeout:?}\n{}", context());
        }
        thread::sleep(Duration::from_millis(50));
    }
}
