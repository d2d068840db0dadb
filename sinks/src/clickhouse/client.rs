//! The HTTP(S) client and how its errors sort into retryable or not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clickhouse::Client;
use sluice_pipeline::SinkError;

/// ClickHouse error codes a retry may fix: overload, timeouts, network, too many parts,
/// memory pressure, a replica or keeper being away.
const TRANSIENT_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (replica temporarily read-only)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    252, // TOO_MANY_PARTS
    279, // ALL_CONNECTION_TRIES_FAILED (a cluster node is down)
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
    519, // NO_REMOTE_SHARD_AVAILABLE
    999, // KEEPER_EXCEPTION
];

/// `UNEXPECTED_END_OF_FILE`: on a cluster, the node a Distributed insert was writing to died
/// mid-insert ("… while receiving packet from host:port"); elsewhere a malformed body.
const UNEXPECTED_END_OF_FILE: u32 = 32;

/// Where and how to reach a ClickHouse server.
///
/// ```
/// let client = sluice_sinks::ClickHouseConnection::new("http://127.0.0.1:8123")
///     .client()
///     .expect("plain HTTP needs no certificate")
///     .with_database("shop");
/// # drop(client);
/// ```
#[derive(Clone, Debug)]
pub struct ClickHouseConnection {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// CA certificates (PEM) trusted besides the system's, for `https://` with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Compression of insert bodies (lz4 by default; none where the server is near).
    pub compression: clickhouse::Compression,
}

/// Why a connection cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The CA file cannot be read or holds no certificate.
    #[error("{path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS library refused the settings.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl ClickHouseConnection {
    /// A connection to `url` as `default` without a password, lz4 bodies.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            user: "default".into(),
            password: String::new(),
            ca_file: None,
            compression: clickhouse::Compression::Lz4,
        }
    }

    /// A client of the server, on its default database (see [`connect`]).
    pub fn client(&self) -> Result<Client, ConnectError> {
        if !self.url.starts_with("https://") && self.ca_file.is_none() {
            // Plain HTTP: no TLS connector (making one reads and parses the system's CA
            // bundle, a noticeable part of a short run's CPU).
            return Ok(plain_client()
                .with_url(&self.url)
                .with_user(&self.user)
                .with_password(&self.password)
                .with_compression(self.compression));
        }
        let tls = match &self.ca_file {
            Some(path) => Some(tls_with_ca(path)?),
            None => None,
        };
        Ok(connect_with(tls)?
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_compression(self.compression))
    }
}

/// TLS that trusts the system's roots and the CA certificates (PEM) in `path`.
fn tls_with_ca(path: &Path) -> Result<native_tls::TlsConnector, ConnectError> {
    let bad = |reason: String| ConnectError::CaFile {
        path: path.into(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let certs = native_tls::Certificate::stack_from_pem(&pem)
        .map_err(|e| bad(format!("holds no PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let mut tls = native_tls::TlsConnector::builder();
    for cert in certs {
        tls.add_root_certificate(cert);
    }
    tls.build().map_err(|e| ConnectError::Tls(e.to_string()))
}

/// A ClickHouse client over HTTP, or HTTPS verified against the system's roots, with
/// TCP_NODELAY set; give it a URL (`with_url`). The `clickhouse` crate's own client leaves
/// Nagle's algorithm on: the small last write of a chunked insert body then waits for the
/// server's delayed ACK (up to 40 ms on Linux) before ClickHouse sees the end of the body.
pub fn connect() -> Result<Client, ConnectError> {
    connect_with(None)
}

/// The TCP connector of every client: as the crate's own, TCP keepalive; and TCP_NODELAY.
fn http_connector() -> hyper_util::client::legacy::connect::HttpConnector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

/// A short idle pool, as the crate's own client (ClickHouse closes idle connections after
/// 3 s).
fn pool() -> hyper_util::client::legacy::Builder {
    let mut builder =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(2));
    builder
}

/// A client over plain HTTP only.
fn plain_client() -> Client {
    Client::with_http_client(pool().build(http_connector()))
}

fn connect_with(tls: Option<native_tls::TlsConnector>) -> Result<Client, ConnectError> {
    let http = http_connector();
    let tls = match tls {
        Some(tls) => tls,
        None => native_tls::TlsConnector::new().map_err(|e| ConnectError::Tls(e.to_string()))?,
    };
    let https = hyper_tls::HttpsConnector::from((http, tls.into()));
    Ok(Client::with_http_client(pool().build(https)))
}

/// The ClickHouse error code in a server response (`Code: 252. DB::Exception: …`).
pub fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A ClickHouse error, named as such (on `/ready` and in logs, beside other services').
#[derive(Debug, thiserror::Error)]
#[error("clickhouse: {0}")]
pub struct ServerError(#[source] pub clickhouse::error::Error);

/// Sorts a `clickhouse` error into retryable or not.
pub fn classify(err: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error as E;
    let transient = match &err {
        E::Network(_) | E::TimedOut => true,
        E::BadResponse(msg) => match error_code(msg) {
            Some(code) if TRANSIENT_CODES.contains(&code) => true,
            Some(UNEXPECTED_END_OF_FILE) => msg.contains("while receiving packet from"),
            Some(_) => false,
            // No code: an HTTP-level failure (proxy, 5xx without a ClickHouse body).
            None => true,
        },
        _ => false,
    };
    if transient {
        SinkError::transient(ServerError(err))
    } else {
        SinkError::permanent(ServerError(err))
    }
}

/// Whether a failed insert may have been applied in part: the request got no answer.
pub(crate) fn unanswered(err: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error as E;
    match err {
        E::Network(_) | E::TimedOut => true,
        E::BadResponse(msg) => error_code(msg).is_none(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_sort_into_transient_and_permanent() {
        assert_eq!(
            error_code("Code: 252. DB::Exception: Too many parts"),
            Some(252)
        );
        assert!(
            classify(clickhouse::error::Error::BadResponse(
                "Code: 252. DB::Exception: Too many parts (300)".into()
            ))
            .is_transient()
        );
        assert!(
            !classify(clickhouse::error::Error::BadResponse(
                "Code: 60. DB::Exception: Unknown table".into()
            ))
            .is_transient()
        );
        assert!(
            classify(clickhouse::error::Error::BadResponse(
                "502 Bad Gateway".into()
            ))
            .is_transient()
        );
        assert!(classify(clickhouse::error::Error::TimedOut).is_transient());
        let node_died = classify(clickhouse::error::Error::BadResponse(
            "Code: 32. DB::Exception: Attempt to read after eof: while receiving packet from 127.0.0.1:9204".into(),
        ));
        assert!(node_died.is_transient());
        assert!(
            node_died.to_string().contains("clickhouse: "),
            "{node_died}"
        );
        assert!(
            !classify(clickhouse::error::Error::BadResponse(
                "Code: 32. DB::Exception: Attempt to read after eof".into()
            ))
            .is_transient()
        );
        assert!(!classify(clickhouse::error::Error::SchemaMismatch("x".into())).is_transient());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let path = std::env::temp_dir().join(format!("sluice-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate").unwrap();
        let mut c = ClickHouseConnection::new("https://ch:8443");
        c.ca_file = Some(path.clone());
        let e = c.client().expect_err("no certificate").to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        let _ = std::fs::remove_file(path);
        c.ca_file = None;
        assert!(c.client().is_ok(), "the system's roots");
    }
}
