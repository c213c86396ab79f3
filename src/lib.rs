//! wsgate: a WebSocket push gateway.
//!
//! Clients hold long-lived WebSocket connections under a user id; the gateway delivers
//! messages to every connection of a user, from other clients or backends.
//!
//! # Map of the crate
//!
//! | module | stage of a connection's life |
//! | --- | --- |
//! | `api` | plain HTTP: health, metrics, backend API |
//! | [`auth`] | JWT identity and the API key |
//! | [`server`] | listeners (`SO_REUSEPORT`, one per core), worker threads, shutdown |
//! | `core` | one core's glue: feeds the router events, carries out its actions, batches |
//! | [`route`] | the router, I/O-free: directory, rooms, waiters, routing rules |
//! | `conn` | a connection: HTTP request, upgrade, then one task: reader and single writer |
//! | `outbox` | what others may touch of a connection: its queue, close request, waker |
//! | [`codec`] | WebSocket frames: decoder for client frames, encoders for server frames |
//! | [`http`] | HTTP/1.1 parsing, upgrade checks, plain answers |
//! | [`tls`] | certificates, their reload, rustls sans-IO on the raw descriptor |
//! | [`protocol`] | the v1 JSON messages |
//! | [`mailbox`] | cross-core channel of batches with one wake per batch; backpressure |
//! | [`key`] | generational connection keys: stale keys miss |
//! | [`stats`] | per-core counters |
//! | [`config`] | every flag, its default and why |
//! | [`cluster`] | cluster mode: the bridge to the NATS broker, subjects, wire format |
//! | [`client`] | a blocking client for tests and tools |
//!
//! The design rules (one runtime per core, one writer per socket, liveness by ping, stale keys
//! are harmless, everything bounded) are explained in each module and in the README.

#![warn(missing_docs)]

mod api;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod config;
mod conn;
mod core;
pub mod http;
pub mod key;
pub mod mailbox;
mod outbox;
pub mod protocol;
mod ring;
pub mod route;
pub mod server;
pub mod stats;
pub mod tls;

pub use config::Config;
pub use server::{Handle, Server, StartError};
