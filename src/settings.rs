//! Settings: defaults, then an optional TOML file, then environment variables (which win).
//! Every setting is listed once, in [`KEYS`]; the README's table is written from it. A bad value
//! stops start-up with a message naming the setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herald_engine::{ConnectOptions, EngineConfig, QueueConfig};

/// (TOML key, environment variable, default, meaning).
pub const KEYS: &[(&str, &str, &str, &str)] = &[
    (
        "database_url",
        "DATABASE_URL",
        "sqlite:herald.db",
        "`sqlite:PATH` (embedded) or `postgres://…`",
    ),
    (
        "listen",
        "HERALD_LISTEN",
        "127.0.0.1:8080",
        "HTTP address of `herald serve`",
    ),
    (
        "metrics_listen",
        "HERALD_METRICS_LISTEN",
        "(none)",
        "`herald worker` serves `/metrics`, `/healthz` and `/readyz` on this address (`herald serve` has them on `listen`)",
    ),
    (
        "pg_schema",
        "HERALD_PG_SCHEMA",
        "(connection default)",
        "PostgreSQL schema for Herald's tables",
    ),
    (
        "db_max_connections",
        "HERALD_DB_MAX_CONNECTIONS",
        "16",
        "PostgreSQL pool size",
    ),
    (
        "sqlite_synchronous",
        "HERALD_SQLITE_SYNCHRONOUS",
        "full",
        "`full` (survives power loss) or `normal` (survives crashes)",
    ),
    (
        "queues",
        "HERALD_QUEUES",
        "default=100,send=256,webhooks=8",
        "queues this process works and their concurrency: `name=N,name=N`; empty: none",
    ),
    (
        "worker_id",
        "HERALD_WORKER_ID",
        "herald-PID-RANDOM",
        "this process's name in leases and leadership",
    ),
    (
        "claim_batch",
        "HERALD_CLAIM_BATCH",
        "1000",
        "most jobs claimed per statement (1 to 10000)",
    ),
    (
        "claim_threshold",
        "HERALD_CLAIM_THRESHOLD",
        "half of min(claim_batch, concurrency)",
        "a busy queue waits for this many free slots (or fetch_cooldown) before it claims",
    ),
    (
        "fetch_cooldown",
        "HERALD_FETCH_COOLDOWN",
        "2ms",
        "longest wait for claim_threshold free slots",
    ),
    (
        "completion_batch",
        "HERALD_COMPLETION_BATCH",
        "2000",
        "most completions written per statement",
    ),
    (
        "poll_interval",
        "HERALD_POLL_INTERVAL",
        "1s",
        "polling fallback when no wake-up arrives",
    ),
    (
        "lease",
        "HERALD_LEASE",
        "15s",
        "how long a claim holds without heartbeat",
    ),
    (
        "heartbeat_interval",
        "HERALD_HEARTBEAT_INTERVAL",
        "5s",
        "how often leases are renewed",
    ),
    (
        "rescue_interval",
        "HERALD_RESCUE_INTERVAL",
        "5s",
        "how often the leader rescues expired leases",
    ),
    (
        "shutdown_timeout",
        "HERALD_SHUTDOWN_TIMEOUT",
        "10s",
        "how long running jobs may finish on shutdown",
    ),
    (
        "leader_ttl",
        "HERALD_LEADER_TTL",
        "15s",
        "maintenance leadership lapses after this",
    ),
    (
        "leader_renew_interval",
        "HERALD_LEADER_RENEW_INTERVAL",
        "5s",
        "how often leadership is renewed",
    ),
    (
        "prune_interval",
        "HERALD_PRUNE_INTERVAL",
        "60s",
        "how often the archive is pruned",
    ),
    (
        "completed_retention",
        "HERALD_COMPLETED_RETENTION",
        "24h",
        "completed jobs are deleted after this",
    ),
    (
        "failed_retention",
        "HERALD_FAILED_RETENTION",
        "7d",
        "discarded and cancelled jobs are deleted after this",
    ),
    (
        "prune_batch",
        "HERALD_PRUNE_BATCH",
        "10000",
        "archived jobs deleted per pruning statement",
    ),
    (
        "vacuum_interval",
        "HERALD_VACUUM_INTERVAL",
        "5s",
        "how often the leader checks the hot table's dead rows (PostgreSQL)",
    ),
    (
        "vacuum_dead_rows",
        "HERALD_VACUUM_DEAD_ROWS",
        "50000",
        "the leader vacuums the hot table past this many dead rows (PostgreSQL)",
    ),
    (
        "maintenance",
        "HERALD_MAINTENANCE",
        "true",
        "take part in leader election (rescuer, pruner)",
    ),
    (
        "rate_tick",
        "HERALD_RATE_TICK",
        "20ms",
        "how often a rate-limited queue asks each channel for permits",
    ),
    (
        "redis_url",
        "HERALD_REDIS_URL",
        "(none: limits in this process)",
        "Redis shared by processes that send through the same channels: `redis://host:port`",
    ),
    (
        "redis_min_processes",
        "HERALD_REDIS_MIN_PROCESSES",
        "1",
        "while Redis is away, each process takes at most 1/N of half a channel's rate, N being at least this (set it to the number of sending processes)",
    ),
    (
        "unknown_grace",
        "HERALD_UNKNOWN_GRACE",
        "10m",
        "a send whose answer was lost is sent again only after this long without a status webhook (longer than `meta_timeout`)",
    ),
    (
        "meta_timeout",
        "HERALD_META_TIMEOUT",
        "15s",
        "a request to Meta not answered within this long (connecting included) counts as lost, or as not sent if no connection was made; proxies are not used",
    ),
    (
        "admin_token",
        "HERALD_ADMIN_TOKEN",
        "(none: admin routes closed)",
        "bearer token for the admin API (`POST /v1/workspaces`); at least 16 characters",
    ),
    (
        "master_key",
        "HERALD_MASTER_KEY",
        "(none: see master_key_file)",
        "32-byte key (base64 or 64 hex digits, `herald keys generate`) that encrypts channel secrets; required with PostgreSQL",
    ),
    (
        "previous_master_keys",
        "HERALD_PREVIOUS_MASTER_KEYS",
        "(none)",
        "comma-separated older keys, still accepted to decrypt until `herald keys rotate` has re-encrypted everything",
    ),
    (
        "master_key_file",
        "HERALD_MASTER_KEY_FILE",
        "herald.key",
        "on SQLite without master_key: the key's file, created with a new key (mode 0600) if missing; back it up with the database",
    ),
    (
        "log",
        "HERALD_LOG",
        "info",
        "log filter (`tracing` env-filter syntax)",
    ),
    (
        "threads",
        "HERALD_THREADS",
        "0",
        "threads of the async runtime: 0, one per core; 1, everything on one thread, which takes about a fifth less CPU per message (run more processes to use more cores)",
    ),
];

