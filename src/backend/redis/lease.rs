//! Cache-aside leases on Redis (see [`crate::load::lease`] for the design): the marker is a
//! hash `{cachet-lease: <token>}` with a `PEXPIRE`, stored in the entry's own key; each step
//! is one Lua script on that one key, so on a cluster it touches one hash slot.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use fred::types::Value;
use fred::types::scripts::Script;
use sha1::{Digest, Sha1};

use super::RedisCacheService;
use crate::CacheError;
use crate::load::{Lease, LeaseRead, LeaseRequest, LeaseToken, StoredVersion};
use crate::service::resolve_ttl;

/// The field of the lease hash that holds the holder's token.
pub const LEASE_FIELD: &str = "cachet-lease";

/// `KEYS`: the entry; `ARGV`: token, lease in ms, SHA-1 (hex) of a value to replace or "",
/// "1" to renew only. Returns `{1, value}` (the key holds a value), `{2}` (the caller holds
/// the lease now: new, renewed, or replayed), `{3, pttl}` (another caller's lease), `{4}` (a
/// key of a type cachet does not write), `{5}` (a renewal whose lease is gone).
pub const LEASE_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if ARGV[4] == '1' then
  if kind == 'hash' and redis.call('HGET', KEYS[1], 'cachet-lease') == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {2}
  end
  return {5}
end
if kind == 'string' then
  local value = redis.call('GET', KEYS[1])
  if ARGV[3] == '' or redis.sha1hex(value) ~= ARGV[3] then
    return {1, value}
  end
elseif kind == 'hash' then
  local holder = redis.call('HGET', KEYS[1], 'cachet-lease')
  if not holder then
    return {4}
  end
  if holder ~= ARGV[1] then
    return {3, redis.call('PTTL', KEYS[1])}
  end
elseif kind ~= 'none' then
  return {4}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'cachet-lease', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {2}";

/// `KEYS`: the entry; `ARGV`: token, value, TTL in ms. Stores the value only if the caller's
/// lease is still in the key; returns 1 if it did, else 0.
pub const SET_LEASED_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'hash'
  and redis.call('HGET', KEYS[1], 'cachet-lease') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// `KEYS`: the entry; `ARGV`: SHA-1 (hex) of the value the caller saw, the new value, TTL in
