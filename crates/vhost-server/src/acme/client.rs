//! The HTTP client under `instant-acme`: reqwest over the system's OpenSSL (the TLS stack the
//! rest of the process uses), with the directory's private CA added when configured, bounded
//! timeouts and a bounded response size.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

/// Largest ACME response read (directory, orders, certificate chains are a few KiB).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// reqwest as `instant-acme`'s transport.
pub(crate) struct ReqwestClient(reqwest::Client);

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The CA file could not be read.
    #[error("cannot read lets_encrypt.directory_ca_path {}: {source}", path.display())]
    ReadCa {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("lets_encrypt.directory_ca_path {} holds no PEM certificate: {source}", path.display())]
    ParseCa {
        /// The file.
        path: std::path::PathBuf,
        /// reqwest's reason.
        source: reqwest::Error,
    },
    /// reqwest refused the settings.
    #[error("cannot build the ACME HTTP client: {0}")]
    Build(reqwest::Error),
}

impl ReqwestClient {
    /// A client trusting the system's roots plus the certificates of `ca_path`, if given.
    pub(crate) fn new(ca_path: Option<&Path>) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("pingora-vhost/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_path {
            let pem = std::fs::read(path).map_err(|source| ClientError::ReadCa {
                path: path.to_owned(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                ClientError::ParseCa {
                    path: path.to_owned(),
                    source,
                }
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder.build().map(Self).map_err(ClientError::Build)
    }
}

/// An error of the transport, as `instant-acme` carries it.
fn other(e: impl std::error::Error + Send + Sync + 'static) -> instant_acme::Error {
    instant_acme::Error::Other(Box::new(e))
}

impl HttpClient for ReqwestClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| instant_acme::Error::Other(e.into()))?
                .to_bytes();
            let request = reqwest::Request::try_from(http::Request::from_parts(parts, body))
                .map_err(other)?;
            let mut response = client.execute(request).await.map_err(other)?;
            let mut builder = http::Response::builder()
                .status(response.status())
                .version(response.version());
            if let Some(headers) = builder.headers_mut() {
                *headers = std::mem::take(response.headers_mut());
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(other)? {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(instant_acme::Error::Str("ACME response larger than 1 MiB"));
                }
                bytes.extend_from_slice(&chunk);
            }
            let response = builder.body(Full::new(Bytes::from(bytes)))?;
            Ok(BytesResponse::from(response))
        })
    }
}
