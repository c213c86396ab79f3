//! Configuration: every knob in one place, with its default, unit and reason.
//!
//! Each flag can also be set by an environment variable `WSGATE_<FLAG>` and by a key of a TOML
//! file given with `--config` (`max_message_size = 4096` or `max-message-size = 4096`).
//! Precedence: flag, then environment, then file, then the built-in default.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Which monoio driver the workers run.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DriverKind {
    /// io_uring where the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring only (fails to start without it).
    IoUring,
    /// epoll only (the legacy driver).
    Epoll,
}

/// wsgate: a WebSocket push gateway.
#[derive(Parser, Debug, Clone)]
#[command(name = "wsgate", version, about, long_about = None)]
pub struct Config {
    /// TOML file with any of these settings (keys are the flag names without `--`).
    #[arg(help_heading = "Network", long, env = "WSGATE_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Address to listen on (WebSocket upgrades, health, API). Port 0 picks a free port; the
    /// bound address is printed as `listening on ADDR`.
    #[arg(
        help_heading = "Network",
        long,
        env = "WSGATE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,

    /// Worker threads, one runtime and one SO_REUSEPORT listener each. 0 = number of CPUs.
    #[arg(
        help_heading = "Network",
        long,
        env = "WSGATE_WORKERS",
        default_value_t = 0
    )]
    pub workers: usize,

    /// I/O driver. `auto` picks io_uring and falls back to epoll; `MONOIO_FORCE_LEGACY_DRIVER=1`
    /// also forces epoll.
    #[arg(help_heading = "Network", long, env = "WSGATE_DRIVER", value_enum, default_value_t = DriverKind::Auto)]
    pub driver: DriverKind,

    /// Do not pin worker threads to CPUs.
    #[arg(
        help_heading = "Network",
        long,
        env = "WSGATE_NO_PIN",
        default_value_t = false
    )]
    pub no_pin: bool,

    /// Read and write WebSocket connections through readiness waits, `recv` and `sendmsg`,
    /// not the io_uring data path (multishot receives into a per-core buffer ring, sends on
    /// the ring). The data path is used only where the workers run on io_uring; this is for
    /// comparison and fallback.
    #[arg(
        help_heading = "Network",
        long,
        env = "WSGATE_NO_RING",
        default_value_t = false
    )]
    pub no_ring: bool,

    /// The io_uring data path, the default again: accepted (and ignored) so that commands
    /// and environments written while it was opt-in keep working.
    #[arg(long, env = "WSGATE_RING", hide = true, default_value_t = false)]
    pub ring: bool,

    /// How often the server pings each connection (`500ms`, `2s`, `1m`).
    #[arg(help_heading = "Liveness", long, env = "WSGATE_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A connection from which nothing (no frame, no pong) arrived for this long is closed
    /// with 4000. There is no other read timeout.
    #[arg(help_heading = "Liveness", long, env = "WSGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Largest client message in bytes (after reassembly); larger closes with 1009.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_MAX_MESSAGE_SIZE",
        default_value_t = 65536
    )]
    pub max_message_size: usize,

    /// Largest outbound backlog per connection in bytes; a connection whose backlog would
    /// exceed it is a slow consumer and is closed with 1013.
    #[arg(help_heading = "Limits", long, env = "WSGATE_MAX_QUEUED_BYTES", default_value_t = 1 << 20)]
    pub max_queued_bytes: usize,

    /// Bound on the outbound bytes queued over all connections of the process. Past each
    /// core's share, the gateway stops reading from clients (publishers included) until the
    /// recipients have read the backlog down: backpressure instead of unbounded memory. A
    /// single lagging connection is still closed at `--max-queued-bytes`.
    #[arg(help_heading = "Limits", long, env = "WSGATE_MAX_TOTAL_QUEUED_BYTES", default_value_t = 256 << 20)]
    pub max_total_queued_bytes: usize,

    /// Messages one core may have queued from the other cores before every core stops
    /// reading from clients until it catches up (cross-core backpressure).
    /// Also bounds the overshoot of `--max-total-queued-bytes`: publishes already in flight
    /// between cores when the pressure turns on are still delivered.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_MAILBOX_LIMIT",
        default_value_t = 16384
    )]
    pub mailbox_limit: usize,

    /// Most TCP connections not upgraded to WebSocket (reading a request, answering plain
    /// HTTP or the API, or waiting for the next keep-alive request); more are refused at once
    /// with 503. Counted apart from WebSocket connections. 0 = a quarter of the process's
    /// file-descriptor limit (at least 64).
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_MAX_HTTP_CONNECTIONS",
        default_value_t = 0
    )]
    pub max_http_connections: usize,

    /// How long a plain-HTTP keep-alive connection may wait for its next request.
    #[arg(help_heading = "Liveness", long, env = "WSGATE_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,

    /// On SIGINT/SIGTERM: stop accepting, close every connection with 1001, and exit within
    /// this time.
    #[arg(help_heading = "Network", long, env = "WSGATE_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Time a new TCP connection has to send a complete HTTP request (upgrade or API).
    #[arg(help_heading = "Liveness", long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Serve a plain RFC 6455 echo endpoint at this path (for conformance and comparisons).
    /// Off when unset. Unauthenticated: refused on a non-loopback address without --insecure.
    #[arg(
        help_heading = "Observability and development",
        long,
        env = "WSGATE_ECHO_PATH"
    )]
    pub echo_path: Option<String>,

    /// Serve the demo chat page at /demo/ (the JavaScript client on a small page). Off by
    /// default; refused on a non-loopback address without --insecure.
    #[arg(
        help_heading = "Observability and development",
        long,
        env = "WSGATE_DEMO",
        default_value_t = false
    )]
    pub demo: bool,

    /// Log filter in `RUST_LOG` syntax (e.g. `info`, `wsgate=debug`). `RUST_LOG` wins.
    #[arg(
        help_heading = "Observability and development",
        long,
        env = "WSGATE_LOG",
        default_value = "info"
    )]
    pub log: String,

    /// HS256 secret for JWT identity (`?token=` or `Authorization: Bearer`). Once set,
    /// `?user=` is refused.
    #[arg(
        help_heading = "Identity and access",
        long,
        env = "WSGATE_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// Clock skew allowed when checking a token's `exp`.
    #[arg(help_heading = "Identity and access", long, env = "WSGATE_JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Key every `/api/` call must present as `Authorization: Bearer <key>`.
    #[arg(
        help_heading = "Identity and access",
        long,
        env = "WSGATE_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Allow listening on a non-loopback address without both a JWT secret and an API key.
    #[arg(
        help_heading = "Identity and access",
        long,
        env = "WSGATE_INSECURE",
        default_value_t = false
    )]
    pub insecure: bool,

    /// PEM certificate chain (server certificate first): with `--tls-key`, every connection on
    /// the listener is TLS (`wss://`, and HTTPS for health, metrics and the API). SIGHUP
    /// reloads both files; open connections keep their session.
    #[arg(help_heading = "TLS", long, env = "WSGATE_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--tls-cert` (PKCS#8, RSA or EC).
    #[arg(help_heading = "TLS", long, env = "WSGATE_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Comma-separated origins allowed to upgrade (checked only when an `Origin` header is
    /// present); others get 403. Unset: every origin.
    #[arg(
        help_heading = "Identity and access",
        long,
        env = "WSGATE_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Most WebSocket connections in total; more get 503 at upgrade. 0 = no limit (the file
    /// descriptor limit still applies).
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_MAX_CONNECTIONS",
        default_value_t = 0
    )]
    pub max_connections: usize,

    /// Most connections one user may hold; more get 429 at upgrade. 0 = no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_MAX_CONNECTIONS_PER_USER",
        default_value_t = 0
    )]
    pub max_connections_per_user: usize,

    /// Most rooms one connection may be in; beyond it `join` gets `too_many_rooms`.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_MAX_ROOMS_PER_CONN",
        default_value_t = 128
    )]
    pub max_rooms_per_conn: usize,

    /// Messages per second a connection may send (token bucket); over it a message gets
    /// `error rate_limited`. 0 = no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_RATE_LIMIT",
        default_value_t = 0.0
    )]
    pub rate_limit: f64,

    /// Burst for `--rate-limit` (messages). 0 = one second's worth.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_RATE_BURST",
        default_value_t = 0
    )]
    pub rate_burst: u32,

    /// A connection refused this many messages in a row for its rate is closed with 1008.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WSGATE_RATE_LIMIT_CLOSE_AFTER",
        default_value_t = 100
    )]
    pub rate_limit_close_after: u32,

    /// Cluster mode: the broker shared by every node, `nats://[user:pass@]HOST:PORT`
    /// (comma-separated URLs: servers of one NATS cluster) or `redis://[:pass@]HOST:PORT`
    /// (one URL). Unset: a single node, no broker.
    #[arg(
        help_heading = "Cluster",
        long,
        env = "WSGATE_CLUSTER",
        value_delimiter = ','
    )]
    pub cluster: Vec<String>,

    /// This node's name in stats, metrics and logs; unique per cluster. Default: host name
    /// and process id.
    #[arg(help_heading = "Cluster", long, env = "WSGATE_NODE_ID")]
    pub node_id: Option<String>,

    /// Subject prefix on the broker: nodes with different prefixes on one broker are
    /// separate clusters. Dot-separated tokens of `A-Z a-z 0-9 _ -`.
    #[arg(
        help_heading = "Cluster",
        long,
        env = "WSGATE_CLUSTER_PREFIX",
        default_value = "wsgate"
    )]
    pub cluster_prefix: String,

    /// How long a count (`delivered`, presence, `closed`) waits for the other nodes' answers
    /// before leaving out those that have not answered.
    #[arg(help_heading = "Cluster", long, env = "WSGATE_CLUSTER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub cluster_timeout: Duration,
}