/// ms. Stores the new value only if the key still holds a string with exactly that SHA-1;
/// returns 1 if it did, else 0.
pub const REPLACE_IF_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'string'
  and redis.sha1hex(redis.call('GET', KEYS[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// `KEYS`: the entry; `ARGV`: token. Deletes the caller's lease if it is still in the key.
pub const RELEASE_LEASE_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'hash'
  and redis.call('HGET', KEYS[1], 'cachet-lease') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0";

fn script(slot: &'static OnceLock<Script>, lua: &'static str) -> &'static Script {
    slot.get_or_init(|| Script::from_lua(lua))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

impl RedisCacheService {
    pub(super) async fn lease_now(
        &self,
        key: &str,
        request: &LeaseRequest,
    ) -> Result<LeaseRead, CacheError> {
        static SCRIPT: OnceLock<Script> = OnceLock::new();
        let replace = match request.replace.as_ref().and_then(StoredVersion::as_bytes) {
            Some(raw) => hex::encode(Sha1::digest(raw)),
            None => String::new(),
        };
        let full = self.full_key(key).into_owned();
        let args = vec![
            Value::from(request.token.as_str()),
            Value::from(millis(request.ttl)),
            Value::from(replace),
            Value::from(if request.renew { "1" } else { "0" }),
        ];
        let reply: Value = script(&SCRIPT, LEASE_SCRIPT)
            .evalsha_with_reload(self.client(), vec![full.clone()], args)
            .await
            .map_err(|e| self.backend_error("lease", key, e))?;
        let mut parts = reply.into_array().into_iter();
        let bad = || {
            CacheError::backend(
                self.server().to_owned(),
                "lease",
                key,
                "unexpected reply from the lease script",
            )
        };
        match parts.next().and_then(|code| code.as_i64()) {
            Some(1) => {
                let value = parts.next().and_then(Value::into_bytes).ok_or_else(bad)?;
                Ok(LeaseRead::Value {
                    version: StoredVersion::of_bytes(value.clone()),
                    value,
                })
            }
            Some(2) => Ok(LeaseRead::Granted(
                self.lease_handle(full, request.token.clone()),
            )),
            Some(3) => {
                let pttl = parts.next().and_then(|p| p.as_i64()).unwrap_or(0);
                Ok(LeaseRead::Held {
                    remaining: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
                })
            }
            Some(5) => Ok(LeaseRead::Lost),
            Some(4) => Err(CacheError::backend(
                self.server().to_owned(),
                "lease",
                key,
                "the key holds a Redis type cachet does not write (not a string)",
            )),
            _ => Err(bad()),
        }
    }

    /// A handle on a granted lease: dropped armed, it releases the lease in the background.
    fn lease_handle(&self, full_key: String, token: LeaseToken) -> Lease {
        let service = self.clone();
        let held = token.clone();
        Lease::new(token, move || {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = service.release_full(&full_key, &held).await;
                });
            }
        })
    }

    pub(super) async fn set_leased_now(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<bool, CacheError> {
        static SCRIPT: OnceLock<Script> = OnceLock::new();
        let ttl = resolve_ttl(key, ttl_secs, self.default_ttl())?;
        let full = self.full_key(key).into_owned();
        let args = vec![
            Value::from(lease.token().as_str()),
            Value::Bytes(value),
            Value::from(millis(ttl)),
        ];
        let stored: i64 = script(&SCRIPT, SET_LEASED_SCRIPT)
            .evalsha_with_reload(self.client(), vec![full], args)
            .await
            .map_err(|e| self.backend_error("set_leased", key, e))?;
        Ok(stored == 1)
    }

    pub(super) async fn replace_if_now(
        &self,
        key: &str,
        version: &StoredVersion,
        value: Bytes,
        ttl_secs: Option<u64>,
    ) -> Result<Option<StoredVersion>, CacheError> {
        static SCRIPT: OnceLock<Script> = OnceLock::new();
        let ttl = resolve_ttl(key, ttl_secs, self.default_ttl())?;
        // A version this backend did not make (a write id) names no Redis value.
        let Some(seen) = version.as_bytes() else {
            return Ok(None);
        };
        let full = self.full_key(key).into_owned();
        let args = vec![
            Value::from(hex::encode(Sha1::digest(seen))),
            Value::Bytes(value.clone()),
            Value::from(millis(ttl)),
        ];
        let stored: i64 = script(&SCRIPT, REPLACE_IF_SCRIPT)
            .evalsha_with_reload(self.client(), vec![full], args)
            .await
            .map_err(|e| self.backend_error("replace_if", key, e))?;
        Ok((stored == 1).then(|| StoredVersion::of_bytes(value)))
    }

    pub(super) async fn release_lease_now(
        &self,
        key: &str,
        lease: &Lease,
    ) -> Result<(), CacheError> {
        let full = self.full_key(key).into_owned();
        self.release_full(&full, lease.token())
            .await
            .map_err(|e| self.backend_error("release_lease", key, e))
    }

    async fn release_full(
        &self,
        full_key: &str,
        token: &LeaseToken,
    ) -> Result<(), fred::error::Error> {
        static SCRIPT: OnceLock<Script> = OnceLock::new();
        script(&SCRIPT, RELEASE_LEASE_SCRIPT)
            .evalsha_with_reload::<i64, _, _>(
                self.client(),
                vec![full_key.to_owned()],
                vec![token.as_str().to_owned()],
            )
            .await
            .map(drop)
    }
}
