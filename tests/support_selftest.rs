//! Checks the test support code itself: real servers start, restart, fail over and are
//! cleaned up, including when the test process dies without unwinding.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::{RedisCluster, RedisServer, SentinelSetup, free_port, port_command};

fn process_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; count only processes that are not zombies.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            state != Some("Z")
        })
        .unwrap_or(false)
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !process_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn free_ports_are_distinct_and_bus_ports_are_free() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len());
    for p in ports {
        assert_ne!(p, 6379);
        assert!(p.checked_add(10_000).is_some());
        let reservation = std::env::temp_dir().join(format!("cachet-test-ports/{p}"));
        assert_eq!(
            std::fs::read_to_string(&reservation).unwrap(),
            std::process::id().to_string()
        );
        support::release_port(p);
        assert!(!reservation.exists());
    }
}

#[test]
fn standalone_starts_restarts_on_the_same_port_and_cleans_up() {
    let started = Instant::now();
    let server = RedisServer::start();
    eprintln!("standalone start: {:?}", started.elapsed());
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(port_command(port, &["PING"]).unwrap(), "PONG");
    assert_eq!(server.cli(&["PING"]).trim(), "PONG");
    assert_eq!(server.cli(&["SET", "k", "v"]).trim(), "OK");
    assert_eq!(server.command(&["GET", "k"]).unwrap(), "v");
    assert_eq!(
        server.info_field("server", "tcp_port"),
        Some(port.to_string())
    );

    let first_pid = server.pid().unwrap();
    let started = Instant::now();
    server.restart();
    eprintln!(
        "standalone restart (kill + start + PING): {:?}",
        started.elapsed()
    );
    assert_eq!(server.port(), port);
    assert_ne!(server.pid().unwrap(), first_pid);
    assert!(!process_alive(first_pid));
    assert_eq!(port_command(port, &["PING"]).unwrap(), "PONG");
    assert_eq!(server.command(&["GET", "k"]).unwrap(), "", "no persistence");

    server.kill();
    assert!(!server.is_running());
    assert!(port_command(port, &["PING"]).is_err());
    server.restart();
    assert!(server.is_running());

    let started = Instant::now();
    server.stop();
    eprintln!("standalone graceful stop: {:?}", started.elapsed());
    assert!(!server.is_running());
    server.restart();
    assert_eq!(port_command(port, &["PING"]).unwrap(), "PONG");

    let pid = server.pid().unwrap();
    let dir = server.dir().to_path_buf();
    drop(server);
    assert!(!process_alive(pid), "drop kills the server");
    assert!(!dir.exists(), "drop removes the temp dir");
}

#[test]
fn a_server_that_exited_is_seen_as_not_running() {
    let server = RedisServer::start();
    let _ = server.command(&["SHUTDOWN", "NOSAVE"]);
    let started = Instant::now();
    while server.is_running() {
        // A bound on a hang, not a timing check: exiting takes milliseconds.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the server never exited"
        );
        thread::sleep(Duration::from_millis(20));
    }
    server.restart();
    assert_eq!(server.command(&["PING"]).unwrap(), "PONG");
}

#[test]
fn password_and_acl_arguments_are_passed_through() {
    let server = RedisServer::start_with(
        &support::binaries::redis_server(),
        &[
            "--requirepass",
            "s3cret",
            "--user",
            "alice",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
        ],
    );
    let err = port_command(server.port(), &["GET", "k"]).unwrap_err();
    assert!(err.contains("NOAUTH"), "{err}");
    assert_eq!(server.command(&["PING"]).unwrap(), "PONG");
    assert_eq!(server.cli(&["PING"]).trim(), "PONG");
    assert_eq!(
        server
            .cli(&[
                "--user",
                "alice",
                "--pass",
                "pw",
                "--no-auth-warning",
                "ACL",
                "WHOAMI"
            ])
            .trim(),
        "alice"
    );
    server.restart();
    assert_eq!(server.command(&["PING"]).unwrap(), "PONG");
}

#[test]
fn valkey_starts_and_says_it_is_valkey() {
    let started = Instant::now();
    let server = RedisServer::start_valkey();
    eprintln!("valkey start: {:?}", started.elapsed());
    let info = server.command(&["INFO", "server"]).unwrap();
    assert!(info.contains("valkey_version:"), "{info}");
    assert_eq!(
        server.info_field("server", "server_name").as_deref(),
        Some("valkey")
    );
    eprintln!(
        "valkey_version: {:?}",
        server.info_field("server", "valkey_version")
    );
    let started = Instant::now();
    server.restart();
    eprintln!("valkey restart: {:?}", started.elapsed());
    assert_eq!(server.cli(&["PING"]).trim(), "PONG");
}

