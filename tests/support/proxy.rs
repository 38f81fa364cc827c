//! A TCP proxy on a free loopback port in front of one server, for faults that a server
//! cannot make by itself: a connection whose replies arrive late (one connection only, the
//! others untouched), whose replies are lost (the server ran the command, the client never
//! hears), or that goes silent without closing (a half-open connection: the client hears
//! nothing, not even that the server closed its side).
//!
//! Connections are numbered in the order they were accepted, from 0. Each is forwarded by two
//! threads (one per direction) in chunks; a chunk from the server waits out the connection's
//! delay before it is written to the client.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::ports::free_port;

/// What the proxy does to one connection.
#[derive(Default)]
struct Link {
    /// Milliseconds every server → client chunk waits.
    delay_ms: AtomicU64,
    /// Forward nothing in either direction and close nothing (the client cannot tell).
    frozen: AtomicBool,
    /// Swallow what the server sends (a close still goes through): the server ran a
    /// command whose reply the client never gets.
    drop_replies: AtomicBool,
    closed: AtomicBool,
}

pub struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    stopped: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `127.0.0.1:target`.
    pub fn start(target: u16) -> Proxy {
        let port = free_port();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("proxy bind");
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        {
            let (links, stopped) = (Arc::clone(&links), Arc::clone(&stopped));
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    let link = Arc::new(Link::default());
                    links.lock().unwrap().push(Arc::clone(&link));
                    forward(&client, &server, Arc::clone(&link), false);
                    forward(&server, &client, link, true);
                }
            });
        }
        Proxy {
            port,
            links,
            stopped,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    fn link(&self, connection: usize) -> Arc<Link> {
        let links = self.links.lock().unwrap();
        Arc::clone(
            links
                .get(connection)
                .unwrap_or_else(|| panic!("no connection {connection}: {} so far", links.len())),
        )
    }

    /// Every later server → client chunk on `connection` waits `delay`.
    pub fn delay_replies(&self, connection: usize, delay: Duration) {
        self.link(connection)
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Every later server → client chunk on `connection` is thrown away; a close still
    /// reaches the client.
    pub fn drop_replies(&self, connection: usize) {
        self.link(connection)
            .drop_replies
            .store(true, Ordering::SeqCst);
    }

    /// `connection` goes silent both ways and stays open: what the server closes, the client
    /// does not hear of.
    pub fn freeze(&self, connection: usize) {
        self.link(connection).frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        for link in self.links.lock().unwrap().iter() {
            link.closed.store(true, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes (unless frozen:
/// then it stops copying and leaves both open).
fn forward(from: &TcpStream, to: &TcpStream, link: Arc<Link>, replies: bool) {
    let (mut from, mut to) = (
        from.try_clone().expect("clone"),
        to.try_clone().expect("clone"),
    );
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if link.frozen.load(Ordering::SeqCst) {
                // Swallow everything; never close.
                while !link.closed.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            if replies && link.drop_replies.load(Ordering::SeqCst) {
                continue;
            }
            if replies {
                let delay = link.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    thread::sleep(Duration::from_millis(delay));
                }
            }
            if to.write_all(&buf[..n]).is_err() || link.closed.load(Ordering::SeqCst) {
                break;
            }
        }
        if !link.frozen.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        }
    });
}
