//! Startup and shutdown: one `SO_REUSEPORT` listener and one pinned worker thread per core,
//! each running its own monoio runtime; a handle that stops them.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, DriverKind};
use crate::core::{Core, Shared};
use crate::mailbox::{mailbox, Mailbox, Pressure};
use crate::route::{Msg, Owners};
use crate::stats::{self, CoreStats, Snapshot};

/// io_uring submission queue size per worker.
const URING_ENTRIES: u32 = 1024;
/// Listen backlog per worker socket.
const BACKLOG: i32 = 4096;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag value that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding or listening failed.
    #[error(
        "cannot listen on {addr}: {source}. Choose another address or port with --listen \
         (port 0 picks a free one), or stop the process that holds it"
    )]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A worker's runtime could not start (e.g. io_uring forced but unavailable).
    #[error(
        "worker {core} failed to start: {source}. With --driver io-uring the kernel must allow \
         io_uring (use --driver auto to fall back to epoll); check the memory-lock and \
         file-descriptor limits (ulimit -l, ulimit -n)"
    )]
    Worker {
        /// The worker's index.
        core: usize,
        /// The cause.
        source: io::Error,
    },
}

/// A running gateway.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Stops a running gateway from any thread.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Stops accepting, closes every connection with 1001, and lets the workers exit once
    /// their connections are gone or `--shutdown-timeout` has passed.
    pub fn shutdown(&self) {
        self.shared.trigger_shutdown();
    }

    /// Reloads the TLS certificate and key from their files (SIGHUP): new handshakes use
    /// them, open connections keep theirs; on failure the current certificate stays.
    /// `None` when TLS is off.
    pub fn reload_tls(&self) -> Option<Result<(), String>> {
        self.shared.tls.as_ref().map(|t| t.reload())
    }

    /// Counters of every core, and their sum.
    pub fn stats(&self) -> (Snapshot, Vec<Snapshot>) {
        self.shared.snapshot()
    }
}

fn listener(addr: SocketAddr, config: &Config) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    dead_peer_detection(&socket, config)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// TCP-level detection of peers that vanished without a FIN or RST (a cable pulled, a NAT
/// that forgot the flow), set once on the listener: accepted sockets inherit these options
/// from it, so no connection pays a system call for them.
/// * `TCP_USER_TIMEOUT` = `--idle-timeout`: bytes the peer has not acknowledged for that long
///   (including a zero window it never reopens) end the connection with an error, which the
///   connection's task sees at once, instead of waiting for the kernel's ~15 minutes of
///   retransmissions.
/// * Keepalive probes after `--idle-timeout` of silence, for connections with nothing to send
///   (a plain HTTP keep-alive connection, a connection mid-handshake). WebSocket connections
///   are pinged by the gateway itself long before.
fn dead_peer_detection(socket: &Socket, config: &Config) -> io::Result<()> {
    // Inherited by accepted sockets too: no `setsockopt` per connection.
    socket.set_nodelay(true)?;
    let idle = config.idle_timeout;
    socket.set_tcp_user_timeout(Some(idle))?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)
}

