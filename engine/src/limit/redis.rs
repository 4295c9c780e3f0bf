//! `RedisLimiter`: rate limits shared by every process through Redis.
//!
//! GCRA in one Lua script, so that reading and moving a key's theoretical arrival time (TAT) is
//! atomic however many processes share it, and on Redis's clock (`TIME`), so that processes on
//! hosts whose clocks disagree still agree on what "now" is. Times are whole microseconds.
//!
//! A key `{prefix}key:{key}` holds the string `"{tat}:{T}"`: the TAT, and the emission interval
//! `T` it was reached under, so that when a key's rate changes the permits still outstanding
//! are rescaled to the new interval (a rate cut does not hand out a fresh burst). Every write
//! sets the key to expire when its TAT passes: an idle key then vanishes, which is exactly a
//! full bucket.
//!
//! Processes register in the sorted set `{prefix}processes` (member: process id, score: Redis
//! time in milliseconds), which the fail-safe limiter uses to know how many processes share a
//! rate when Redis becomes unreachable.
//!
//! One acquire call takes any number of keys (a dispatch round's channels; a request's pair and
//! arrival keys) in one script, so the keys must live on one server: Redis Cluster, which
//! refuses scripts over keys in different slots, is not supported.
//!
//! Every call has a timeout, so a hung Redis never stalls dispatch; the methods return errors
//! and leave what to do about them to the caller ([`super::FailSafeLimiter`]).

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{invalid_rate_grant, Gcra, Grant, LimitError, Rate};

/// Takes up to `want` permits of each key, all in one atomic step on one reading of Redis's
/// clock. KEYS[i] the i-th key; ARGV[3i-2..3i]: its T (µs), burst, want. Returns
/// {granted, microseconds until the next permit} for each key in order, flattened.
const ACQUIRE_LUA: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
for i = 1, #KEYS do
  local t = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local tau = t * (burst - 1)
  local tat = now
  local dirty = false
  local stored = redis.call('GET', KEYS[i])
  if stored then
    local s_tat, s_t = string.match(stored, '^(%d+):(%d+)$')
    if s_tat then
      local debt = tonumber(s_tat) - now
      if debt > 0 then
        local old_t = tonumber(s_t)
        if old_t ~= t and old_t > 0 then
          debt = math.ceil(debt * t / old_t)
          dirty = true
        end
        tat = now + debt
      end
    else
      -- Not ours or corrupt: take the bucket as empty (grant less, never more) and rewrite it.
      tat = now + tau + t
      dirty = true
    end
  end
  local avail = math.floor((now + tau - tat) / t) + 1
  if avail < 0 then avail = 0 end
  local granted = want
  if avail < granted then granted = avail end
  if granted > 0 then
    tat = tat + granted * t
    dirty = true
  end
  if dirty and tat > now then
    local ttl_ms = math.ceil((tat - now) / 1000) + 1
    redis.call('SET', KEYS[i], string.format('%.0f:%.0f', tat, t), 'PX', string.format('%.0f', ttl_ms))
  end
  local next_in = tat - tau - now
  if next_in < 0 then next_in = 0 end
  out[2 * i - 1] = granted
  out[2 * i] = next_in
end
return out
";

/// Hands back permits. KEYS[1] the key; ARGV: n. Moves the TAT back by n times the interval
/// stored with it, never below now. Returns 1 if it moved the TAT, 0 if there was nothing to
/// hand back to.
const REFUND_LUA: &str = r"
local n = tonumber(ARGV[1])
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local s_tat, s_t = string.match(stored, '^(%d+):(%d+)$')
if not s_tat then return 0 end
local tat = tonumber(s_tat)
local t = tonumber(s_t)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
if tat <= now or n <= 0 then return 0 end
local new = tat - n * t
if new <= now then
  redis.call('DEL', KEYS[1])
else
  local ttl_ms = math.ceil((new - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', new, t), 'PX', string.format('%.0f', ttl_ms))
end
return 1
";

/// Registers a process. KEYS[1] the set; ARGV: process id, ttl (ms). Adds or refreshes the id
/// at Redis's time, drops members not refreshed within the ttl, and returns how many remain.
const REGISTER_LUA: &str = r"
local ttl = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%.0f', now_ms), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now_ms - ttl))
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl * 2))
return redis.call('ZCARD', KEYS[1])
";

