//! Configuration: every knob in one place, with its default, unit and reason.
//!
//! Each flag can also be set by an environment variable `WSGATE_<FLAG>`; flags win.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

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
    /// Address to listen on (WebSocket upgrades, health, API). Port 0 picks a free port; the
    /// bound address is printed as `listening on ADDR`.
    #[arg(long, env = "WSGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Worker threads, one runtime and one SO_REUSEPORT listener each. 0 = number of CPUs.
    #[arg(long, env = "WSGATE_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// I/O driver. `auto` picks io_uring and falls back to epoll; `MONOIO_FORCE_LEGACY_DRIVER=1`
    /// also forces epoll.
    #[arg(long, env = "WSGATE_DRIVER", value_enum, default_value_t = DriverKind::Auto)]
    pub driver: DriverKind,

    /// Do not pin worker threads to CPUs.
    #[arg(long, env = "WSGATE_NO_PIN", default_value_t = false)]
    pub no_pin: bool,

    /// How often the server pings each connection (`500ms`, `2s`, `1m`).
    #[arg(long, env = "WSGATE_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A connection from which nothing (no frame, no pong) arrived for this long is closed
    /// with 4000. There is no other read timeout.
    #[arg(long, env = "WSGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Largest client message in bytes (after reassembly); larger closes with 1009.
    #[arg(long, env = "WSGATE_MAX_MESSAGE_SIZE", default_value_t = 65536)]
    pub max_message_size: usize,

    /// Largest outbound backlog per connection in bytes; a connection whose backlog would
    /// exceed it is a slow consumer and is closed with 1013.
    #[arg(long, env = "WSGATE_MAX_QUEUED_BYTES", default_value_t = 1 << 20)]
    pub max_queued_bytes: usize,

    /// On SIGINT/SIGTERM: stop accepting, close every connection with 1001, and exit within
    /// this time.
    #[arg(long, env = "WSGATE_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Time a new TCP connection has to send a complete HTTP request (upgrade or API).
    #[arg(long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Serve a plain RFC 6455 echo endpoint at this path (for conformance and comparisons).
    /// Off when unset.
    #[arg(long, env = "WSGATE_ECHO_PATH")]
    pub echo_path: Option<String>,

    /// Log filter in `RUST_LOG` syntax (e.g. `info`, `wsgate=debug`). `RUST_LOG` wins.
    #[arg(long, env = "WSGATE_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The configuration with every default, listening on `listen`.
    pub fn with_listen(listen: SocketAddr) -> Self {
        let mut c = Config::parse_from(["wsgate"]);
        c.listen = listen;
        c
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
        if self.max_message_size == 0 || self.max_queued_bytes == 0 {
            return Err("--max-message-size and --max-queued-bytes must be above zero".into());
        }
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
    fn defaults_are_the_documented_ones_and_valid() {
        let c = Config::parse_from(["wsgate"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.max_queued_bytes, 1 << 20);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn idle_timeout_must_exceed_ping_interval() {
        let c = Config::parse_from(["wsgate", "--ping-interval", "5s", "--idle-timeout", "5s"]);
        assert!(c.validate().unwrap_err().contains("--idle-timeout"));
    }
}