#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub listen: SocketAddr,
    /// Where `herald worker` serves its metrics and health checks; None: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    pub connect: ConnectOptions,
    pub engine: EngineConfig,
    /// None: rate limits are kept in this process only.
    pub redis_url: Option<String>,
    /// The fewest processes the fail-safe limiter assumes share a channel while Redis is away.
    pub redis_min_processes: u32,
    pub unknown_grace: Duration,
    pub meta_timeout: Duration,
    /// Threads of the async runtime: 0, one per core; 1, a current-thread runtime (no hand-offs
    /// between threads: the least CPU per message); more, that many.
    pub threads: usize,
    /// The bearer token of the admin API routes (creating workspaces); None closes them.
    pub admin_token: Option<Secret>,
    /// The key that encrypts channel secrets, as given (validated).
    pub master_key: Option<Secret>,
    pub previous_master_keys: Vec<Secret>,
    pub master_key_file: std::path::PathBuf,
    pub log: String,
}

/// A setting that must never be printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("settings file {path}: {message}")]
    File { path: String, message: String },
    #[error("setting {key} ({env}): {message}")]
    Invalid {
        key: &'static str,
        env: &'static str,
        message: String,
    },
}

impl Settings {
    /// Loads the file (if any) and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Settings::from_sources(file, &env)
    }

    pub fn from_sources(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let mut raw: BTreeMap<&'static str, String> = BTreeMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                path: path.display().to_string(),
                source,
            })?;
            read_toml(&text, &mut raw).map_err(|message| SettingsError::File {
                path: path.display().to_string(),
                message,
            })?;
        }
        for (key, var, _, _) in KEYS {
            if let Some(v) = env.get(*var) {
                raw.insert(key, v.clone());
            }
        }
        let r = Raw(raw);
        let defaults = EngineConfig::default();
        let engine = EngineConfig {
            worker_id: r.str("worker_id").unwrap_or(defaults.worker_id.clone()),
            queues: match r.str("queues") {
                Some(q) => r.parse("queues", |_| parse_queues(&q))?,
                None => defaults.queues.clone(),
            },
            claim_batch: r.num("claim_batch", defaults.claim_batch)?,
            claim_threshold: match r.str("claim_threshold") {
                None => None,
                Some(_) => Some(r.num("claim_threshold", 1)?),
            },
            fetch_cooldown: r.dur("fetch_cooldown", defaults.fetch_cooldown)?,
            completion_batch: r.num("completion_batch", defaults.completion_batch)?,
            prune_batch: r.num("prune_batch", defaults.prune_batch)?,
            vacuum_interval: r.dur("vacuum_interval", defaults.vacuum_interval)?,
            vacuum_dead_rows: r.num("vacuum_dead_rows", defaults.vacuum_dead_rows)?,
            poll_interval: r.dur("poll_interval", defaults.poll_interval)?,
            lease: r.dur("lease", defaults.lease)?,
            heartbeat_interval: r.dur("heartbeat_interval", defaults.heartbeat_interval)?,
            rescue_interval: r.dur("rescue_interval", defaults.rescue_interval)?,
            shutdown_timeout: r.dur("shutdown_timeout", defaults.shutdown_timeout)?,
            leader_ttl: r.dur("leader_ttl", defaults.leader_ttl)?,
            leader_renew_interval: r
                .dur("leader_renew_interval", defaults.leader_renew_interval)?,
            prune_interval: r.dur("prune_interval", defaults.prune_interval)?,
            completed_retention: r.dur("completed_retention", defaults.completed_retention)?,
            failed_retention: r.dur("failed_retention", defaults.failed_retention)?,
            rate_tick: r.dur("rate_tick", defaults.rate_tick)?,
            max_rate_keys: defaults.max_rate_keys,
            maintenance: r.boolean("maintenance", defaults.maintenance)?,
        };
        if let Err(message) = engine.validate() {
            // Name the setting the engine complained about.
            // The engine's messages start with the setting's name; "queue …" means queues.
            let key = KEYS
                .iter()
                .map(|(k, _, _, _)| *k)
                .filter(|k| message.starts_with(k))
                .max_by_key(|k| k.len())
                .unwrap_or("queues");
            return Err(r.invalid(key, message));
        }
        if engine.claim_batch > 10_000 {
            return Err(r.invalid("claim_batch", "must be at most 10000".into()));
        }
        let database_url = r
            .str("database_url")
            .unwrap_or_else(|| "sqlite:herald.db".into());
        r.parse("database_url", |_| {
            herald_engine::Backend::of_url(&database_url)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })?;
        let schema = r.str("pg_schema");
        if let Some(s) = &schema {
            let ok = !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !s.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(r.invalid(
                    "pg_schema",
                    "use lowercase letters, digits and underscores".into(),
                ));
            }
        }
        let sync_full = match r.str("sqlite_synchronous").as_deref() {
            None | Some("full") | Some("FULL") => true,
            Some("normal") | Some("NORMAL") => false,
            Some(other) => {
                return Err(r.invalid(
                    "sqlite_synchronous",
                    format!("{other:?} is not full or normal"),
                ))
            }
        };
        let max_connections: u32 = r.num("db_max_connections", 16)?;
        if max_connections < 2 {
            return Err(r.invalid("db_max_connections", "must be at least 2".into()));
        }
        Ok(Settings {
            listen: r.parse("listen", |v| {
                v.unwrap_or("127.0.0.1:8080")
                    .parse::<SocketAddr>()
                    .map_err(|e| e.to_string())
            })?,
            metrics_listen: r.parse("metrics_listen", |v| match v.filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v.parse::<SocketAddr>().map(Some).map_err(|e| e.to_string()),
            })?,
            connect: ConnectOptions {
                max_connections,
                schema,
                sqlite_synchronous_full: sync_full,
                ..ConnectOptions::default()
            },
            database_url,
            engine,
            redis_url: match r.str("redis_url").filter(|u| !u.is_empty()) {
                Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                    Some(url)
                }
                Some(other) => {
                    return Err(r.invalid(
                        "redis_url",
                        format!("{other:?} is not a redis:// or rediss:// URL"),
                    ))
                }
                None => None,
            },
            admin_token: match r.str("admin_token").filter(|t| !t.is_empty()) {
                Some(t) if t.len() < 16 => {
                    return Err(r.invalid(
                        "admin_token",
                        "must be at least 16 characters (it guards every workspace)".into(),
                    ))
                }
                t => t.map(Secret),
            },
            master_key: match r.str("master_key").filter(|k| !k.trim().is_empty()) {
                Some(k) => {
                    herald_engine::crypto::parse_key(&k)
                        .map_err(|e| r.invalid("master_key", e.to_string()))?;
                    Some(Secret(k))
                }
                None => None,
            },
            previous_master_keys: {
                let keys: Vec<String> = r
                    .str("previous_master_keys")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect();
                for k in &keys {
                    herald_engine::crypto::parse_key(k)
                        .map_err(|e| r.invalid("previous_master_keys", e.to_string()))?;
                }
                keys.into_iter().map(Secret).collect()
            },
            master_key_file: r
                .str("master_key_file")
                .unwrap_or_else(|| "herald.key".to_owned())
                .into(),
            redis_min_processes: {
                let n: u32 = r.num("redis_min_processes", 1)?;
                if n == 0 {
                    return Err(r.invalid("redis_min_processes", "must be at least 1".into()));
                }
                n
            },
            unknown_grace: {
                let grace = r.dur(
                    "unknown_grace",
                    herald_engine::delivery::DEFAULT_UNKNOWN_GRACE,
                )?;
                let timeout = r.dur("meta_timeout", Duration::from_secs(15))?;
                // A request whose answer was lost may still be at Meta until its timeout, and
                // its status webhook comes after that: a grace period within the timeout would
                // resend before Meta could have told us it has the message.
                if grace <= timeout {
                    return Err(r.invalid(
                        "unknown_grace",
                        format!("must be longer than meta_timeout ({timeout:?})"),
                    ));
                }
                grace
            },
            meta_timeout: r.dur("meta_timeout", Duration::from_secs(15))?,
            log: r.str("log").unwrap_or_else(|| "info".into()),
            threads: {
                let n: usize = r.num("threads", 0)?;
                if n > 1024 {
                    return Err(r.invalid("threads", "must be at most 1024".into()));
                }
                n
            },
        })
    }
}

