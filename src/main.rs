//! The `wsgate` binary: parse the config, set up logs and signals, run the library's server.

use std::io::Write;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // No transparent huge pages: mimalloc advises them on its arenas, and a 2 MiB page is
    // resident in full as soon as one byte of it is touched. For a heap of many small
    // long-lived objects that costs more than half of an idle connection's memory (measured:
    // 1,245 instead of ~2,700 bytes per idle connection, BENCHMARKS.md). Best effort.
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let config = match wsgate::Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    // With TLS, SIGHUP reloads the certificate; without, it keeps its default action.
    let tls = config.tls_cert.is_some();
    let server = match wsgate::Server::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsgate: {e}");
            std::process::exit(2);
        }
    };
    let handle = server.handle();
    let signals = if tls {
        vec![SIGINT, SIGTERM, SIGHUP]
    } else {
        vec![SIGINT, SIGTERM]
    };
    match signal_hook::iterator::Signals::new(signals) {
        Ok(mut signals) => {
            std::thread::Builder::new()
                .name("wsgate-signals".into())
                .spawn(move || {
                    let mut seen = 0;
                    for sig in signals.forever() {
                        if sig == SIGHUP {
                            // Logged and counted by the reload itself; a failure keeps the
                            // current certificate.
                            let _ = handle.reload_tls();
                            continue;
                        }
                        seen += 1;
                        if seen == 1 {
                            tracing::info!(signal = sig, "stopping: closing connections with 1001");
                            handle.shutdown();
                        } else {
                            tracing::warn!("second signal: exiting now");
                            std::process::exit(130);
                        }
                    }
                })
                .expect("spawn the signal thread");
        }
        Err(e) => tracing::warn!(error = %e, "cannot install signal handlers"),
    }
    // A machine-readable line for scripts and tests (the port is real even for port 0),
    // printed once the signals are handled: a SIGHUP from then on reloads, never kills.
    println!("listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    server.join();
    tracing::info!("stopped");
}