impl Server {
    /// Binds the listeners and starts the workers; returns once every worker accepts.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                crate::tls::Tls::load(cert, key).map_err(StartError::Config)?,
            )),
            _ => None,
        };
        let cores = config.worker_count();
        let requested = config.listen;
        // Bind once to learn the port (port 0), then bind the others to the same one.
        let first = listener(requested, &config).map_err(|source| StartError::Listen {
            addr: requested,
            source,
        })?;
        let addr = first.local_addr().map_err(|source| StartError::Listen {
            addr: requested,
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..cores {
            listeners.push(
                listener(addr, &config).map_err(|source| StartError::Listen { addr, source })?,
            );
        }

        let pressure = Arc::new(Pressure::new(cores));
        let limit = config.mailbox_limit;
        let (senders, boxes): (Vec<_>, Vec<_>) = (0..cores)
            .map(|id| mailbox(id, limit, pressure.clone()))
            .unzip();
        let (cluster, bridge_rx) = if config.cluster.is_empty() {
            (None, None)
        } else {
            let (c, rx) = crate::cluster::shared(&config, pressure.clone());
            (Some(Arc::new(c)), Some(rx))
        };
        let shared = Arc::new(Shared {
            cluster,
            config,
            cores,
            mailboxes: senders,
            stats: (0..cores).map(|_| Arc::new(CoreStats::default())).collect(),
            shutdown: AtomicBool::new(false),
            total_connections: std::sync::atomic::AtomicUsize::new(0),
            http_connections: std::sync::atomic::AtomicUsize::new(0),
            pressure,
            owners: Owners::new(cores),
            tls,
        });

        // Cluster mode: the broker bridge, on its own thread (the cores stay free of tokio).
        if let (Some(rx), Some(cluster)) = (bridge_rx, &shared.cluster) {
            let node = crate::cluster::Node {
                mailboxes: shared.mailboxes.clone(),
                owners: shared.owners,
                pressure: shared.pressure.clone(),
                mailbox_limit: shared.config.mailbox_limit,
                timeout: shared.config.cluster_timeout,
                urls: shared.config.cluster.clone(),
                cluster: cluster.clone(),
            };
            crate::cluster::start(node, rx);
        }
        let core_ids = core_affinity::get_core_ids().unwrap_or_default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(cores);
        for (id, (listener, mailbox)) in listeners.into_iter().zip(boxes).enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let pin = if shared.config.no_pin || core_ids.is_empty() {
                None
            } else {
                Some(core_ids[id % core_ids.len()])
            };
            let thread = std::thread::Builder::new()
                .name(format!("wsgate-core-{id}"))
                .spawn(move || {
                    if let Some(cpu) = pin {
                        if !core_affinity::set_for_current(cpu) {
                            tracing::warn!(core = id, "could not pin the worker to a CPU");
                        }
                    }
                    worker(id, shared, listener, mailbox, ready)
                })
                .map_err(|source| StartError::Worker { core: id, source })?;
            threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..cores {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err((core, source))) => {
                    shared.trigger_shutdown();
                    return Err(StartError::Worker { core, source });
                }
                Err(_) => {
                    shared.trigger_shutdown();
                    return Err(StartError::Worker {
                        core: 0,
                        source: io::Error::other("worker exited during start"),
                    });
                }
            }
        }
        tracing::info!(%addr, workers = cores, "listening");
        Ok(Server {
            addr,
            shared,
            threads,
        })
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle to stop the server and read its counters.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Waits until every worker has exited (after a shutdown).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
        // Cluster mode: give the bridge a moment to say goodbye (a node without connections
        // gets here within milliseconds of the signal).
        if let Some(c) = &self.shared.cluster {
            c.wait_bye(Duration::from_millis(500));
        }
    }
}

type Ready = mpsc::Sender<Result<(), (usize, io::Error)>>;

/// io_uring setup flags. COOP_TASKRUN: a completion (a socket became readable) does not
/// interrupt the busy worker with an IPI to run its task work; the work runs at the worker's
/// next entry into the kernel, which it makes every loop turn anyway. On a VM an IPI is
/// expensive; this is measured in BENCHMARKS.md.
/// Echo at 100 connections x 20 B on this VM: 92k msgs/s without it, 139k with it.
/// (DEFER_TASKRUN added ~4%, within noise, for more dependence on how monoio reaps.)
fn uring_setup() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    b.setup_coop_taskrun();
    b
}

/// A worker thread. If it ends for any reason other than a shutdown (a panic in any task, a
/// runtime that stops), the whole process aborts: a gateway missing one core would keep
/// looking alive while the users, rooms and API calls that core owns fail (its listener leaves
/// the reuseport group, registrations to it time out). Exiting lets the supervisor (systemd's
/// `Restart=`, Kubernetes) restart a whole, working process; clients reconnect.
fn worker(
    id: usize,
    shared: Arc<Shared>,
    listener: StdListener,
    mailbox: Mailbox<Msg>,
    ready: Ready,
) {
    let started = Arc::new(AtomicBool::new(false));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_worker(id, &shared, listener, mailbox, ready, &started)
    }));
    // Failing during start is reported to `Server::start` instead (a clean error exit).
    if started.load(Ordering::SeqCst) && !shared.shutdown.load(Ordering::SeqCst) {
        let why = if outcome.is_err() {
            "a task panicked"
        } else {
            "its runtime stopped"
        };
        tracing::error!(core = id, "worker died ({why}): aborting the whole process");
        eprintln!("wsgate: worker {id} died ({why}); aborting so a supervisor restarts it");
        std::process::abort();
    }
}

