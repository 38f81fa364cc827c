//! A tiny RESP2 client over `std::net::TcpStream`: one command, one reply. Enough for
//! readiness checks and admin commands without spawning `redis-cli`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...` (the text after the `-`).
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n ...`; `None` is the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `*n ...`; `None` is the nil array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text, the way `redis-cli --raw` prints it: strings as they are, integers in
    /// decimal, nil as an empty string, array elements one per line (nested arrays flattened),
    /// an error as its message.
    pub fn to_text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Error(s) => s.clone(),
            Resp::Int(n) => n.to_string(),
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Resp::Bulk(None) | Resp::Array(None) => String::new(),
            Resp::Array(Some(items)) => items
                .iter()
                .map(Resp::to_text)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The elements of an array reply (empty for anything else).
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            _ => &[],
        }
    }

    /// A flat array of alternating field names and values (as `SENTINEL replicas` and
    /// `CONFIG GET` return) as pairs of text.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.items()
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_text(), c[1].to_text()))
            .collect()
    }
}

/// Sends one command to 127.0.0.1:`port` and returns its reply; a server error reply is
/// `Ok(Resp::Error(..))`, a connection problem is `Err`. Connect, read and write time out
/// after 2 s.
pub fn resp_request(port: u16, args: &[&str]) -> io::Result<Resp> {
    request(port, None, args, Duration::from_secs(2))
}

/// Sends one command to 127.0.0.1:`port` and returns its reply as text ([`Resp::to_text`]);
/// a server error reply or a connection problem is `Err` with a message.
pub fn resp_command(port: u16, args: &[&str]) -> Result<String, String> {
    match resp_request(port, args) {
        Ok(Resp::Error(e)) => Err(format!("127.0.0.1:{port} {args:?}: {e}")),
        Ok(reply) => Ok(reply.to_text()),
        Err(e) => Err(format!("127.0.0.1:{port} {args:?}: {e}")),
    }
}

/// Like [`resp_request`], authenticating first with `AUTH password` when `password` is given.
pub(crate) fn request(
    port: u16,
    password: Option<&str>,
    args: &[&str],
    timeout: Duration,
) -> io::Result<Resp> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    if let Some(password) = password {
        writer.write_all(&encode(&["AUTH", password]))?;
        if let Resp::Error(e) = read_reply(&mut reader)? {
            return Ok(Resp::Error(e));
        }
    }
    writer.write_all(&encode(args))?;
    read_reply(&mut reader)
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(reader: &mut impl BufRead) -> io::Result<Resp> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad_reply(&line));
    }
    line.truncate(line.len() - 2);
    let (kind, rest) = (line[0], String::from_utf8_lossy(&line[1..]).into_owned());
    let number = |rest: &str| rest.parse::<i64>().map_err(|_| bad_reply(&line));
    match kind {
        b'+' => Ok(Resp::Simple(rest)),
        b'-' => Ok(Resp::Error(rest)),
        b':' => Ok(Resp::Int(number(&rest)?)),
        b'$' => {
            let len = number(&rest)?;
            if len < 0 {
                return Ok(Resp::Bulk(None));
            }
            let mut data = vec![0; len as usize + 2];
            reader.read_exact(&mut data)?;
            data.truncate(len as usize);
            Ok(Resp::Bulk(Some(data)))
        }
        b'*' => {
            let len = number(&rest)?;
            if len < 0 {
                return Ok(Resp::Array(None));
            }
            let items = (0..len)
                .map(|_| read_reply(reader))
                .collect::<io::Result<Vec<_>>>()?;
            Ok(Resp::Array(Some(items)))
        }
        _ => Err(bad_reply(&line)),
    }
}

fn bad_reply(line: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a RESP2 reply: {:?}", String::from_utf8_lossy(line)),
    )
}
