//! Admin commands to a test server through the `redis` crate's synchronous client: one new
//! connection per command, so that a command never waits behind another test's and a
//! killed or restarted server costs nothing to clean up.

use std::time::Duration;

use redis::{
    Connection, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    RedisConnectionInfo, RedisResult, Value,
};

/// How long [`connect`] waits to connect and, then, for each read and write.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

/// A new connection to 127.0.0.1:`port`, authenticated with `AUTH password` when `password`
/// is given. It sends nothing else on connect (no `CLIENT SETINFO`), so that what a test
/// counts on the server is only what it sent. Connect, read and write time out after
/// `timeout`.
pub(crate) fn connect(
    port: u16,
    password: Option<&str>,
    timeout: Duration,
) -> RedisResult<Connection> {
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    let info: ConnectionInfo = ConnectionAddr::Tcp("127.0.0.1".to_owned(), port)
        .into_connection_info()?
        .set_redis_settings(settings);
    let connection = redis::Client::open(info)?.get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

/// Sends `args` (the command and its arguments) on a new [`connect`]ion and converts the
/// reply to `T`; a server error reply is `Err`, like a connection problem.
pub(crate) fn query<T: FromRedisValue>(
    port: u16,
    password: Option<&str>,
    args: &[&str],
    timeout: Duration,
) -> RedisResult<T> {
    let mut connection = connect(port, password, timeout)?;
    let (name, rest) = args.split_first().expect("a command");
    redis::cmd(name).arg(rest).query(&mut connection)
}

/// A reply as text, the way `redis-cli --raw` prints it: strings as they are, integers in
/// decimal, nil as an empty string, array elements one per line (nested arrays flattened).
pub(crate) fn text(reply: Value) -> RedisResult<String> {
    Ok(match reply {
        Value::Nil => String::new(),
        Value::Array(items) => items
            .into_iter()
            .map(text)
            .collect::<RedisResult<Vec<_>>>()?
            .join("\n"),
        other => String::from_redis_value(other)?,
    })
}

/// Sends one command to 127.0.0.1:`port` (no password) and returns its reply as text
/// ([`text`]); a server error reply or a connection problem is `Err` with a message. Connect,
/// read and write time out after 2 s. For a port with no [`RedisServer`](super::RedisServer)
/// at hand (one that was dropped, say); a server's own [`command`](super::RedisServer::command)
/// authenticates.
pub fn port_command(port: u16, args: &[&str]) -> Result<String, String> {
    query(port, None, args, TIMEOUT)
        .and_then(text)
        .map_err(|e| format!("127.0.0.1:{port} {args:?}: {e}"))
}
