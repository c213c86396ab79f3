//! Per-core counters.
//!
//! Each core writes only its own [`CoreStats`] (relaxed, uncontended: the struct is padded to
//! its own cache lines), and readers (`/api/stats`) sum them. No counter is shared by cores
//! on the hot path.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Counters of one core. Written only by that core.
#[derive(Default)]
#[repr(align(128))]
pub struct CoreStats {
    /// Open WebSocket connections on this core (gauge).
    pub connections: AtomicI64,
    /// Users whose directory entry this core owns (gauge).
    pub users: AtomicI64,
    /// Rooms with members anywhere, each counted on its owner core (`hash(room) % cores`), so
    /// the sum over cores is exact (gauge).
    pub rooms: AtomicI64,
    /// Rooms with at least one member on this core (gauge; a room with members on two cores
    /// counts on both).
    pub local_rooms: AtomicI64,
    /// Connections accepted as WebSockets since start.
    pub connections_total: AtomicU64,
    /// Client messages (text frames) received.
    pub messages_in: AtomicU64,
    /// Frames handed to connections' outbound queues (deliveries, acks, errors).
    pub messages_out: AtomicU64,
    /// Messages handed to a recipient connection by `send` (what `delivered` counts).
    pub deliveries: AtomicU64,
    /// Bytes read from WebSocket connections.
    pub bytes_in: AtomicU64,
    /// Bytes written to WebSocket connections.
    pub bytes_out: AtomicU64,
    /// Connections closed as slow consumers (1013).
    pub slow_consumer_closes: AtomicU64,
    /// Connections closed for idleness (4000).
    pub idle_closes: AtomicU64,
    /// Connections closed for a protocol error, bad UTF-8 or a too-big message.
    pub protocol_closes: AtomicU64,
    /// Upgrades refused (bad request, identity, limits).
    pub handshake_failures: AtomicU64,
    /// Messages refused by `--rate-limit`.
    pub rate_limited: AtomicU64,
    /// `join`s refused by `--max-rooms-per-conn`.
    pub too_many_rooms: AtomicU64,
    /// Connections closed with 1008 for persistent rate-limit abuse.
    pub rate_limit_closes: AtomicU64,
    /// Closes by code: see [`CLOSE_CODES`]; the last slot counts connections that ended
    /// without a close frame.
    pub closes: [AtomicU64; CLOSE_CODES.len() + 1],
    /// Refused upgrades by HTTP status: see [`REFUSAL_STATUSES`]; the last slot is "other".
    pub refusals: [AtomicU64; REFUSAL_STATUSES.len() + 1],
    /// Cross-core batches sent from this core.
    pub batches_sent: AtomicU64,
    /// Messages carried in those batches.
    pub batched_messages: AtomicU64,
    /// TCP connections not (yet) upgraded: reading a request, answering plain HTTP, waiting
    /// for the next keep-alive request (gauge).
    pub http_connections: AtomicI64,
    /// Connections refused at once because `--max-http-connections` were open.
    pub http_connections_refused: AtomicU64,
    /// Outbound bytes queued on this core's connections, not yet written (gauge).
    pub queued_bytes: AtomicI64,
    /// The most outbound bytes this core ever had queued (gauge).
    pub queued_bytes_peak: AtomicI64,
    /// Times this core stopped reading from clients because the gateway was over a queue
    /// bound (a cross-core mailbox or `--max-total-queued-bytes`).
    pub backpressure_pauses: AtomicU64,
    /// Failed `accept` calls (out of file descriptors, or other errors).
    pub accept_errors: AtomicU64,
    /// Multishot receives armed on the core's io_uring data path (gauge).
    pub ring_recvs_armed: AtomicI64,
    /// Parts received on the io_uring data path (one per completion of a multishot recv).
    pub ring_recvs: AtomicU64,
    /// Provided buffers the kernel filled and moved past on the io_uring data path.
    pub ring_buffers_filled: AtomicU64,
    /// Receives on the io_uring data path that found no free buffer.
    pub ring_starved: AtomicU64,
    /// Sends completed on the io_uring data path.
    pub ring_sends: AtomicU64,
    /// Connections that left the io_uring data path for readiness reads (large messages).
    pub ring_left: AtomicU64,
}

/// Close codes counted one by one (others are counted as `other`).
pub const CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1005, 1007, 1008, 1009, 1011, 1013, 4000];
/// Upgrade refusal statuses counted one by one.
pub const REFUSAL_STATUSES: [u16; 7] = [400, 401, 403, 413, 429, 431, 503];

impl CoreStats {
    /// Counts a connection's end by the close code it had (`None`: no close frame).
    pub fn count_close(&self, code: Option<u16>) {
        let slot = match code {
            Some(c) => CLOSE_CODES
                .iter()
                .position(|k| *k == c)
                .unwrap_or(CLOSE_CODES.len()),
            None => CLOSE_CODES.len(),
        };
        inc(&self.closes[slot]);
    }

    /// Counts a refused upgrade by status.
    pub fn count_refusal(&self, status: u16) {
        let slot = REFUSAL_STATUSES
            .iter()
            .position(|k| *k == status)
            .unwrap_or(REFUSAL_STATUSES.len());
        inc(&self.refusals[slot]);
    }
}