fn run_worker(
    id: usize,
    shared: &Arc<Shared>,
    listener: StdListener,
    mailbox: Mailbox<Msg>,
    ready: Ready,
    started: &Arc<AtomicBool>,
) {
    // The io_uring data path (src/ring.rs) runs where monoio itself runs on io_uring; under
    // the epoll driver connections keep the readiness path.
    let run = |uring: bool| {
        run_core(
            id,
            shared.clone(),
            listener,
            mailbox,
            ready.clone(),
            started.clone(),
            uring && !shared.config.no_ring,
        )
    };
    let built = match shared.config.driver {
        DriverKind::Auto => monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(URING_ENTRIES)
            .uring_builder(uring_setup())
            .enable_timer()
            .build()
            .map(|mut rt| {
                let uring = matches!(rt, monoio::FusionRuntime::Uring(_));
                rt.block_on(run(uring))
            }),
        DriverKind::IoUring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .uring_builder(uring_setup())
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(run(true))),
        DriverKind::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(run(false))),
    };
    if let Err(e) = built {
        let _ = ready.send(Err((id, e)));
    }
}

async fn run_core(
    id: usize,
    shared: Arc<Shared>,
    listener: StdListener,
    mailbox: Mailbox<Msg>,
    ready: Ready,
    started: Arc<AtomicBool>,
    uring: bool,
) {
    let core = Core::new(id, shared);
    if uring {
        match crate::ring::Ring::new(core.shared.stats[id].clone()) {
            Ok(ring) => {
                monoio::spawn(ring.clone().run());
                *core.ring.borrow_mut() = Some(ring);
            }
            Err(e) => tracing::warn!(
                core = id,
                error = %e,
                "the io_uring data path is unavailable: connections use readiness waits"
            ),
        }
    }
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err((id, e)));
            return;
        }
    };
    core.listener_fd.set(Some(listener.as_raw_fd()));
    let canceller = monoio::io::Canceller::new();
    let cancel = canceller.handle();
    core.set_accept_canceller(canceller);
    monoio::spawn(core.clone().run_flusher());
    monoio::spawn(core.clone().run_mailbox(mailbox));
    monoio::spawn(core.clone().run_sweeper());
    monoio::spawn(core.clone().run_resumer());
    // The spare descriptor is opened here, before the worker reports ready, so that every
    // descriptor of an idle gateway exists once it prints `listening on` (tests compare
    // descriptor counts with that baseline).
    monoio::spawn(accept_loop(core.clone(), listener, cancel, Spare::open()));
    started.store(true, Ordering::SeqCst);
    let _ = ready.send(Ok(()));

    core.shutdown_started().await;
    tracing::info!(core = id, "shutting down");
    let deadline = core.config().shutdown_timeout;
    if monoio::time::timeout(deadline, core.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            core = id,
            left = core.conn_count(),
            "shutdown timeout: exiting with connections still open"
        );
    }
}

/// Accepts until shutdown. Accept never dies: errors are counted and logged and the loop goes
/// on. Out of file descriptors (`EMFILE`/`ENFILE`), the kernel keeps the pending connections
/// in the backlog and accept fails at once, in a loop, while every client waits: the core
/// keeps one spare descriptor for that moment, closes it to accept and immediately close the
/// waiting connections (they see a reset and can retry elsewhere), then takes it back.
async fn accept_loop(
    core: Rc<Core>,
    listener: monoio::net::TcpListener,
    cancel: monoio::io::CancelHandle,
    mut spare: Spare,
) {
    loop {
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, _peer)) => {
                monoio::spawn(crate::conn::serve(core.clone(), stream));
            }
            Err(_) if core.shutting_down.get() => break,
            Err(e) => {
                stats::inc(&core.stats().accept_errors);
                let fd_exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if fd_exhausted {
                    let shed = spare.shed_backlog(listener.as_raw_fd());
                    tracing::warn!(
                        core = core.id,
                        shed,
                        "out of file descriptors: refused waiting connections"
                    );
                    // Let the connections that hold descriptors make progress (and close).
                    monoio::time::sleep(Duration::from_millis(10)).await;
                } else {
                    tracing::warn!(core = core.id, error = %e, "accept failed");
                }
            }
        }
    }
    // Dropping the listener here closes it: with shutdown begun, new clients are refused at
    // once instead of waiting in a backlog nobody accepts from.
    drop(listener);
}

/// A descriptor held in reserve for accepting while the process is out of descriptors.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the spare descriptor, accepts and closes up to a bounded number of waiting
    /// connections, and takes the spare back. Returns how many were shed.
    fn shed_backlog(&mut self, listener: std::os::fd::RawFd) -> usize {
        self.0 = None;
        let mut shed = 0;
        while shed < 256 {
            // SAFETY: accept4 on our listening socket; the result is closed right away.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                break;
            }
            // SAFETY: fd was just returned by accept4 and is owned by nobody else.
            unsafe { libc::close(fd) };
            shed += 1;
        }
        *self = Spare::open();
        shed
    }
}
