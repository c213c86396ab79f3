//! Startup and shutdown: one `SO_REUSEPORT` listener and one pinned worker thread per core,
//! each running its own monoio runtime; a handle that stops them.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, DriverKind};
use crate::core::{Core, CoreMsg, Shared};
use crate::mailbox::{mailbox, Mailbox};
use crate::stats::{CoreStats, Snapshot};

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
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A worker's runtime could not start (e.g. io_uring forced but unavailable).
    #[error("worker {core} failed to start: {source}")]
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

    /// Counters of every core, and their sum.
    pub fn stats(&self) -> (Snapshot, Vec<Snapshot>) {
        snapshot(&self.shared)
    }
}

fn listener(addr: SocketAddr) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl Server {
    /// Binds the listeners and starts the workers; returns once every worker accepts.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let cores = config.worker_count();
        let requested = config.listen;
        // Bind once to learn the port (port 0), then bind the others to the same one.
        let first = listener(requested).map_err(|source| StartError::Listen {
            addr: requested,
            source,
        })?;
        let addr = first.local_addr().map_err(|source| StartError::Listen {
            addr: requested,
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..cores {
            listeners.push(listener(addr).map_err(|source| StartError::Listen { addr, source })?);
        }

        let (senders, boxes): (Vec<_>, Vec<_>) = (0..cores).map(|_| mailbox()).unzip();
        let shared = Arc::new(Shared {
            config,
            cores,
            mailboxes: senders,
            stats: (0..cores).map(|_| CoreStats::default()).collect(),
            shutdown: AtomicBool::new(false),
            total_connections: std::sync::atomic::AtomicUsize::new(0),
        });

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

fn worker(
    id: usize,
    shared: Arc<Shared>,
    listener: StdListener,
    mailbox: Mailbox<CoreMsg>,
    ready: Ready,
) {
    let run = run_core(id, shared.clone(), listener, mailbox, ready.clone());
    let built = match shared.config.driver {
        DriverKind::Auto => monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(URING_ENTRIES)
            .uring_builder(uring_setup())
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(run)),
        DriverKind::IoUring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .uring_builder(uring_setup())
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(run)),
        DriverKind::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(run)),
    };
    if let Err(e) = built {
        let _ = ready.send(Err((id, e)));
    }
}

async fn run_core(
    id: usize,
    shared: Arc<Shared>,
    listener: StdListener,
    mailbox: Mailbox<CoreMsg>,
    ready: Ready,
) {
    let core = Core::new(id, shared);
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err((id, e)));
            return;
        }
    };
    let canceller = monoio::io::Canceller::new();
    let cancel = canceller.handle();
    core.set_accept_canceller(canceller);
    monoio::spawn(core.clone().run_flusher());
    monoio::spawn(core.clone().run_mailbox(mailbox));
    monoio::spawn(core.clone().run_sweeper());
    monoio::spawn(accept_loop(core.clone(), listener, cancel));
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
            left = core.conns.borrow().len(),
            "shutdown timeout: exiting with connections still open"
        );
    }
}

/// Accepts until shutdown. Accept never dies: errors are logged and the loop goes on, with a
/// short pause when the process is out of file descriptors.
async fn accept_loop(
    core: Rc<Core>,
    listener: monoio::net::TcpListener,
    cancel: monoio::io::CancelHandle,
) {
    loop {
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, _peer)) => {
                monoio::spawn(crate::conn::serve(core.clone(), stream));
            }
            Err(_) if core.shutting_down.get() => break,
            Err(e) => {
                let fd_exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                tracing::warn!(core = core.id, error = %e, "accept failed");
                if fd_exhausted {
                    monoio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn snapshot(shared: &Shared) -> (Snapshot, Vec<Snapshot>) {
    let per_core: Vec<Snapshot> = shared.stats.iter().map(CoreStats::snapshot).collect();
    (Snapshot::total(&per_core), per_core)
}

/// `GET /api/stats`: totals and per-core counters as JSON.
pub(crate) fn stats_json(shared: &Shared) -> String {
    let (total, cores) = snapshot(shared);
    serde_json::json!({
        "connections": total.connections,
        "users": total.users,
        "total": total,
        "cores": cores,
    })
    .to_string()
}