#[test]
fn shared_servers_are_one_per_binary_and_replies_convert_with_the_redis_crate() {
    let server = RedisServer::shared();
    assert!(std::ptr::eq(server, RedisServer::shared()));
    let valkey = RedisServer::shared_valkey();
    assert!(std::ptr::eq(valkey, RedisServer::shared_valkey()));
    assert_ne!(server.port(), valkey.port());
    assert_eq!(
        valkey.info_field("server", "server_name").as_deref(),
        Some("valkey")
    );

    // Keys of this test only: other tests of the binary share the server.
    let (key, list) = ("selftest:replies:string", "selftest:replies:list");
    assert_eq!(server.command(&["SET", key, "v"]).unwrap(), "OK");
    assert_eq!(
        server.query::<Option<Vec<u8>>>(&["GET", key]).unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(
        server
            .query::<Option<String>>(&["GET", "selftest:replies:missing"])
            .unwrap(),
        None
    );
    assert_eq!(
        server
            .command(&["GET", "selftest:replies:missing"])
            .unwrap(),
        ""
    );
    assert_eq!(server.command(&["RPUSH", list, "a", "b"]).unwrap(), "2");
    assert_eq!(
        server.command(&["LRANGE", list, "0", "-1"]).unwrap(),
        "a\nb"
    );
    let err = server.command(&["INCR", key]).unwrap_err();
    assert!(err.contains("not an integer"), "{err}");
    assert!(err.contains(&server.addr()), "{err}");
    let err = server.query::<i64>(&["GET", key]).unwrap_err();
    assert!(
        err.contains("GET"),
        "a reply of another type is an error: {err}"
    );

    let mut connection = server.connection().unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(key)
        .arg(list)
        .query(&mut connection)
        .unwrap();
    assert_eq!(deleted, 2);
}

#[test]
fn shared_cluster_is_ok_and_a_restarted_primary_rejoins() {
    let started = Instant::now();
    let cluster = RedisCluster::shared();
    eprintln!(
        "cluster start (3 nodes + create + ok everywhere): {:?}",
        started.elapsed()
    );
    assert!(std::ptr::eq(cluster, RedisCluster::shared()));
    let ports = cluster.ports();
    assert_eq!(
        cluster.url(),
        format!(
            "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
            ports[0], ports[1], ports[2]
        )
    );
    for i in 0..3 {
        let info = cluster.node(i).command(&["CLUSTER", "INFO"]).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
    }
    // A write through redis-cli in cluster mode lands on its slot's owner.
    assert_eq!(
        cluster.node(0).cli(&["-c", "SET", "{a}x", "1"]).trim(),
        "OK"
    );
    assert_eq!(cluster.node(2).cli(&["-c", "GET", "{a}x"]).trim(), "1");

    for round in 0..2 {
        let started = Instant::now();
        cluster.restart_primary(1);
        eprintln!(
            "cluster restart_primary(1) until ok, round {round}: {:?}",
            started.elapsed()
        );
    }
    cluster.health().unwrap();
    let nodes = cluster.node(1).command(&["CLUSTER", "NODES"]).unwrap();
    let myself = nodes.lines().find(|l| l.contains("myself")).unwrap();
    assert!(myself.contains("master"), "{myself}");
    assert!(
        myself.split_whitespace().count() > 8,
        "keeps its slots: {myself}"
    );

    // Kill, let the others mark it as failed, then restart: the slow path.
    let started = Instant::now();
    cluster.node(2).kill();
    while !cluster
        .node(0)
        .command(&["CLUSTER", "INFO"])
        .unwrap()
        .contains("cluster_state:fail")
    {
        // A bound on a hang, not a timing check: the failure is seen within about 2 s.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the cluster never noticed the dead node"
        );
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "cluster: node 2 killed -> cluster_state:fail after {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    cluster.node(2).restart();
    cluster.wait_ok();
    eprintln!(
        "cluster: node 2 restarted after FAIL -> ok after {:?}",
        started.elapsed()
    );
}

#[test]
fn valkey_cluster_starts() {
    let started = Instant::now();
    let cluster = RedisCluster::start_valkey();
    eprintln!("valkey cluster start: {:?}", started.elapsed());
    let started = Instant::now();
    cluster.restart_primary(0);
    eprintln!("valkey cluster restart_primary(0): {:?}", started.elapsed());
    let pids: Vec<u32> = cluster.nodes().iter().map(|n| n.pid().unwrap()).collect();
    drop(cluster);
    for pid in pids {
        assert!(!process_alive(pid));
    }
}

#[test]
fn sentinel_fails_over_to_the_replica() {
    let started = Instant::now();
    let setup = SentinelSetup::start();
    eprintln!("sentinel setup start: {:?}", started.elapsed());
    assert_eq!(
        setup.url(),
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName=mymaster",
            setup.sentinel().port()
        )
    );
    assert_eq!(setup.service_name(), "mymaster");
    assert_eq!(setup.current_primary_port(), Some(setup.primary().port()));
    setup.primary().command(&["SET", "k", "v"]).unwrap();
    // Replication is asynchronous: a write just before the kill can be lost, so wait until
    // the replica has it. (WAIT would not do: `command` opens a new connection per call, and
    // WAIT on a connection that wrote nothing returns at once.)
    let started = Instant::now();
    while setup.replica().command(&["GET", "k"]).unwrap() != "v" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "write not replicated"
        );
        thread::sleep(Duration::from_millis(10));
    }

    let started = Instant::now();
    let new_port = setup.kill_primary_and_wait_failover();
    eprintln!(
        "sentinel failover (kill -> replica named primary): {:?}",
        started.elapsed()
    );
    assert_eq!(new_port, setup.replica().port());
    assert_eq!(setup.current_primary_port(), Some(new_port));
    assert_eq!(
        setup.replica().command(&["GET", "k"]).unwrap(),
        "v",
        "\n{}\n{}\n{}",
        setup.sentinel().log_tail(60),
        setup.replica().log_tail(60),
        setup.primary().log_tail(30)
    );
    setup.replica().command(&["SET", "k2", "v2"]).unwrap();

    // The old primary comes back and the sentinel turns it into a replica of the new one.
    setup.primary().restart();
    let started = Instant::now();
    while setup.primary().info_field("replication", "master_port") != Some(new_port.to_string()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "old primary not reconfigured\n{}\n{}\n{}",
            setup.sentinel().log_tail(40),
            setup.primary().log_tail(20),
            setup.replica().log_tail(20)
        );
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "sentinel: old primary reconfigured as replica after {:?}",
        started.elapsed()
    );
}

