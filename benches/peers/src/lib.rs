//! What the peer servers share: the command line (`--listen ADDR`, default 127.0.0.1:0;
//! `--threads N`, default the number of CPUs; `--current-thread`), the tokio runtime, and
//! wsgate's start-up convention: the first line on stdout is `listening on ADDR`.
//!
//! `--current-thread` runs everything (accept loop and connections) on tokio's current-thread
//! runtime, on the main thread: the one-core configuration `scripts/bench.sh --per-core`
//! compares against wsgate `--workers 1`. A multi-thread runtime with `--threads 1` would
//! still accept on the main thread and serve on a worker: two busy threads, not one.

use std::net::SocketAddr;

/// Parsed command line.
pub struct Opts {
    pub listen: SocketAddr,
    pub threads: usize,
    /// tokio's current-thread runtime instead of the multi-thread one (`--threads` ignored).
    pub current_thread: bool,
}

/// Parses `--listen ADDR` and `--threads N` (also as `--listen=ADDR`); exits on anything else.
pub fn opts(name: &str) -> Opts {
    let mut o = Opts {
        listen: "127.0.0.1:0".parse().expect("default address"),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        current_thread: false,
    };
    let usage = |msg: &str| -> ! {
        eprintln!(
            "{name}: {msg}\nusage: {name} [--listen ADDR (127.0.0.1:0)] [--threads N (CPUs)] \
             [--current-thread]"
        );
        std::process::exit(2)
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| usage(&format!("{key} needs a value")))
        };
        match key.as_str() {
            "--listen" => {
                let v = value();
                o.listen = v
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("bad address {v}")));
            }
            "--threads" => {
                let v = value();
                o.threads = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage(&format!("bad thread count {v}")));
            }
            "--current-thread" => o.current_thread = true,
            "-h" | "--help" => usage("an echo server for wsgate's peer comparison"),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    o
}

/// The runtime `o` asks for: current-thread, or multi-thread with `o.threads` workers.
pub fn runtime(o: &Opts) -> tokio::runtime::Runtime {
    let mut b = if o.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(o.threads);
        b
    };
    b.enable_all().build().expect("tokio runtime")
}

/// The listen backlog: wsgate's (4096, capped by `net.core.somaxconn`). tokio's
/// `TcpListener::bind` listens with 128, which a connect burst of a few hundred in flight
/// overflows (`nstat` TcpExtListenOverflows): the dropped SYNs are retried after a second and
/// the handshake rate measured is then the backlog's, not the server's.
const BACKLOG: u32 = 4096;

/// Binds the listener and prints `listening on ADDR` (the bound address) as the first line.
pub async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let listen = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    let listener = listen().unwrap_or_else(|e| {
        eprintln!("bind {addr}: {e}");
        std::process::exit(1)
    });
    let local = listener.local_addr().expect("bound address");
    // println! goes through a LineWriter: the line is out before the first accept.
    println!("listening on {local}");
    listener
}

/// Accepted sockets get TCP_NODELAY, like wsgate's and wsgate-bench's.
pub fn nodelay(s: &tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
}

/// The whole server loop every peer shares: options, runtime, listener, then each accepted
/// socket (with TCP_NODELAY) handed to `serve` on its own task. Accept errors (EMFILE under a
/// connection storm) back off briefly and the loop goes on.
pub fn serve_forever<F, Fut>(name: &str, serve: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let o = opts(name);
    runtime(&o).block_on(async move {
        let listener = bind(o.listen).await;
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    nodelay(&s);
                    tokio::spawn(serve(s));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    });
}