/// Adds one to a counter.
#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// A point-in-time copy of one core's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Snapshot {
    pub connections: i64,
    pub users: i64,
    pub rooms: i64,
    pub local_rooms: i64,
    pub connections_total: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub deliveries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub slow_consumer_closes: u64,
    pub idle_closes: u64,
    pub protocol_closes: u64,
    pub handshake_failures: u64,
    pub rate_limited: u64,
    pub rate_limit_closes: u64,
    pub too_many_rooms: u64,
    pub closes: std::collections::BTreeMap<String, u64>,
    pub refusals: std::collections::BTreeMap<String, u64>,
    pub batches_sent: u64,
    pub batched_messages: u64,
    pub http_connections: i64,
    pub http_connections_refused: u64,
    pub queued_bytes: i64,
    pub queued_bytes_peak: i64,
    pub backpressure_pauses: u64,
    pub accept_errors: u64,
    /// Multishot receives armed on the io_uring data path (one per plain WebSocket).
    pub ring_recvs_armed: i64,
    /// Parts received on the io_uring data path (one per completion of a multishot recv).
    pub ring_recvs: u64,
    /// Provided buffers the kernel filled and moved past on the io_uring data path: with
    /// buffers filled in parts (Linux 6.12), about one per 4 KiB received, else one per part.
    pub ring_buffers_filled: u64,
    /// Receives on the io_uring data path that found no free buffer.
    pub ring_starved: u64,
    /// Sends completed on the io_uring data path.
    pub ring_sends: u64,
    /// Connections that left the io_uring data path for readiness reads (large messages).
    pub ring_left: u64,
    /// Messages queued to this core by other cores and not yet handled (filled in from the
    /// mailbox by whoever takes the snapshot).
    pub mailbox_depth: i64,
    /// The highest mailbox depth since start (filled in likewise).
    pub mailbox_peak: i64,
}

impl CoreStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections: self.connections.load(Relaxed),
            users: self.users.load(Relaxed),
            rooms: self.rooms.load(Relaxed),
            local_rooms: self.local_rooms.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            deliveries: self.deliveries.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            slow_consumer_closes: self.slow_consumer_closes.load(Relaxed),
            idle_closes: self.idle_closes.load(Relaxed),
            protocol_closes: self.protocol_closes.load(Relaxed),
            handshake_failures: self.handshake_failures.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            rate_limit_closes: self.rate_limit_closes.load(Relaxed),
            too_many_rooms: self.too_many_rooms.load(Relaxed),
            closes: labelled(&CLOSE_CODES, &self.closes, "none"),
            refusals: labelled(&REFUSAL_STATUSES, &self.refusals, "other"),
            batches_sent: self.batches_sent.load(Relaxed),
            batched_messages: self.batched_messages.load(Relaxed),
            http_connections: self.http_connections.load(Relaxed),
            http_connections_refused: self.http_connections_refused.load(Relaxed),
            queued_bytes: self.queued_bytes.load(Relaxed),
            queued_bytes_peak: self.queued_bytes_peak.load(Relaxed),
            backpressure_pauses: self.backpressure_pauses.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            ring_recvs_armed: self.ring_recvs_armed.load(Relaxed),
            ring_recvs: self.ring_recvs.load(Relaxed),
            ring_buffers_filled: self.ring_buffers_filled.load(Relaxed),
            ring_starved: self.ring_starved.load(Relaxed),
            ring_sends: self.ring_sends.load(Relaxed),
            ring_left: self.ring_left.load(Relaxed),
            mailbox_depth: 0,
            mailbox_peak: 0,
        }
    }
}

impl Snapshot {
    /// Sum of several cores' snapshots.
    pub fn total<'a>(all: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        let mut t = Snapshot::default();
        for s in all {
            t.connections += s.connections;
            t.users += s.users;
            t.rooms += s.rooms;
            t.local_rooms += s.local_rooms;
            t.connections_total += s.connections_total;
            t.messages_in += s.messages_in;
            t.messages_out += s.messages_out;
            t.deliveries += s.deliveries;
            t.bytes_in += s.bytes_in;
            t.bytes_out += s.bytes_out;
            t.slow_consumer_closes += s.slow_consumer_closes;
            t.idle_closes += s.idle_closes;
            t.protocol_closes += s.protocol_closes;
            t.handshake_failures += s.handshake_failures;
            t.rate_limited += s.rate_limited;
            t.rate_limit_closes += s.rate_limit_closes;
            t.too_many_rooms += s.too_many_rooms;
            for (k, v) in &s.closes {
                *t.closes.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &s.refusals {
                *t.refusals.entry(k.clone()).or_default() += v;
            }
            t.batches_sent += s.batches_sent;
            t.batched_messages += s.batched_messages;
            t.http_connections += s.http_connections;
            t.http_connections_refused += s.http_connections_refused;
            t.queued_bytes += s.queued_bytes;
            t.backpressure_pauses += s.backpressure_pauses;
            t.accept_errors += s.accept_errors;
            t.ring_recvs_armed += s.ring_recvs_armed;
            t.ring_recvs += s.ring_recvs;
            t.ring_buffers_filled += s.ring_buffers_filled;
            t.ring_starved += s.ring_starved;
            t.ring_sends += s.ring_sends;
            t.ring_left += s.ring_left;
            t.mailbox_depth += s.mailbox_depth;
            t.mailbox_peak = t.mailbox_peak.max(s.mailbox_peak);
            t.queued_bytes_peak = t.queued_bytes_peak.max(s.queued_bytes_peak);
        }
        t
    }
}

fn labelled(
    keys: &[u16],
    counts: &[AtomicU64],
    last: &str,
) -> std::collections::BTreeMap<String, u64> {
    keys.iter()
        .map(|k| k.to_string())
        .chain([last.to_string()])
        .zip(counts.iter().map(|c| c.load(Relaxed)))
        .collect()
}

/// Moves a gauge by `d`.
#[inline]
pub fn add_gauge(g: &AtomicI64, d: i64) {
    g.fetch_add(d, Relaxed);
}