struct Raw(BTreeMap<&'static str, String>);

impl Raw {
    fn str(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }

    fn invalid(&self, key: &str, message: String) -> SettingsError {
        let (k, env) = KEYS
            .iter()
            .find(|(k, _, _, _)| *k == key)
            .map(|(k, e, _, _)| (*k, *e))
            .unwrap_or(("?", "?"));
        SettingsError::Invalid {
            key: k,
            env,
            message,
        }
    }

    fn parse<T>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&str>) -> Result<T, String>,
    ) -> Result<T, SettingsError> {
        f(self.0.get(key).map(String::as_str)).map_err(|m| self.invalid(key, m))
    }

    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, SettingsError>
    where
        T::Err: std::fmt::Display,
    {
        self.parse(key, |v| match v {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|e| format!("{v:?} is not a valid number: {e}")),
        })
    }

    fn dur(&self, key: &str, default: Duration) -> Result<Duration, SettingsError> {
        self.parse(key, |v| match v {
            None => Ok(default),
            Some(v) => parse_duration(v),
        })
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, SettingsError> {
        self.parse(key, |v| match v.map(str::trim) {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(format!("{other:?} is not true or false")),
        })
    }
}

fn read_toml(text: &str, raw: &mut BTreeMap<&'static str, String>) -> Result<(), String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    for (key, value) in table {
        let Some((k, _, _, _)) = KEYS.iter().find(|(k, _, _, _)| *k == key) else {
            return Err(format!("unknown setting {key:?}"));
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Table(t) if *k == "queues" => t
                .iter()
                .map(|(q, n)| match n {
                    toml::Value::Integer(n) => Ok(format!("{q}={n}")),
                    other => Err(format!("queues.{q}: {other:?} is not a number")),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => return Err(format!("{key}: unsupported value {other:?}")),
        };
        raw.insert(k, text);
    }
    Ok(())
}

/// `name=N,name=N` (spaces allowed); an empty string means no queues.
pub fn parse_queues(s: &str) -> Result<BTreeMap<String, QueueConfig>, String> {
    let mut queues = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not name=concurrency"))?;
        let concurrency: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: concurrency must be a number"))?;
        if concurrency == 0 || concurrency > 100_000 {
            return Err(format!("{part:?}: concurrency must be 1 to 100000"));
        }
        queues.insert(name.trim().to_owned(), QueueConfig { concurrency });
    }
    Ok(queues)
}