/// Run only as a child of `watchdog_cleans_up_after_a_killed_test_process`.
#[test]
fn child_process_holding_servers() {
    if std::env::var_os("CACHET_SUPPORT_SELFTEST_CHILD").is_none() {
        return;
    }
    let server = RedisServer::start();
    let cluster = RedisCluster::shared();
    let mut pids = vec![server.pid().unwrap()];
    pids.extend(cluster.nodes().iter().map(|n| n.pid().unwrap()));
    let mut dirs = vec![server.dir().display().to_string()];
    dirs.extend(
        cluster
            .nodes()
            .iter()
            .map(|n| n.dir().display().to_string()),
    );
    println!(
        "PIDS {}",
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("DIRS {}", dirs.join(" "));
    thread::sleep(Duration::from_secs(120));
}

#[test]
fn watchdog_cleans_up_after_a_killed_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_holding_servers",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CACHET_SUPPORT_SELFTEST_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids: Vec<u32> = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The harness prints "test <name> ... " before the test's own output.
        if let Some((_, rest)) = line.split_once("PIDS ") {
            pids = rest.split(' ').map(|p| p.parse().unwrap()).collect();
        } else if let Some((_, rest)) = line.split_once("DIRS ") {
            dirs = rest.split(' ').map(str::to_string).collect();
            break;
        }
    }
    assert_eq!(pids.len(), 4, "child did not report its servers");
    for &pid in &pids {
        assert!(process_alive(pid));
    }
    child.kill().unwrap(); // SIGKILL: no unwinding, no Drop, no atexit
    child.wait().unwrap();
    let started = Instant::now();
    for &pid in &pids {
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "server {pid} survived its test process"
        );
    }
    eprintln!(
        "watchdog: servers of a SIGKILLed test process gone after {:?}",
        started.elapsed()
    );
    for dir in &dirs {
        let started = Instant::now();
        while Path::new(dir).exists() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{dir} left behind"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The URLs parse with fred 10 and reach the servers: a client on each SETs and GETs.
#[tokio::test]
async fn fred_connects_with_the_urls() {
    use fred::prelude::*;

    async fn round_trip(url: &str, key: &str) {
        let config = Config::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        let client = Builder::from_config(config).build().unwrap();
        client.init().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let _: () = client.set(key, "v", None, None, false).await.unwrap();
        let value: Option<String> = client.get(key).await.unwrap();
        assert_eq!(value.as_deref(), Some("v"), "{url}");
        client.quit().await.unwrap();
    }

    let server = RedisServer::start();
    round_trip(&server.url(), "fred-standalone").await;

    let cluster = RedisCluster::shared();
    let config = Config::from_url(&cluster.url()).unwrap();
    match &config.server {
        ServerConfig::Clustered { hosts, .. } => assert_eq!(hosts.len(), 3),
        other => panic!("not a cluster config: {other:?}"),
    }
    for key in ["{a}fred", "{b}fred", "{c}fred"] {
        round_trip(&cluster.url(), key).await;
    }

    let setup = tokio::task::spawn_blocking(SentinelSetup::start)
        .await
        .unwrap();
    let config = Config::from_url(&setup.url()).unwrap();
    match &config.server {
        ServerConfig::Sentinel {
            hosts,
            service_name,
            ..
        } => {
            assert_eq!(service_name, "mymaster");
            assert_eq!(hosts.len(), 1);
            assert_eq!(hosts[0].port, setup.sentinel().port());
        }
        other => panic!("not a sentinel config: {other:?}"),
    }
    assert_eq!(config.database, Some(0));
    round_trip(&setup.url(), "fred-sentinel").await;
    assert_eq!(
        setup.primary().command(&["GET", "fred-sentinel"]).unwrap(),
        "v"
    );
}
