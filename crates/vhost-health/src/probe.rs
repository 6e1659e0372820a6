//! One probe: a TCP connect, or an HTTP/1.1 `GET` whose status must fall in a range.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vhost_routing::ProbeKind;

use crate::ProbePlan;

/// Why a probe failed.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connection failed.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// The probe could not run because this host ran out of a resource (file descriptors, socket
    /// buffers, local ports): says nothing about the backend, never counted against it.
    #[error("probe not run, local resource exhausted: {0}")]
    Local(std::io::Error),
    /// Sending the request or reading the answer failed.
    #[error("HTTP exchange failed: {0}")]
    Io(std::io::Error),
    /// The answer is not an HTTP response.
    #[error("not an HTTP response: {0:?}")]
    Malformed(String),
    /// The status is outside the expected range.
    #[error("status {status}, expected {lo}-{hi}")]
    Status {
        /// The status received.
        status: u16,
        /// Lowest healthy status.
        lo: u16,
        /// Highest healthy status.
        hi: u16,
    },
}

/// True for errors that come from this host running out of a resource — file descriptors
/// (`EMFILE`, `ENFILE`), socket buffers or memory (`ENOBUFS`, `ENOMEM`), local ports
/// (`EADDRNOTAVAIL`) — rather than from the peer. Such a failure must never count against a
/// backend's health.
pub fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Largest response head read from an HTTP probe.
const MAX_HEAD: usize = 8 * 1024;

/// Probes `addr` once according to `plan` (no timeout of its own: the caller bounds it).
pub async fn probe(addr: SocketAddr, plan: &ProbePlan) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| {
        if is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    })?;
    if plan.kind == ProbeKind::Tcp {
        return Ok(());
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pingora-vhost-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        plan.path, plan.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await.map_err(ProbeError::Io)?;
        if n == 0 || head.len() >= MAX_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]).into_owned();
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ProbeError::Malformed(line));
    };
    let status: u16 = match (version.starts_with("HTTP/1."), code.parse()) {
        (true, Ok(s)) => s,
        _ => return Err(ProbeError::Malformed(line)),
    };
    let [lo, hi] = plan.expected_status;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status { status, lo, hi })
    }
}
