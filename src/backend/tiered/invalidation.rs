//! The invalidation bus: messages on a Redis pub/sub channel that tell every other instance
//! to drop entries from its in-memory L1.
//!
//! A message: `b"CI"`, format version `1`, the origin instance id (`u64`, big-endian; an
//! instance skips its own), an operation byte (`1` key, `2` prefix, `3` clear, `4` hello:
//! nothing to drop) and the key or prefix (UTF-8). Pub/sub is at most once: after its subscriber reconnects, an instance
//! clears its whole L1, since messages may have been lost meanwhile.

use crate::CacheError;

const MAGIC: &[u8; 2] = b"CI";
const VERSION: u8 = 1;

/// Default channel prefix; the channel is `<prefix>v1`.
pub const DEFAULT_CHANNEL_PREFIX: &str = "cachet:invalidate:";

/// The channel name for a prefix and a service's namespace: the format version is part of
/// it, so instances of an incompatible version never read each other's messages, and so is
/// the namespace, so that apps sharing one Redis under different namespaces never hear (and
/// cannot clear) each other's L1s: `<prefix>v1` without a namespace, `<prefix>v1:<namespace>`
/// with one.
///
/// ```
/// use cachet::invalidation::{DEFAULT_CHANNEL_PREFIX, channel_name};
///
/// assert_eq!(channel_name(DEFAULT_CHANNEL_PREFIX, ""), "cachet:invalidate:v1");
/// assert_eq!(channel_name(DEFAULT_CHANNEL_PREFIX, "billing:"), "cachet:invalidate:v1:billing:");
/// ```
pub fn channel_name(prefix: &str, namespace: &str) -> String {
    if namespace.is_empty() {
        format!("{prefix}v{VERSION}")
    } else {
        format!("{prefix}v{VERSION}:{namespace}")
    }
}

/// What to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// One key.
    Key(String),
    /// Every key starting with this literal prefix.
    Prefix(String),
    /// Everything.
    Clear,
    /// Nothing: an instance announces itself, and waits to hear its own announcement, so
    /// that it knows its subscription is live before it serves.
    Hello,
}

/// One message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The instance that sent it.
    pub origin: u64,
    /// What to drop.
    pub operation: Operation,
}

impl Message {
    /// The wire form.
    ///
    /// ```
    /// use cachet::invalidation::{Message, Operation};
    ///
    /// let message = Message { origin: 7, operation: Operation::Prefix("org:".into()) };
    /// assert_eq!(Message::decode(&message.encode()).unwrap(), message);
    /// assert!(Message::decode(b"hello").is_err());
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let (op, text) = match &self.operation {
            Operation::Key(key) => (1u8, key.as_str()),
            Operation::Prefix(prefix) => (2, prefix.as_str()),
            Operation::Clear => (3, ""),
            Operation::Hello => (4, ""),
        };
        let mut out = Vec::with_capacity(12 + text.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.origin.to_be_bytes());
        out.push(op);
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// Parses a message; anything malformed is an error that says why.
    pub fn decode(bytes: &[u8]) -> Result<Message, CacheError> {
        let bad = |what: &str| {
            CacheError::serialization::<Message>(
                "<invalidation message>",
                "decode",
                what.to_owned(),
            )
        };
        if bytes.len() < 12 || &bytes[..2] != MAGIC {
            return Err(bad("not a cachet invalidation message"));
        }
        if bytes[2] != VERSION {
            return Err(bad("unsupported message version"));
        }
        let mut origin = [0u8; 8];
        origin.copy_from_slice(&bytes[3..11]);
        let text = std::str::from_utf8(&bytes[12..]).map_err(|_| bad("key is not UTF-8"))?;
        let operation = match bytes[11] {
            1 => Operation::Key(text.to_owned()),
            2 => Operation::Prefix(text.to_owned()),
            3 if text.is_empty() => Operation::Clear,
            4 if text.is_empty() => Operation::Hello,
            _ => return Err(bad("unknown operation")),
        };
        Ok(Message {
            origin: u64::from_be_bytes(origin),
            operation,
        })
    }
}