/// `250ms`, `15s`, `5m`, `24h`, `7d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 15s, 5m, 24h or 7d"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    if !secs.is_finite() || secs > 10.0 * 365.0 * 86400.0 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn readme_lists_every_setting() {
        let readme = include_str!("../README.md");
        for (key, env, default, _) in KEYS {
            let row = format!("| `{key}` | `{env}` |");
            assert!(
                readme.contains(&row),
                "README's settings table lacks {key} ({env})"
            );
            assert!(
                readme.contains(&format!("{row} `{default}` |"))
                    || readme.contains(&format!("{row} {default} |")),
                "README gives another default for {key} than KEYS ({default})"
            );
        }
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let s = Settings::from_sources(None, &env(&[])).expect("defaults");
        assert_eq!(s.database_url, "sqlite:herald.db");
        assert_eq!(s.engine.queues["default"].concurrency, 100);
        assert_eq!(s.listen.port(), 8080);
        assert_eq!(s.threads, 0, "one thread per core");
        let s = Settings::from_sources(None, &env(&[("HERALD_THREADS", "1")])).expect("threads");
        assert_eq!(s.threads, 1);
    }

    #[test]
    fn env_overrides_file() {
        let path =
            std::env::temp_dir().join(format!("herald_settings_{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "database_url = \"postgres://x@localhost/db\"\nlease = \"20s\"\n[queues]\nmessages = 7\n",
        )
        .expect("write");
        let s =
            Settings::from_sources(Some(&path), &env(&[("HERALD_LEASE", "30s")])).expect("load");
        assert_eq!(s.database_url, "postgres://x@localhost/db");
        assert_eq!(s.engine.lease, Duration::from_secs(30));
        assert_eq!(s.engine.queues["messages"].concurrency, 7);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("HERALD_LEASE", "soon", "lease"),
            ("HERALD_QUEUES", "default=0", "queues"),
            ("HERALD_LISTEN", "nowhere", "listen"),
            ("DATABASE_URL", "mysql://x", "database_url"),
            ("HERALD_MAINTENANCE", "maybe", "maintenance"),
            ("HERALD_HEARTBEAT_INTERVAL", "1h", "heartbeat_interval"),
            (
                "HERALD_LEADER_RENEW_INTERVAL",
                "1h",
                "leader_renew_interval",
            ),
            ("HERALD_CLAIM_BATCH", "20000", "claim_batch"),
            ("HERALD_COMPLETION_BATCH", "0", "completion_batch"),
            ("HERALD_SQLITE_SYNCHRONOUS", "off", "sqlite_synchronous"),
            ("HERALD_PG_SCHEMA", "Bad-Name", "pg_schema"),
            ("HERALD_THREADS", "one", "threads"),
            ("HERALD_THREADS", "5000", "threads"),
            ("HERALD_UNKNOWN_GRACE", "15s", "unknown_grace"),
        ];
        for (var, value, key) in cases {
            let err = Settings::from_sources(None, &env(&[(var, value)]))
                .expect_err(var)
                .to_string();
            assert!(err.contains(key) && err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let path =
            std::env::temp_dir().join(format!("herald_settings_bad_{}.toml", std::process::id()));
        std::fs::write(&path, "leese = \"20s\"\n").expect("write");
        let err = Settings::from_sources(Some(&path), &env(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("leese"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
