//! One `redis-server` / `valkey-server` (or sentinel) process on a free loopback port.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::binaries;
use super::client;
use super::netns::Netns;
use super::ports::{free_port, release_port, reservation_files};

/// How long a server may take to answer `PING` after its process starts.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop()` waits after SIGTERM before it SIGKILLs.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts that fail with "Address already in use" (a race with another process) are retried
/// on a new port this many times.
const START_ATTEMPTS: usize = 5;

/// How a server is launched; kept so that `restart()` runs exactly the same command.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    /// What the messages call it ("redis-server", "valkey-server", "sentinel", ...).
    pub(crate) label: String,
    pub(crate) binary: PathBuf,
    /// Written to `<dir>/server.conf` and passed as the first argument (sentinels need a
    /// writable config file).
    pub(crate) config: Option<String>,
    /// Arguments right after the config file (e.g. `--sentinel`).
    pub(crate) leading_args: Vec<String>,
    /// Arguments after the standard ones (`--requirepass x`, `--cluster-enabled yes`, ...).
    pub(crate) extra_args: Vec<String>,
}

/// Where a server listens and in which network namespace it runs; kept, like [`Launch`], so
/// that `restart()` puts it back in the same place.
#[derive(Clone, Debug)]
struct Placement {
    /// The `--bind` addresses; the first one is the address [`RedisServer::url`] names.
    bind: Vec<String>,
    /// `None`: the test process's own namespace.
    netns: Option<InNetns>,
}

/// How to run a command inside a named network namespace (`ip netns exec <name> ...`).
#[derive(Clone, Debug)]
struct InNetns {
    ip: PathBuf,
    name: String,
}

impl InNetns {
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(&self.ip);
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Placement {
    fn loopback() -> Self {
        Placement {
            bind: vec!["127.0.0.1".to_string()],
            netns: None,
        }
    }
}

/// One server process on 127.0.0.1, on a port of its own, with its own temp dir (data dir,
/// log, and config file if any). [`start_in_netns`](Self::start_in_netns) runs one inside a
/// network namespace instead.
///
/// Runs with `--port P --bind 127.0.0.1 --save "" --appendonly no --daemonize no --dir <dir>
/// --logfile <dir>/server.log` plus the extra arguments. All methods take `&self` (the
/// process sits behind a mutex), so a server can live in a static or an `Arc` and be killed
/// and restarted from any test.
///
/// Dropping it SIGKILLs the process and removes its temp dir; a watchdog does the same if the
/// test process dies without dropping it.
pub struct RedisServer {
    launch: Launch,
    placement: Placement,
    port: u16,
    dir: PathBuf,
    password: Option<String>,
    state: Mutex<State>,
}

struct State {
    child: Option<Child>,
    watchdog: Option<Watchdog>,
}

impl RedisServer {
    /// One `redis-server` per test binary, started on first use and shared by all its tests;
    /// its process dies when the test process ends (see the watchdog above).
    ///
    /// Tests on it share its keyspace: each uses keys (or a namespace) of its own. A test that
    /// kills, restarts, reconfigures, flushes or counts keys of the server should
    /// [`start`](Self::start) a private one instead, since other tests run against the shared
    /// one in parallel.
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(RedisServer::start)
    }