/// The default prefix of every Redis key the limiters use.
pub(crate) const DEFAULT_KEY_PREFIX: &str = "herald:rl:";

/// The default timeout of one Redis call.
pub(crate) const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// The default timeout of one attempt to connect.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How a [`RedisLimiter`] talks to Redis.
#[derive(Debug, Clone)]
pub struct RedisLimiterConfig {
    /// Prefix of every key, so that several deployments (or tests running in parallel) can
    /// share one Redis without sharing limits. Default `herald:rl:`.
    pub key_prefix: String,
    /// The longest a call may take before it counts as failed. A send is blocked on it, so it
    /// is short; a slower Redis is treated as down. Default 250 ms.
    pub call_timeout: Duration,
    /// The longest one attempt to (re)connect may take, so that an address that drops packets
    /// fails as fast as one that refuses. Default 1 s.
    pub connect_timeout: Duration,
}

impl Default for RedisLimiterConfig {
    fn default() -> Self {
        RedisLimiterConfig {
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// A rate limiter whose state is in Redis, shared by every process that uses the same Redis
/// and key prefix. Cheap to clone (one connection, multiplexed).
///
/// Its methods return errors rather than deciding what an unreachable Redis means; the
/// [`super::FailSafeLimiter`] implements [`super::Limiter`] on top of it.
#[derive(Clone)]
pub struct RedisLimiter {
    conn: ConnectionManager,
    key_prefix: String,
    call_timeout: Duration,
    acquire_script: Script,
    refund_script: Script,
    register_script: Script,
}

impl RedisLimiter {
    /// Connects to Redis at `url` (`redis://host:port/db`). Fails if the URL is malformed or
    /// Redis cannot be reached within `connect_timeout`.
    pub async fn connect(url: &str, config: RedisLimiterConfig) -> Result<Self, LimitError> {
        let client = open_client(url)?;
        let conn = connect_manager(client, &config).await?;
        Ok(Self::with_manager(conn, config))
    }

    /// A limiter on an existing connection manager (which reconnects by itself).
    pub fn with_manager(conn: ConnectionManager, config: RedisLimiterConfig) -> Self {
        RedisLimiter {
            conn,
            key_prefix: config.key_prefix,
            call_timeout: config.call_timeout,
            acquire_script: Script::new(ACQUIRE_LUA),
            refund_script: Script::new(REFUND_LUA),
            register_script: Script::new(REGISTER_LUA),
        }
    }

    /// The Redis key holding `key`'s state: `{prefix}key:{key}`. Public so that operators (and
    /// tests) can find it.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}key:{key}", self.key_prefix)
    }

    /// The Redis key of the sorted set of live processes: `{prefix}processes`.
    pub fn processes_key(&self) -> String {
        format!("{}processes", self.key_prefix)
    }

    /// Takes up to `want` permits of `key` under `rate`, atomically for every process. A rate
    /// that is not usable grants nothing without asking Redis.
    pub async fn acquire(&self, key: &str, rate: Rate, want: u32) -> Result<Grant, LimitError> {
        let grants = self.acquire_many(&[(key, rate, want)]).await?;
        grants
            .into_iter()
            .next()
            .ok_or_else(|| LimitError::Reply("no grant for the key".into()))
    }

    /// [`RedisLimiter::acquire`] for several keys in one call to Redis (one script, so one
    /// round trip and one reading of Redis's clock however many keys): a dispatch round over
    /// fifty channels must not take fifty round trips, each of which delays the permits taken
    /// before it. The grants are in the order of `asks`; a key with a rate that is not usable
    /// grants nothing and is not sent to Redis.
    pub async fn acquire_many(&self, asks: &[(&str, Rate, u32)]) -> Result<Vec<Grant>, LimitError> {
        let mut grants = vec![invalid_rate_grant(); asks.len()];
        let mut call = self.acquire_script.prepare_invoke();
        let mut sent = Vec::with_capacity(asks.len());
        for (i, (key, rate, want)) in asks.iter().enumerate() {
            let Some(gcra) = Gcra::from_rate(*rate) else {
                continue;
            };
            call.key(self.redis_key(key))
                .arg(gcra.t_us())
                .arg(gcra.burst)
                .arg(*want);
            sent.push((i, *want));
        }
        if sent.is_empty() {
            return Ok(grants);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self.timed(call.invoke_async(&mut conn)).await?;
        if reply.len() != 2 * sent.len() {
            return Err(LimitError::Reply(format!(
                "{} numbers for {} keys",
                reply.len(),
                sent.len()
            )));
        }
        for (pair, (i, want)) in reply.chunks_exact(2).zip(sent) {
            let (granted, next_in_us) = (pair[0], pair[1]);
            let granted = u32::try_from(granted)
                .ok()
                .filter(|g| *g <= want)
                .ok_or_else(|| LimitError::Reply(format!("granted {granted} of {want}")))?;
            let next_in_us = u64::try_from(next_in_us)
                .map_err(|_| LimitError::Reply(format!("next permit in {next_in_us} µs")))?;
            grants[i] = Grant {
                granted,
                next_in: Duration::from_micros(next_in_us),
            };
        }
        Ok(grants)
    }

    /// Hands back `n` permits of `key` (see [`super::Limiter::refund`] for when). `rate` only
    /// has to be usable: the interval the permits were taken under is stored with the key.
    pub async fn refund(&self, key: &str, rate: Rate, n: u32) -> Result<(), LimitError> {
        if n == 0 || Gcra::from_rate(rate).is_none() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut call = self.refund_script.key(self.redis_key(key));
        call.arg(n);
        let _moved: i64 = self.timed(call.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), LimitError> {
        let mut conn = self.conn.clone();
        let pong: String = self
            .timed(redis::cmd("PING").query_async(&mut conn))
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(LimitError::Reply(format!("PING answered {pong:?}")))
        }
    }

    /// Registers (or refreshes) `process_id` as live, drops the processes not refreshed within
    /// `ttl` by Redis's clock, and returns how many processes are live, this one included.
    pub async fn register_process(
        &self,
        process_id: &str,
        ttl: Duration,
    ) -> Result<u32, LimitError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn.clone();
        let mut call = self.register_script.key(self.processes_key());
        call.arg(process_id).arg(ttl_ms);
        let live: i64 = self.timed(call.invoke_async(&mut conn)).await?;
        u32::try_from(live).map_err(|_| LimitError::Reply(format!("{live} live processes")))
    }

    /// Removes `process_id` from the live processes, so that the others count one fewer at
    /// once rather than after the ttl.
    pub async fn deregister_process(&self, process_id: &str) -> Result<(), LimitError> {
        let mut conn = self.conn.clone();
        let _removed: i64 = self
            .timed(
                redis::cmd("ZREM")
                    .arg(self.processes_key())
                    .arg(process_id)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, LimitError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_elapsed) => Err(LimitError::Timeout(self.call_timeout)),
        }
    }
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("key_prefix", &self.key_prefix)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

/// Parses `url` into a client; a malformed URL is [`LimitError::InvalidUrl`].
pub(crate) fn open_client(url: &str) -> Result<Client, LimitError> {
    Client::open(url).map_err(LimitError::InvalidUrl)
}

/// Connects a connection manager within `connect_timeout`.
///
/// The manager reconnects by itself after a lost connection. It is told not to retry a failed
/// reconnection with its own backoff (which would make calls wait seconds for a Redis that is
/// back): each later call that finds the connection failed starts one new attempt, so it is the
/// callers (the fail-safe limiter's probe, once per probe interval) that pace reconnection.
pub(crate) async fn connect_manager(
    client: Client,
    config: &RedisLimiterConfig,
) -> Result<ConnectionManager, LimitError> {
    let manager_config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(config.connect_timeout)
        .set_response_timeout(config.call_timeout);
    match tokio::time::timeout(
        config.connect_timeout,
        ConnectionManager::new_with_config(client, manager_config),
    )
    .await
    {
        Ok(conn) => Ok(conn?),
        Err(_elapsed) => Err(LimitError::Timeout(config.connect_timeout)),
    }
}
