//! TLS (`--tls-cert`, `--tls-key`): the certificate, its reload on SIGHUP, and rustls driven
//! sans-IO over the same raw-descriptor readiness path as plain connections.
//!
//! * **Certificates.** A PEM chain and a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) are
//!   loaded at start; a bad file or a key that does not match the certificate stops the start
//!   with a message naming the flag. The `ServerConfig` lives in an `Arc` behind a lock that is
//!   read once per TLS handshake, never per message. [`Tls::reload`] (SIGHUP) loads the files
//!   again: handshakes from then on present the new certificate, connections already open
//!   keep the session they have, and a reload that fails keeps the old certificate.
//! * **Data path.** rustls is used without I/O of its own ([`rustls::ServerConnection`]):
//!   the connection's task waits for readiness as for a plain socket, then
//!   `read_tls` reads from the descriptor (a non-blocking `recv`), `process_new_packets`
//!   decrypts, and the plaintext is copied into the core's scratch buffer and decoded as
//!   usual; queued frames are encrypted with one `write_vectored` and `write_tls` sends the
//!   records with `sendmsg`. No owned buffers, nothing to cancel.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The TLS settings of a running gateway: the current certificate and its reloads.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    reloads_ok: AtomicU64,
    reloads_error: AtomicU64,
    handshake_failures: AtomicU64,
    /// The leaf certificate's notAfter in Unix seconds (0: unknown).
    not_after: AtomicI64,
}

impl Tls {
    /// Loads the certificate chain and key; the error names the flag at fault and the fix.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let (config, not_after) = build(cert, key)?;
        Ok(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(config),
            reloads_ok: AtomicU64::new(0),
            reloads_error: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            not_after: AtomicI64::new(not_after.unwrap_or(0)),
        })
    }

    /// The configuration for a new handshake.
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the files again. On success new handshakes use them; on failure the current
    /// certificate stays. Either way the outcome is logged and counted.
    pub fn reload(&self) -> Result<(), String> {
        match build(&self.cert, &self.key) {
            Ok((config, not_after)) => {
                match self.current.write() {
                    Ok(mut c) => *c = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                self.not_after
                    .store(not_after.unwrap_or(0), Ordering::Relaxed);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                self.reloads_error.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "TLS reload failed: still serving the previous certificate");
                Err(e)
            }
        }
    }

    /// Reloads that succeeded and that failed.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_error.load(Ordering::Relaxed),
        )
    }

    /// Counts a connection whose TLS handshake failed (garbage, plain HTTP, a client that
    /// refused the certificate).
    pub(crate) fn count_handshake_failure(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections whose TLS handshake failed.
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// The served leaf certificate's notAfter, in Unix seconds, when it could be read.
    pub fn not_after(&self) -> Option<i64> {
        Some(self.not_after.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }
}

/// A PEM error in words (the library's own message shows byte arrays).
fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a block has no `-----END {}-----` line",
            String::from_utf8_lossy(&end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "malformed `-----BEGIN` line {:?}",
            String::from_utf8_lossy(&line)
        ),
        Error::Base64Decode(e) => format!("a block is not valid base64 ({e})"),
        Error::Io(e) => format!("cannot read the file ({e})"),
        Error::NoItemsFound => "no PEM block of the expected kind".into(),
        other => other.to_string(),
    }
}

fn build(cert: &Path, key: &Path) -> Result<(Arc<ServerConfig>, Option<i64>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "--tls-cert {}: not a PEM certificate chain: {}. Give the server \
                 certificate first, then its intermediates, as `-----BEGIN CERTIFICATE-----` blocks",
                cert.display(),
                pem_error(e)
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no `-----BEGIN CERTIFICATE-----` block found: give the PEM \
             certificate chain (server certificate first)",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--tls-key {}: not a PEM private key: {}. Give an unencrypted PKCS#8 \
             (`BEGIN PRIVATE KEY`), RSA (`BEGIN RSA PRIVATE KEY`) or EC (`BEGIN EC PRIVATE KEY`) key",
            key.display(),
            pem_error(e)
        )
    })?;
    let not_after = not_after(&chain[0]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            format!(
                "--tls-key {} does not go with --tls-cert {}: {}. Give the private key of the \
                 certificate's public key (the first certificate in the chain)",
                key.display(),
                cert.display(),
                match e {
                    rustls::Error::InconsistentKeys(_) => "the key is not the certificate's".into(),
                    other => other.to_string(),
                }
            )
        })?;
    // WebSocket upgrades and the API are HTTP/1.1; a client offering ALPN gets it named.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), not_after))
}

// ---- the certificate's expiry ---------------------------------------------------------------

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// A certificate's `validity.notAfter` in Unix seconds (RFC 5280 §4.1).
pub(crate) fn not_after(cert: &[u8]) -> Option<i64> {
    let (_, certificate, _) = der(cert)?;
    let (_, mut tbs, _) = der(certificate)?;
    // [0] version, optional.
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs)?.2;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        tbs = der(tbs)?.2;
    }
    let (_, validity, _) = der(tbs)?;
    let (_, _, after_not_before) = der(validity)?;
    let (tag, time, _) = der(after_not_before)?;
    let text = std::str::from_utf8(time).ok()?;
    let digits = text.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSSZ, years 1950-2049.
        0x17 if digits.len() == 12 => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        0x18 if digits.len() == 14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, s) = (field(4)?, field(6)?, field(8)?);
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---- I/O on the raw descriptor ----------------------------------------------------------------

/// A non-blocking socket descriptor as `Read` and `Write` for rustls' `read_tls` and
/// `write_tls`: one `recv` or one `sendmsg` per call, `WouldBlock` when the socket is not ready.
pub(crate) struct Fd(pub RawFd);

impl io::Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.0,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl io::Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: a zeroed msghdr is valid; IoSlice is ABI-compatible with iovec, and the
        // slices stay alive for the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(1024) as _;
            libc::sendmsg(self.0, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends what rustls has ready (handshake records, alerts, encrypted frames) until it is all
/// gone or the socket is full (`WouldBlock`).
pub(crate) fn flush(tls: &mut rustls::ServerConnection, fd: RawFd) -> io::Result<usize> {
    let mut sent = 0;
    while tls.wants_write() {
        match tls.write_tls(&mut Fd(fd)) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn expiry_is_read_from_utc_and_generalized_times() {
        // RFC 5280: UTCTime up to 2049, GeneralizedTime from 2050.
        for (y, m, d) in [(1999, 12, 31), (2031, 5, 17), (2049, 12, 31), (2060, 2, 29)] {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params.not_after = rcgen::date_time_ymd(y, m, d);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let want = params.not_after.unix_timestamp();
            assert_eq!(not_after(cert.der()), Some(want), "{y}-{m}-{d}");
        }
    }

    #[test]
    fn der_garbage_has_no_expiry() {
        assert_eq!(not_after(&[]), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(b"not a certificate at all"), None);
    }
}