impl Config {
    /// Parses flags, environment and the `--config` file (in that precedence). Usage errors,
    /// `--help` and `--version` print and exit as clap does; a bad file is an `Err`.
    pub fn load() -> Result<Config, String> {
        match Self::load_inner(std::env::args_os().collect()) {
            Ok(c) => Ok(c),
            Err(LoadError::Clap(e)) => e.exit(),
            Err(LoadError::File(e)) => Err(e),
        }
    }

    /// [`Config::load`] from explicit arguments (the first is the program name).
    pub fn load_from<I, T>(args: I) -> Result<Config, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::load_inner(args.into_iter().map(Into::into).collect()).map_err(|e| match e {
            LoadError::Clap(e) => e.to_string(),
            LoadError::File(e) => e,
        })
    }

    fn load_inner(args: Vec<OsString>) -> Result<Config, LoadError> {
        let file_err = LoadError::File;
        // First pass: only to find the file (flag or WSGATE_CONFIG).
        let first = Config::command()
            .ignore_errors(true)
            .try_get_matches_from(&args)
            .ok();
        let path = first
            .as_ref()
            .and_then(|m| m.get_one::<std::path::PathBuf>("config").cloned());
        let mut cmd = Config::command();
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| file_err(format!("cannot read --config {}: {e}", path.display())))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| file_err(format!("invalid TOML in {}: {e}", path.display())))?;
            for (key, value) in table {
                let id = key.replace('-', "_");
                if id == "config" || !cmd.get_arguments().any(|a| a.get_id() == id.as_str()) {
                    return Err(file_err(format!(
                        "unknown setting `{key}` in {}",
                        path.display()
                    )));
                }
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                // The file's value becomes the default: env and flags still win.
                let text: &'static str = Box::leak(text.into_boxed_str());
                cmd = cmd.mut_arg(id, |a| a.default_value(text));
            }
        }
        let matches: ArgMatches = cmd.try_get_matches_from(&args).map_err(LoadError::Clap)?;
        Config::from_arg_matches(&matches).map_err(LoadError::Clap)
    }

    /// The configuration with every default, listening on `listen`.
    pub fn with_listen(listen: SocketAddr) -> Self {
        let mut c = Config::parse_from(["wsgate"]);
        c.listen = listen;
        c
    }

    /// `--max-http-connections` after resolving 0 to a quarter of the descriptor limit.
    pub fn http_connection_limit(&self) -> usize {
        if self.max_http_connections > 0 {
            return self.max_http_connections;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        (fds / 4).max(64)
    }

    /// This node's id: `--node-id`, else host name and process id.
    pub fn node_name(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "wsgate".into());
        format!("{host}-{}", std::process::id())
    }

    /// Checks the cluster flags (see [`Config::validate`]).
    fn validate_cluster(&self) -> Result<(), String> {
        if self.cluster.is_empty() {
            return Ok(());
        }
        if self.cluster.iter().any(|u| crate::cluster::is_redis(u)) {
            if self.cluster.len() > 1 {
                return Err(
                    "--cluster: give one redis:// URL (Redis Cluster and Sentinel are not \
                     supported), and never mix redis:// with nats://"
                        .into(),
                );
            }
            let url = self.cluster[0].trim();
            if let Err(e) = redis::Client::open(url) {
                return Err(format!("--cluster {url}: {e}"));
            }
        }
        for url in &self.cluster {
            let lower = url.trim().to_ascii_lowercase();
            if lower.starts_with("rediss://") {
                return Err(format!(
                    "--cluster {url}: TLS to Redis (rediss://) is not supported; use redis://"
                ));
            }
            if lower.starts_with("redis://") {
                continue;
            }
            if !lower.starts_with("nats://") || lower.len() == "nats://".len() {
                return Err(format!(
                    "--cluster {url}: expected nats://HOST:PORT or redis://HOST:PORT (the scheme picks the broker)"
                ));
            }
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !self.cluster_prefix.split('.').all(token_ok) || self.cluster_prefix.len() > 64 {
            return Err(format!(
                "--cluster-prefix {:?}: use dot-separated tokens of A-Z a-z 0-9 _ - (at most 64 \
                 bytes)",
                self.cluster_prefix
            ));
        }
        let node = self.node_name();
        if node.is_empty() || node.len() > 128 || !node.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "--node-id {node:?}: 1-128 printable ASCII characters, no spaces"
            ));
        }
        // Under the API's own 10 s wait, or API calls would answer 503 instead of a count.
        if self.cluster_timeout.is_zero() || self.cluster_timeout > Duration::from_secs(8) {
            return Err(
                "--cluster-timeout must be above zero and at most 8s (API calls answer within 10 s)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Worker count after resolving 0 to the number of CPUs.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Checks values that parse but cannot work; the message says which and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_count() > crate::key::MAX_CORES {
            return Err(format!(
                "--workers {} is more than the {} a connection key can name",
                self.worker_count(),
                crate::key::MAX_CORES
            ));
        }
        if self.ping_interval.is_zero() || self.idle_timeout.is_zero() {
            return Err("--ping-interval and --idle-timeout must be above zero".into());
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(format!(
                "--idle-timeout ({:?}) must be longer than --ping-interval ({:?}), or healthy idle \
                 connections would be closed before they could answer a ping",
                self.idle_timeout, self.ping_interval
            ));
        }
        // Far beyond any useful setting, and short of overflowing a deadline computed from it.
        const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
        for (flag, d) in [
            ("--ping-interval", self.ping_interval),
            ("--idle-timeout", self.idle_timeout),
            ("--shutdown-timeout", self.shutdown_timeout),
            ("--handshake-timeout", self.handshake_timeout),
            ("--http-idle-timeout", self.http_idle_timeout),
            ("--jwt-leeway", self.jwt_leeway),
        ] {
            if d > MAX_DURATION {
                return Err(format!("{flag} ({d:?}) must be at most 365d"));
            }
        }
        if self.max_message_size == 0 || self.max_queued_bytes == 0 {
            return Err("--max-message-size and --max-queued-bytes must be above zero".into());
        }
        if self.handshake_timeout.is_zero() || self.http_idle_timeout.is_zero() {
            return Err("--handshake-timeout and --http-idle-timeout must be above zero".into());
        }
        if self.mailbox_limit == 0 {
            return Err("--mailbox-limit must be above zero".into());
        }
        if self.max_total_queued_bytes < self.max_queued_bytes {
            return Err(format!(
                "--max-total-queued-bytes ({}) must be at least --max-queued-bytes ({}): one \
                 connection's backlog would pause the whole gateway",
                self.max_total_queued_bytes, self.max_queued_bytes
            ));
        }
        let public = !self.listen.ip().is_loopback();
        if public && !self.insecure {
            if let Some(p) = &self.echo_path {
                return Err(format!(
                    "refusing to serve the unauthenticated echo endpoint --echo-path {p} on {}: \
                     bind to 127.0.0.1, or pass --insecure if this network is trusted",
                    self.listen
                ));
            }
            if self.demo {
                return Err(format!(
                    "refusing to serve the --demo page on {}: it is for local development. \
                     Bind to 127.0.0.1, or pass --insecure if this network is trusted",
                    self.listen
                ));
            }
        }
        if !self.listen.ip().is_loopback()
            && (self.jwt_secret.is_none() || self.api_key.is_none())
            && !self.insecure
        {
            return Err(format!(
                "refusing to listen on {} without both --jwt-secret and --api-key: anyone who \
                 can reach it could connect as any user and call the API. Set both, bind to \
                 127.0.0.1, or pass --insecure if this network is trusted",
                self.listen
            ));
        }
        if self.jwt_secret.as_deref() == Some("") || self.api_key.as_deref() == Some("") {
            return Err("--jwt-secret and --api-key must not be empty".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(
                "--tls-cert and --tls-key go together: give both (PEM chain and its key), or \
                 neither for plain ws:// and HTTP"
                    .into(),
            );
        }
        if self.rate_limit < 0.0 || !self.rate_limit.is_finite() {
            return Err("--rate-limit must be a non-negative number".into());
        }
        if self.max_rooms_per_conn == 0 {
            return Err("--max-rooms-per-conn must be above zero".into());
        }
        self.validate_cluster()?;
        if let Some(p) = &self.echo_path {
            if !p.starts_with('/') || p == "/ws" {
                return Err(format!(
                    "--echo-path must start with '/' and differ from /ws (got {p:?})"
                ));
            }
        }
        Ok(())
    }
}

