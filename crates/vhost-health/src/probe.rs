//! One probe: a TCP connect; an HTTP `GET` whose status must fall in a range (HTTP/1.1, or
//! HTTP/2 for `h2`/`h2c` backends); or a gRPC health check (`grpc.health.v1.Health/Check` must
//! answer `SERVING`). `https`/`h2` backends are probed over TLS: the handshake is part of the
//! probe, the certificate is not verified (a probe checks that the backend serves, not who it
//! is; the proxy verifies it on real connections).

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
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2 exchange failed: {0}")]
    H2(String),
    /// The gRPC health service did not answer `SERVING`.
    #[error("gRPC health check: {0}")]
    Grpc(String),
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
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        if is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    })?;
    if plan.kind == ProbeKind::Tcp {
        return Ok(());
    }
    let h2 = plan.kind == ProbeKind::Grpc || plan.protocol.h2();
    if plan.protocol.tls() {
        let stream = tls(stream, &plan.sni, h2).await?;
        exchange(stream, plan, h2).await
    } else {
        exchange(stream, plan, h2).await
    }
}

/// The TLS handshake of a probe: SNI when the backend has a name, ALPN `h2` or `http/1.1`, no
/// verification.
async fn tls(
    stream: TcpStream,
    sni: &str,
    h2: bool,
) -> Result<tokio_openssl::SslStream<TcpStream>, ProbeError> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let tls_err = |e: &dyn std::fmt::Display| ProbeError::Tls(e.to_string());
    let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| tls_err(&e))?;
    builder.set_verify(SslVerifyMode::NONE);
    let alpn: &[u8] = if h2 { b"\x02h2" } else { b"\x08http/1.1" };
    builder.set_alpn_protos(alpn).map_err(|e| tls_err(&e))?;
    let mut config = builder.build().configure().map_err(|e| tls_err(&e))?;
    config.set_verify_hostname(false);
    config.set_use_server_name_indication(!sni.is_empty());
    let ssl = config.into_ssl(sni).map_err(|e| tls_err(&e))?;
    let mut stream = tokio_openssl::SslStream::new(ssl, stream).map_err(|e| tls_err(&e))?;
    std::pin::Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| tls_err(&e))?;
    Ok(stream)
}

async fn exchange<S>(stream: S, plan: &ProbePlan, h2: bool) -> Result<(), ProbeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        h2_exchange(stream, plan).await
    } else {
        http1(stream, plan).await
    }
}

/// `GET path` over HTTP/1.1; the status must be in the expected range.
async fn http1<S>(mut stream: S, plan: &ProbePlan) -> Result<(), ProbeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
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
    expect_status(status, plan)
}

fn expect_status(status: u16, plan: &ProbePlan) -> Result<(), ProbeError> {
    let [lo, hi] = plan.expected_status;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status { status, lo, hi })
    }
}

/// The gRPC health answer `SERVING`: field 1 (status), varint 1.
const SERVING: &[u8] = &[0x08, 0x01];

/// An HTTP/2 probe (the `h2` crate, prior knowledge or after ALPN): `GET path` with the
/// expected status, or the gRPC health check.
async fn h2_exchange<S>(stream: S, plan: &ProbePlan) -> Result<(), ProbeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let h2_err = |e: &dyn std::fmt::Display| ProbeError::H2(e.to_string());
    let (client, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| h2_err(&e))?;
    // The connection is driven beside the exchange and dropped with it.
    let exchange = async move {
        let mut client = client.ready().await.map_err(|e| h2_err(&e))?;
        let scheme = if plan.protocol.tls() { "https" } else { "http" };
        let grpc = plan.kind == ProbeKind::Grpc;
        let (method, path) = if grpc {
            (http::Method::POST, "/grpc.health.v1.Health/Check")
        } else {
            (http::Method::GET, plan.path.as_str())
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{scheme}://{}{path}", plan.host))
            .header("user-agent", "pingora-vhost-health-check");
        if grpc {
            request = request
                .header("content-type", "application/grpc")
                .header("te", "trailers");
        }
        let request = request.body(()).map_err(|e| h2_err(&e))?;
        let (response, mut send) = client
            .send_request(request, !grpc)
            .map_err(|e| h2_err(&e))?;
        if grpc {
            // An empty HealthCheckRequest (service ""): not compressed, length 0.
            send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .map_err(|e| h2_err(&e))?;
        }
        let response = response.await.map_err(|e| h2_err(&e))?;
        let status = response.status().as_u16();
        if !grpc {
            return expect_status(status, plan);
        }
        if status != 200 {
            return Err(ProbeError::Grpc(format!("HTTP status {status}")));
        }
        let head_status = response.headers().get("grpc-status").cloned();
        let mut body = response.into_body();
        let mut message = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| h2_err(&e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if message.len() + chunk.len() > MAX_HEAD {
                return Err(ProbeError::Grpc("answer too large".into()));
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(|e| h2_err(&e))?;
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(head_status);
        match grpc_status.as_ref().map(http::HeaderValue::as_bytes) {
            Some(b"0") => {}
            Some(other) => {
                return Err(ProbeError::Grpc(format!(
                    "grpc-status {}",
                    String::from_utf8_lossy(other)
                )))
            }
            None => return Err(ProbeError::Grpc("no grpc-status".into())),
        }
        match message.get(5..) {
            Some(SERVING) => Ok(()),
            Some(other) => Err(ProbeError::Grpc(format!(
                "status is not SERVING (message {other:02x?})"
            ))),
            None => Err(ProbeError::Grpc("no HealthCheckResponse".into())),
        }
    };
    tokio::select! {
        result = exchange => result,
        result = connection => match result {
            Ok(()) => Err(ProbeError::H2("connection closed".into())),
            Err(e) => Err(h2_err(&e)),
        },
    }
}