    /// Like [`shared`](Self::shared), for `valkey-server`: one per test binary.
    pub fn shared_valkey() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(RedisServer::start_valkey)
    }

    /// Starts `redis-server` ([`binaries::redis_server`]) and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(&binaries::redis_server(), &[])
    }

    /// Starts `valkey-server` ([`binaries::valkey_server`]) and waits until it answers `PING`.
    pub fn start_valkey() -> Self {
        Self::start_with(&binaries::valkey_server(), &[])
    }

    /// Starts `binary` with the standard arguments plus `extra_args` (server config directives
    /// as command-line arguments, e.g. `&["--requirepass", "secret"]` or
    /// `&["--user", "alice", "on", ">pw", "~*", "&*", "+@all"]`) and waits until it answers
    /// `PING` (a `NOAUTH` error counts as an answer). When `extra_args` hold `--requirepass
    /// PW`, [`cli`](Self::cli) and [`command`](Self::command) authenticate with it.
    pub fn start_with(binary: &Path, extra_args: &[&str]) -> Self {
        let label = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| binary.display().to_string());
        Self::launch(Launch {
            label,
            binary: binary.to_path_buf(),
            config: None,
            leading_args: Vec::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Starts `redis-server` inside the network namespace `netns` (through `ip netns exec`),
    /// listening on `bind` (addresses of the namespace's interfaces) and on the namespace's own
    /// 127.0.0.1, and waits until it answers `PING` there. The process keeps its pid across
    /// `ip netns exec` (it execs, no fork), so kill, drop and the watchdog work as for any
    /// server. [`url`](Self::url) and [`addr`](Self::addr) name `bind[0]`; [`cli`](Self::cli)
    /// runs `redis-cli` inside the namespace against its 127.0.0.1, so it works whatever
    /// happens to the links. [`command`](Self::command), [`query`](Self::query) and [`connection`](Self::connection) talk
    /// to 127.0.0.1 of the test's own namespace, so for this server they return an error
    /// rather than reach some other server.
    pub fn start_in_netns(netns: &Netns, bind: &[&str], extra_args: &[&str]) -> Self {
        assert!(
            !bind.is_empty(),
            "start_in_netns needs at least one address"
        );
        let binary = binaries::redis_server();
        let mut addresses: Vec<String> = bind.iter().map(|s| s.to_string()).collect();
        addresses.push("127.0.0.1".to_string());
        // Without a password, protected mode refuses every client not on loopback, and the
        // clients come over the namespace's links. Those reach only this machine.
        let mut args = vec!["--protected-mode".to_string(), "no".to_string()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        Self::launch_placed(
            Launch {
                label: "redis-server-netns".to_string(),
                binary,
                config: None,
                leading_args: Vec::new(),
                extra_args: args,
            },
            Placement {
                bind: addresses,
                netns: Some(InNetns {
                    ip: netns.ip_binary().to_path_buf(),
                    name: netns.name().to_string(),
                }),
            },
        )
    }

    /// Starts a server as `launch` says, on a free port, retrying on a new port when another
    /// process took the port first.
    pub(crate) fn launch(launch: Launch) -> Self {
        Self::launch_placed(launch, Placement::loopback())
    }

    fn launch_placed(launch: Launch, placement: Placement) -> Self {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let dir = new_temp_dir(&launch.label, port);
            let password = launch
                .extra_args
                .windows(2)
                .find(|w| w[0] == "--requirepass")
                .map(|w| w[1].clone());
            if let Some(config) = &launch.config {
                fs::write(dir.join("server.conf"), config)
                    .unwrap_or_else(|e| panic!("write {}/server.conf: {e}", dir.display()));
            }
            let watchdog = Watchdog::spawn(&dir, &reservation_files(port));
            let server = RedisServer {
                launch: launch.clone(),
                placement: placement.clone(),
                port,
                dir,
                password,
                state: Mutex::new(State {
                    child: None,
                    watchdog: Some(watchdog),
                }),
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) if e.contains("Address already in use") => {
                    last_error = e;
                    // `server` drops here: its dir goes, and the next try takes a new port.
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!(
            "{} did not start in {START_ATTEMPTS} attempts: {last_error}",
            launch.label
        );
    }

    /// The port it listens on (on 127.0.0.1, or on each address of a namespaced server).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:P` (no credentials, even when it has a password); for a server in a
    /// network namespace, its first bind address instead of 127.0.0.1.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// `host:port` as `127.0.0.1:P` (the first bind address for a server in a namespace).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.placement.bind[0], self.port)
    }

    /// The network namespace it runs in, if [`start_in_netns`](Self::start_in_netns) started
    /// it.
    pub fn netns(&self) -> Option<&str> {
        self.placement.netns.as_ref().map(|ns| ns.name.as_str())
    }

    /// Its temp dir (data, `server.log`, `stdio.log`, `server.conf`, `nodes.conf`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pid of the running process, if it is running.
    pub fn pid(&self) -> Option<u32> {
        let mut state = self.state();
        reap(&mut state);
        state.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (it has not exited or been killed).
    pub fn is_running(&self) -> bool {
        let mut state = self.state();
        reap(&mut state);
        state.child.is_some()
    }

    /// SIGKILLs the process and waits for it to die; a no-op if it is not running. The port
    /// and the temp dir stay, for [`restart`](Self::restart).
    pub fn kill(&self) {
        let mut state = self.state();
        self.kill_locked(&mut state);
    }

    /// Stops the process gracefully (SIGTERM; SIGKILL if it is still alive after 10 s) and
    /// waits for it to exit; a no-op if it is not running.
    pub fn stop(&self) {
        let mut state = self.state();
        let Some(child) = state.child.as_mut() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                state.child = None;
                let _ = fs::remove_file(self.pid_file());
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill_locked(&mut state);
    }

    /// Kills the process if it is running (SIGKILL), then starts it again with the same
    /// arguments, on the same port and with the same dir (so a cluster node keeps its
    /// `nodes.conf` and a sentinel its config), and waits until it answers `PING`.
    pub fn restart(&self) {
        self.kill();
        if let Err(e) = self.spawn_and_wait() {
            panic!("restart: {e}");
        }
    }

    /// Runs `redis-cli -h 127.0.0.1 -p P [-a PW] args...` and returns its stdout; panics if it
    /// cannot run or exits non-zero. Options for redis-cli go first in `args`
    /// (`&["--raw", "GET", "k"]`).
    pub fn cli(&self, args: &[&str]) -> String {
        run_cli_in(
            self.placement.netns.as_ref(),
            self.port,
            self.password.as_deref(),
            args,
        )
    }

    /// Sends one command on a new connection (authenticated with `--requirepass`, if it was
    /// given) and returns the reply as text, the way `redis-cli --raw` prints it (nil is an
    /// empty string, array elements one per line); a server error or a connection problem is
    /// `Err`.
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        self.query(args)
            .and_then(|reply| client::text(reply).map_err(|e| self.failed(args, e)))
    }

    /// Sends one command on a new connection (authenticated with `--requirepass`, if it was
    /// given) and converts the reply with the `redis` crate (`Option<Vec<u8>>` for a `GET`,
    /// `Vec<String>` for `KEYS`, `HashMap<String, String>` for a flat field/value array...);
    /// a server error, a reply of another type or a connection problem is `Err`.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T, String> {
        self.not_in_netns()?;
        client::query(self.port, self.password.as_deref(), args, client::TIMEOUT)
            .map_err(|e| self.failed(args, e))
    }

    /// A new synchronous `redis` crate connection to it, authenticated with `--requirepass`
    /// if it was given; connect, read and write time out after 2 s. For what
    /// [`query`](Self::query) cannot do in one command (a `MULTI`, a `MONITOR` stream...).
    pub fn connection(&self) -> Result<redis::Connection, String> {
        self.not_in_netns()?;
        client::connect(self.port, self.password.as_deref(), client::TIMEOUT)
            .map_err(|e| format!("connect to {}: {e}", self.addr()))
    }

    /// `Err` for a server in a network namespace: 127.0.0.1:P of the test's own namespace is
    /// not it, and could be some other process's server.
    fn not_in_netns(&self) -> Result<(), String> {
        match &self.placement.netns {
            Some(netns) => Err(format!(
                "this server runs in network namespace {}: 127.0.0.1:{} here is not it (use cli)",
                netns.name, self.port
            )),
            None => Ok(()),
        }
    }

    fn failed(&self, args: &[&str], e: redis::RedisError) -> String {
        format!("{} {args:?}: {e}", self.addr())
    }

    /// One field of `INFO <section>` (e.g. `info_field("replication", "role")`).
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let info = self.command(&["INFO", section]).ok()?;
        info_value(&info, field)
    }

    /// The last `lines` lines of its log (`server.log`, and `stdio.log` if not empty).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.dir, lines)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("server.pid.watchdog")
    }

    fn kill_locked(&self, state: &mut State) {
        if let Some(mut child) = state.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.pid_file());
    }

    /// Spawns the process and waits until it answers; on failure kills it and returns a
    /// message with the tail of its log.
    fn spawn_and_wait(&self) -> Result<(), String> {
        let mut state = self.state();
        if state.child.is_some() {
            return Err(format!(
                "{} on {} is already running",
                self.launch.label,
                self.addr()
            ));
        }
        let stdio = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdio.log"))
            .map_err(|e| format!("open {}/stdio.log: {e}", self.dir.display()))?;
        let stdio_err = stdio
            .try_clone()
            .map_err(|e| format!("dup stdio.log: {e}"))?;
        let mut command = match &self.placement.netns {
            Some(netns) => netns.command(&self.launch.binary),
            None => Command::new(&self.launch.binary),
        };
        if self.launch.config.is_some() {
            command.arg(self.dir.join("server.conf"));
        }
        command
            .args(&self.launch.leading_args)
            .args(["--port", &self.port.to_string()])
            .arg("--bind")
            .args(&self.placement.bind)
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("server.log"))
            .args(&self.launch.extra_args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdio)
            .stderr(stdio_err)
            .process_group(0);
        let child = command.spawn().map_err(|e| {
            format!(
                "cannot run {} ({}): {e}",
                self.launch.label,
                self.launch.binary.display()
            )
        })?;
        write_pid_file(&self.pid_file(), child.id());
        state.child = Some(child);

        let started = Instant::now();
        loop {
            let child = state.child.as_mut().expect("child was just set");
            if let Ok(Some(status)) = child.try_wait() {
                state.child = None;
                let _ = fs::remove_file(self.pid_file());
                return Err(format!(
                    "{} on {} exited during startup ({status}); log tail:\n{}",
                    self.launch.label,
                    self.addr(),
                    log_tail(&self.dir, 40)
                ));
            }
            if self.answers_ping() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.kill_locked(&mut state);
                return Err(format!(
                    "{} on {} did not answer PING within {READY_TIMEOUT:?}; log tail:\n{}",
                    self.launch.label,
                    self.addr(),
                    log_tail(&self.dir, 40)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        if let Some(netns) = &self.placement.netns {
            // From inside the namespace, on its loopback: the test's own 127.0.0.1:P could be
            // another process's server.
            let output = netns
                .command(&binaries::redis_cli())
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "PING"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            return output.is_ok_and(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                text.contains("PONG") || text.contains("NOAUTH")
            });
        }
        match client::query::<String>(self.port, None, &["PING"], Duration::from_millis(500)) {
            Ok(reply) => reply == "PONG",
            Err(e) => e.code() == Some("NOAUTH"),
        }
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("label", &self.launch.label)
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let mut state = self.state();
        self.kill_locked(&mut state);
        if let Some(watchdog) = state.watchdog.take() {
            watchdog.finish();
        }
        drop(state);
        let _ = fs::remove_dir_all(&self.dir);
        release_port(self.port);
    }
}