enum LoadError {
    Clap(clap::Error),
    File(String),
}

/// Parses `500ms`, `2s`, `1m`, `1h` (anything humantime accepts).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_forms() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn durations_beyond_a_year_are_refused_by_name() {
        let c = Config::parse_from(["wsgate", "--shutdown-timeout", "400d"]);
        let e = c.validate().unwrap_err();
        assert!(e.contains("--shutdown-timeout"), "{e}");
        let c = Config::parse_from(["wsgate", "--idle-timeout", "365d"]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let c = Config::parse_from(["wsgate"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.max_queued_bytes, 1 << 20);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert!(!c.no_ring, "the io_uring data path is on by default");
        assert!(c.validate().is_ok());
        // `--ring`, from when the data path was opt-in, still parses and changes nothing.
        let old = Config::parse_from(["wsgate", "--ring"]);
        assert!(!old.no_ring && old.validate().is_ok());
        assert!(Config::parse_from(["wsgate", "--no-ring"]).no_ring);
    }

    #[test]
    fn file_env_and_flag_precedence() {
        let dir = std::env::temp_dir().join(format!("wsgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("wsgate.toml");
        std::fs::write(
            &file,
            "max-message-size = 1000\nmax_queued_bytes = 2000\nping_interval = \"3s\"\n\
             allowed_origins = [\"https://a\", \"https://b\"]\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = Config::load_from(["wsgate", "--config", f]).unwrap();
        assert_eq!(c.max_message_size, 1000);
        assert_eq!(c.max_queued_bytes, 2000);
        assert_eq!(c.ping_interval, Duration::from_secs(3));
        assert_eq!(c.allowed_origins, vec!["https://a", "https://b"]);
        let c = Config::load_from(["wsgate", "--config", f, "--max-message-size", "7"]).unwrap();
        assert_eq!(c.max_message_size, 7);
        std::fs::write(&file, "no_such_flag = 1\n").unwrap();
        let e = Config::load_from(["wsgate", "--config", f]).unwrap_err();
        assert!(e.contains("no_such_flag"), "{e}");
        std::fs::write(&file, "max_message_size = \"lots\"\n").unwrap();
        assert!(Config::load_from(["wsgate", "--config", f]).is_err());
    }

    #[test]
    fn public_address_needs_secrets_or_insecure() {
        let c = Config::parse_from(["wsgate", "--listen", "0.0.0.0:0"]);
        assert!(c.validate().unwrap_err().contains("--insecure"));
        let c = Config::parse_from(["wsgate", "--listen", "0.0.0.0:0", "--insecure"]);
        assert!(c.validate().is_ok());
        let c = Config::parse_from([
            "wsgate",
            "--listen",
            "0.0.0.0:0",
            "--jwt-secret",
            "s",
            "--api-key",
            "k",
        ]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn cluster_flags_are_checked() {
        let c = Config::parse_from(["wsgate"]);
        assert!(c.cluster.is_empty());
        assert_eq!(c.cluster_prefix, "wsgate");
        assert_eq!(c.cluster_timeout, Duration::from_secs(2));
        let c = Config::parse_from(["wsgate", "--cluster", "redis://127.0.0.1:6379"]);
        assert!(c.validate().is_ok());
        let c = Config::parse_from(["wsgate", "--cluster", "redis://a:1,nats://b:2"]);
        assert!(c.validate().unwrap_err().contains("one redis:// URL"));
        let c = Config::parse_from(["wsgate", "--cluster", "rediss://a:1"]);
        assert!(c.validate().unwrap_err().contains("not supported"));
        let c = Config::parse_from(["wsgate", "--cluster", "http://x"]);
        assert!(c.validate().unwrap_err().contains("nats://"));
        let c = Config::parse_from(["wsgate", "--cluster", "nats://a:1,nats://b:2"]);
        assert_eq!(c.cluster.len(), 2);
        assert!(c.validate().is_ok());
        assert!(c.node_name().ends_with(&format!("-{}", std::process::id())));
        for bad in ["a..b", "a.*", ">", "a b", ""] {
            let c =
                Config::parse_from(["wsgate", "--cluster", "nats://a:1", "--cluster-prefix", bad]);
            assert!(c.validate().is_err(), "prefix {bad:?} accepted");
        }
        let c = Config::parse_from(["wsgate", "--cluster", "nats://a:1", "--node-id", "a b"]);
        assert!(c.validate().is_err());
    }

    #[test]
    fn idle_timeout_must_exceed_ping_interval() {
        let c = Config::parse_from(["wsgate", "--ping-interval", "5s", "--idle-timeout", "5s"]);
        assert!(c.validate().unwrap_err().contains("--idle-timeout"));
    }
}
