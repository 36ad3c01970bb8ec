//! The learner's gRPC health check, as `flgfn-health` asks it: over plain
//! HTTP/2, or over TLS (and mutual TLS) for an `https://` address.

use flgfn_common::auth::TlsConfig;
use flgfn_common::config::ConfigError;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Why no status came back.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The TLS files (`ca_file` is needed for `https://`).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Not a URL, or no connection (refused, TLS handshake failed).
    #[error("cannot connect")]
    Connect(#[from] tonic::transport::Error),
    /// The learner answered with an error (unknown service...), or the
    /// call failed on the way (a connection closed: the status's source
    /// says why, its message only "transport error").
    #[error("{}: {}", .0.code(), crate::connection::status_causes(.0))]
    Refused(tonic::Status),
}

/// Asks the health service at `address` about `service` ("" is the server
/// as a whole). For an `https://` address, `tls` names the CA that signed
/// the learner's certificate, the name it carries (default: the address's
/// host) and, for mutual TLS, a client certificate and key.
pub async fn check(
    address: &str,
    service: &str,
    tls: &TlsConfig,
) -> Result<ServingStatus, HealthError> {
    // A bare HOST:PORT is plain HTTP/2: TLS needs https:// spelt out, and
    // TLS files without it would be silently unused (and the probe of a
    // TLS learner would fail with a bare transport error).
    let tls_files = [&tls.ca_file, &tls.cert_file, &tls.key_file];
    if !address.starts_with("https://") && tls_files.iter().any(|file| !file.is_empty()) {
        let host = address.split_once("://").map_or(address, |(_, rest)| rest);
        return Err(ConfigError::invalid(
            "--address",
            format!("{address} is not https:// while TLS files are given: use https://{host}"),
        )
        .into());
    }
    let address = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(address.clone())?;
    if let Some(tls) = crate::client_tls_for(&address, tls)? {
        endpoint = endpoint.tls_config(tls)?;
    }
    let mut client = HealthClient::new(endpoint.connect().await?);
    let reply = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(HealthError::Refused)?
        .into_inner();
    Ok(reply.status())
}