/// A `sh` process that waits for EOF on its stdin, a pipe whose write end only this test
/// process holds (std opens it close-on-exec, so no other child inherits it). EOF comes when
/// the `Watchdog` is dropped or when the test process ends in any way; then the watchdog
/// SIGKILLs the process group whose id is in the pid file (if the file is there) and removes
/// the temp dir. It runs in its own process group and ignores terminal signals, so a Ctrl-C
/// that kills the test process does not kill it first. [`Watchdog::spawn_script`] runs
/// another cleanup script the same way (the network namespaces use it).
pub(crate) struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

const WATCHDOG_SCRIPT: &str = r#"
trap '' INT HUP QUIT TERM
while read -r _line; do :; done
pid=$(cat "$1" 2>/dev/null)
if [ -n "$pid" ]; then kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null; fi
rm -rf "$2"
shift 2
for f in "$@"; do [ "$(cat "$f" 2>/dev/null)" = "$PPID_AT_START" ] && rm -f "$f"; done
"#;

impl Watchdog {
    fn spawn(dir: &Path, reservations: &[PathBuf]) -> Self {
        let pid_file = dir.join("server.pid.watchdog");
        let mut args: Vec<&OsStr> = vec![pid_file.as_os_str(), dir.as_os_str()];
        args.extend(reservations.iter().map(|p| p.as_os_str()));
        Self::spawn_script(WATCHDOG_SCRIPT, &args)
    }

