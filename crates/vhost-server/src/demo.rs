//! `pingora-vhost demo`: a working setup on a fresh machine, with no root and no files to write
//! by hand. Two tiny built-in backends answer on loopback (tag "a" and tag "b"); a config with
//! two demo domains and a self-signed certificate is written to a directory; the proxy then runs
//! from that config exactly as `pingora-vhost --config` would. Its certificate generator and
//! backends are also handy for trying the proxy in-process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};

use crate::error::ServerError;

const DOMAIN: &str = "app.demo.test";
const SECURE_DOMAIN: &str = "secure.demo.test";

/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A port the demo needs is taken.
    #[error("port {port} ({what}) is already in use: choose other ports with --http-port (the demo uses the port given, +80, +443 and +1090)")]
    PortBusy {
        /// The port.
        port: u16,
        /// What the demo wanted it for.
        what: &'static str,
        /// The bind error.
        source: std::io::Error,
    },
    /// `--http-port` leaves no room for the other ports.
    #[error("--http-port {0} is too high: the demo also uses that port +80, +443 and +1090")]
    PortTooHigh(u16),
    /// A file or directory could not be written, or the backends could not start.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The self-signed certificate could not be generated.
    #[error("cannot generate the demo certificate: {0}")]
    Certificate(#[from] openssl::error::ErrorStack),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { what, source }
}

/// A prepared demo: backends running, ports checked, config and certificate written.
pub struct Demo {
    config_path: PathBuf,
    config: vhost_config::Config,
    banner: String,
    _rt: tokio::runtime::Runtime,
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Demo {
    /// Checks that the demo's ports are free (before anything is printed), starts the two
    /// backends and writes the demo config and certificate to `dir` (default: a new temporary
    /// directory, removed when the demo ends).
    pub fn prepare(dir: Option<PathBuf>, http_port: u16) -> Result<Self, ServerError> {
        let port = |offset: u16| {
            http_port
                .checked_add(offset)
                .ok_or(DemoError::PortTooHigh(http_port))
        };
        let (https_port, admin_port, metrics_port) = (port(443)?, port(80)?, port(1090)?);
        for (port, what) in [
            (http_port, "proxy HTTP"),
            (https_port, "proxy HTTPS"),
            (admin_port, "admin API"),
            (metrics_port, "metrics"),
        ] {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|source| DemoError::PortBusy { port, what, source })?;
        }
        let (dir, temp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(&d).map_err(io("cannot create the demo directory"))?;
                (d, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("pingora-vhost-demo-")
                    .tempdir()
                    .map_err(io("cannot create a temporary directory"))?;
                (t.path().to_owned(), Some(t))
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("demo-backends")
            .enable_all()
            .build()
            .map_err(io("cannot start the demo backends' runtime"))?;
        let a = rt
            .block_on(start_backend("demo-a", "a"))
            .map_err(io("cannot start demo backend a"))?;
        let b = rt
            .block_on(start_backend("demo-b", "b"))
            .map_err(io("cannot start demo backend b"))?;

        let (cert, key) = write_self_signed(&dir, &[DOMAIN, SECURE_DOMAIN])?;
        let config_path = dir.join("config.toml");
        let config = format!(
            r#"# pingora-vhost demo configuration (written by `pingora-vhost demo`).
[proxy]
listen_addr = "127.0.0.1:{https_port}"
listen_addr_http = "127.0.0.1:{http_port}"
default_cert_path = "{cert}"
default_key_path = "{key}"
management_api_addr = "127.0.0.1:{admin_port}"
grace_period_secs = 2

[metrics]
enabled = true
listen_addr = "127.0.0.1:{metrics_port}"

[[virtual_hosts]]
domain = "{DOMAIN}"
enabled_backends_tag = "a"

[[virtual_hosts]]
domain = "{SECURE_DOMAIN}"
enabled_backends_tag = "b"
http_to_https = true

[[backends]]
id = "demo-a"
address = "{a}"
tags = ["a"]

[[backends]]
id = "demo-b"
address = "{b}"
tags = ["b"]
"#,
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(&config_path, config).map_err(io("cannot write the demo config"))?;
        let loaded = vhost_config::load(&config_path)?;
        let banner = format!(
            r#"
pingora-vhost demo
  config:    {config}
  backends:  demo-a (tag "a") on {a}, demo-b (tag "b") on {b}
  proxy:     http://127.0.0.1:{http_port}  https://127.0.0.1:{https_port}
  admin API: http://127.0.0.1:{admin_port}/api/v1   metrics: http://127.0.0.1:{metrics_port}/metrics

Try, in another terminal:
  curl -H 'Host: {DOMAIN}' http://127.0.0.1:{http_port}/hello        # -> backend demo-a (tag a)
  curl -X POST http://127.0.0.1:{admin_port}/api/v1/domains/{DOMAIN}/switch        -H 'Content-Type: application/json' -d '{{"new_tag": "b"}}'  # A/B switch
  curl -H 'Host: {DOMAIN}' http://127.0.0.1:{http_port}/hello        # -> now demo-b (tag b)
  curl http://127.0.0.1:{admin_port}/api/v1/backends                 # backends with health
  curl -i -H 'Host: {SECURE_DOMAIN}' http://127.0.0.1:{http_port}/x?y=1  # -> 308 to https
  curl -k --resolve {SECURE_DOMAIN}:{https_port}:127.0.0.1 https://{SECURE_DOMAIN}:{https_port}/  # -> demo-b over TLS (h2)
  curl -i -H 'Host: unknown.test' http://127.0.0.1:{http_port}/      # -> 404, never forwarded
Changes made through the API are written back to the config file above.
Stop with Ctrl-C.
"#,
            config = config_path.display(),
        );
        Ok(Self {
            config_path,
            config: loaded,
            banner,
            _rt: rt,
            _temp: temp,
        })
    }

    /// The loaded demo configuration (e.g. for setting up logging).
    pub fn config(&self) -> &vhost_config::Config {
        &self.config
    }

    /// What to print: where everything listens and curl lines to try.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// Runs the proxy on the demo config until SIGTERM or SIGINT.
    pub fn run(self) -> Result<(), ServerError> {
        crate::run(
            self.config.clone(),
            &self.config_path,
            crate::Signals::Process,
        )
    }
}

/// A minimal HTTP/1.1 + h2c backend answering with its name and tag.
pub async fn start_backend(name: &'static str, tag: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        let host = req
                            .headers()
                            .get(hyper::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let body = format!(
                            "backend {name} (tag {tag}) answered {} {} for {host}\n",
                            req.method(),
                            req.uri()
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Writes a self-signed EC certificate for `names` (valid 30 days) and its key.
pub fn write_self_signed(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf), DemoError> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, names.first().copied().unwrap_or("demo"))?;
    let name = name.build();
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let serial = BigNum::from_u32(1)?.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(&name)?;
    builder.set_pubkey(&key)?;
    builder.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    builder.set_not_after(&*Asn1Time::days_from_now(30)?)?;
    let mut san = SubjectAlternativeName::new();
    for n in names {
        san.dns(n);
    }
    let san = san.build(&builder.x509v3_context(None, None))?;
    builder.append_extension(san)?;
    builder.sign(&key, MessageDigest::sha256())?;
    let cert_path = dir.join("demo.crt");
    let key_path = dir.join("demo.key");
    std::fs::write(&cert_path, builder.build().to_pem()?)
        .map_err(io("cannot write the demo certificate"))?;
    std::fs::write(&key_path, key.private_key_to_pem_pkcs8()?)
        .map_err(io("cannot write the demo key"))?;
    Ok((cert_path, key_path))
}
