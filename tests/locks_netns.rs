//! The Redis lock across a real network fault. A `redis-server` runs in a network namespace of
//! its own, reachable from the test over two veth links, path A and path B. Client A holds a
//! lock through path A; the link is cut (`ip link set <dev> down`, so packets are dropped, as
//! when a cable or a switch fails); client B, through path B, takes the lock once A's lease is
//! over. The holder must know it lost the lock before anyone else can hold it.
//!
//! Needs root and `ip` (iproute2); CI runs as root and scripts/test installs iproute2.
//! Without them the test fails and says why: it never skips.

mod support;

use std::time::{Duration, Instant};

use cachet::{
    ConcurrencyService, LockError, LockGuard, LockOptions, RedisCacheService,
    RedisConcurrencyService,
};
use futures_util::FutureExt;
use support::{Netns, RedisServer};

const KEY: &str = "netns-job";
/// A's lease: short, so that B gets the lock soon after the cut.
const LEASE: Duration = Duration::from_millis(1500);
/// Only a bound on hangs: nothing here should take more than a few seconds.
const HANG_BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {HANG_BOUND:?}"))
}

/// A lock service on its own connection to `url`, with short timeouts and fast reconnects,
/// so that it notices the cut and the repair quickly.
async fn locks_through(url: &str) -> RedisConcurrencyService {
    let redis = RedisCacheService::builder(url)
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_millis(300))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    RedisConcurrencyService::from_connection(redis)
}

/// Takes the lock, retrying while it is held or the server cannot be reached, until
/// `HANG_BOUND` has passed.
async fn acquire_within_bound(
    locks: &RedisConcurrencyService,
    options: &LockOptions,
    what: &str,
) -> LockGuard {
    let deadline = Instant::now() + HANG_BOUND;
    let mut last_error = None;
    while Instant::now() < deadline {
        match bounded(what, locks.acquire(KEY, options)).await {
            Ok(guard) => return guard,
            Err(e @ (LockError::Timeout { .. } | LockError::Backend { .. })) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: not within {HANG_BOUND:?}; last error: {last_error:?}");
}

// Current-thread runtime on purpose: between B's acquire returning and the look at A's guard
// no other task (A's lease keeper included) can run, so the look sees A's state exactly as
// it was when B got the lock.
#[tokio::test]
async fn holder_is_told_of_loss_before_another_takes_the_lock_across_a_cut_link() {
    // Declared first, so dropped last: the server and the clients go before the namespace.
    let mut netns = Netns::create();
    let path_a = netns.add_link();
    let path_b = netns.add_link();
    let server = RedisServer::start_in_netns(
        &netns,
        &[&path_a.ns_addr.to_string(), &path_b.ns_addr.to_string()],
        &[],
    );
    let url_a = format!("redis://{}:{}", path_a.ns_addr, server.port());
    let url_b = format!("redis://{}:{}", path_b.ns_addr, server.port());
    eprintln!("namespace {netns:?}; server at {url_a} and {url_b}");

    let a = locks_through(&url_a).await;
    let b = locks_through(&url_b).await;
    // Each client really comes in over its own link (the server sees the link's test-side
    // address), or cutting path A would prove nothing.
    let clients = server.cli(&["CLIENT", "LIST"]);
    for path in [&path_a, &path_b] {
        assert!(
            clients.contains(&format!("addr={}:", path.host_addr)),
            "no client from {} ({}) in CLIENT LIST:\n{clients}",
            path.host_addr,
            path.host_dev
        );
    }

    // A takes the lock; while A's service renews it, B cannot take it, even two leases on.
    let options = LockOptions::default()
        .lease(LEASE)
        .wait_timeout(Duration::from_secs(5));
    let a_guard = bounded("A's acquire", a.acquire(KEY, &options))
        .await
        .expect("A takes the free lock");
    let a_token = a_guard.fencing_token();
    tokio::time::sleep(LEASE * 2).await;
    let try_once = options.clone().wait_timeout(Duration::ZERO);
    match bounded("B's first try", b.acquire(KEY, &try_once)).await {
        Err(LockError::Timeout { .. }) => {}
        other => panic!("B's try while A holds the lock (renewed): {other:?}"),
    }
    assert!(!a_guard.is_lost(), "A's renewed lock reported lost");

    // Cut path A: A's renewals can no longer reach the server, and the lease runs out there.
    netns.cut(&path_a);
    let cut_at = Instant::now();

    // What is checked here is an order, not a time: reported after the other checks below
    // have run, so that one run shows the order and the recovery both.
    let mut order_violations = Vec::new();
    // B retries every few ms, so it gets the lock right when the server lets the lease go:
    // the earliest moment anyone else can hold it, which is what A's state is checked at.
    let b_options = LockOptions::default()
        .lease(Duration::from_secs(10))
        .wait_timeout(Duration::from_secs(2))
        .backoff(Duration::from_millis(1), Duration::from_millis(5));
    let b_guard = acquire_within_bound(&b, &b_options, "B's acquire after the cut").await;
    // No await between B's acquire and these two looks (see the runtime note above).
    let a_lost_flag = a_guard.is_lost();
    let a_lost_resolved = a_guard.lost().now_or_never().is_some();
    let b_acquired_after = cut_at.elapsed();
    let b_token = b_guard.fencing_token();
    eprintln!(
        "B acquired {b_acquired_after:?} after the cut (token {b_token}, A's {a_token}); \
         then A's is_lost() = {a_lost_flag}, A's lost() resolved = {a_lost_resolved}"
    );
    if !a_lost_flag {
        order_violations.push(format!(
            "B acquired the lock {b_acquired_after:?} after path A was cut while A's guard \
             still reported is_lost() == false"
        ));
    }
    if !a_lost_resolved {
        order_violations
            .push("A's guard.lost() had not resolved when B acquired the lock".to_string());
    }
    assert!(
        b_token > a_token,
        "B's fencing token {b_token} is not above A's {a_token}"
    );
    if !a_lost_flag {
        // Late is a violation, never is worse: A must learn it eventually.
        bounded("A's guard.lost() after B acquired", a_guard.lost()).await;
        eprintln!(
            "A's guard reported the loss {:?} after the cut",
            cut_at.elapsed()
        );
    }
    assert!(a_guard.is_lost(), "lost() resolved but is_lost() is false");

    // B lets go; path A comes back, and A's own service recovers without a restart: it takes
    // the lock again, with a newer token.
    bounded("B's release", b_guard.release())
        .await
        .expect("B releases its lock");
    netns.restore(&path_a);
    let restored_at = Instant::now();
    let a_again = acquire_within_bound(&a, &options, "A's acquire after path A came back").await;
    eprintln!(
        "A acquired again {:?} after path A came back (token {})",
        restored_at.elapsed(),
        a_again.fencing_token()
    );
    assert!(
        a_again.fencing_token() > b_token,
        "A's new token {} is not above B's {b_token}",
        a_again.fencing_token()
    );
    assert!(!a_again.is_lost(), "A's new lock reported lost at once");
    bounded("A's release", a_again.release())
        .await
        .expect("A releases its new lock");
    // The first guard's lock has been B's and A's since: releasing it must not delete theirs.
    match bounded("A's release of the lost guard", a_guard.release()).await {
        Err(LockError::LeaseLost { .. }) => {}
        other => panic!("releasing A's lost guard: {other:?}, expected LeaseLost"),
    }

    drop((a, b));
    drop(server);
    netns.delete();
    assert!(
        order_violations.is_empty(),
        "the holder was not told it lost the lock before another holder got it:\n  {}",
        order_violations.join("\n  ")
    );
}