    /// Runs `script` (`sh -c`, with `args` as `$1...` and `$PPID_AT_START` set to this
    /// process's pid) once the pipe closes. The script must read its stdin to EOF first
    /// (`while read -r _line; do :; done`) and should ignore terminal signals.
    pub(crate) fn spawn_script(script: &str, args: &[&OsStr]) -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("cachet-test-watchdog")
            .args(args)
            .env("PPID_AT_START", std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sh for the server watchdog: {e}"));
        let stdin = child.stdin.take();
        Watchdog { child, stdin }
    }

    /// Closes the pipe (the watchdog then cleans up whatever is left) and waits for it.
    pub(crate) fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn reap(state: &mut State) {
    if let Some(child) = state.child.as_mut()
        && let Ok(Some(_)) = child.try_wait()
    {
        state.child = None;
    }
}

fn write_pid_file(path: &Path, pid: u32) {
    let tmp = path.with_extension("tmp");
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        panic!("write {}: {e}", path.display());
    }
}

/// A new, empty temp dir for one server, under cargo's `CARGO_TARGET_TMPDIR`.
fn new_temp_dir(label: &str, port: u16) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cachet-servers")
        .join(format!("{label}-{}-{port}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

pub(crate) fn log_tail(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for name in ["server.log", "stdio.log"] {
        let text = fs::read_to_string(dir.join(name)).unwrap_or_default();
        if text.trim().is_empty() {
            continue;
        }
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        out.push_str(&format!("--- {}/{name} ---\n", dir.display()));
        out.push_str(&all[start..].join("\n"));
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("(no log output)\n");
    }
    out
}

/// The value of `field:value` in an `INFO`-style text.
pub(crate) fn info_value(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim_end().split_once(':')?;
        (key == field).then(|| value.to_string())
    })
}

pub(crate) fn run_cli(port: u16, password: Option<&str>, args: &[&str]) -> String {
    run_cli_in(None, port, password, args)
}

fn run_cli_in(netns: Option<&InNetns>, port: u16, password: Option<&str>, args: &[&str]) -> String {
    let cli = binaries::redis_cli();
    let mut command = match netns {
        Some(netns) => netns.command(&cli),
        None => Command::new(&cli),
    };
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(password) = password {
        command.args(["--no-auth-warning", "-a", password]);
    }
    let output = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let place = netns
            .map(|n| format!(" in netns {}", n.name))
            .unwrap_or_default();
        panic!(
            "redis-cli -p {port}{place} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
}
