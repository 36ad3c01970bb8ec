//! The learner's gRPC health check, as `flgfn-health` asks it: over plain
//! HTTP/2, or over TLS (and mutual TLS) for an `https://` address.

use std::time::Duration;

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
    if !address.starts_with("https://") && tls.names_client_files() {
        let host = address.split_once("://").map_or(address, |(_, rest)| rest);
        return Err(ConfigError::invalid(
            "--address",
            format!("{address} is not https:// while TLS files are given: use https://{host}"),
        )
        .into());
    }
    if let Some((scheme, _)) = address.split_once("://")
        && scheme != "http"
        && scheme != "https"
    {
        return Err(ConfigError::invalid(
            "--address",
            format!(
                "`{scheme}://`: the learner's address is http:// or https:// (or a bare HOST:PORT)"
            ),
        )
        .into());
    }
    let address = crate::cli::flag_address_with_scheme(address, "--address")?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(address.clone()).map_err(|e| {
        ConfigError::invalid(
            "--address",
            format!("`{address}` is not a usable address: {e}"),
        )
    })?;
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

/// What to check after `error` from [`check`] at `address`, if anything:
/// a TLS set-up mistake, as the actor names it (in `flgfn-health`'s
/// flags); for plain text that got no HTTP/2 answer, whether the learner
/// serves TLS, asked as the actor asks it (a TLS alert to plain text);
/// over TLS, a learner that may want a client certificate. The probe
/// gets `probe_within` at most (the caller's time left); past that, the
/// hint is the one without it.
pub async fn hint(error: &HealthError, address: &str, probe_within: Duration) -> Option<String> {
    let hint = hint_without_probe(error, address)?;
    let plain = !address.starts_with("https://");
    let cut_off = matches!(error, HealthError::Refused(_));
    let url = crate::cli::with_scheme(address);
    let probe = crate::connection::answers_as_tls(&url);
    if plain && cut_off && tokio::time::timeout(probe_within, probe).await == Ok(true) {
        return Some("the learner serves TLS: use https:// and --ca-file".to_owned());
    }
    Some(hint)
}

/// [`hint`] from `error` alone.
fn hint_without_probe(error: &HealthError, address: &str) -> Option<String> {
    let status = match error {
        HealthError::Config(_) => return None,
        HealthError::Connect(error) => {
            return crate::connection::tls_mistake(error).map(flag_names);
        }
        HealthError::Refused(status) => status,
    };
    if let Some(mistake) = crate::connection::tls_mistake(status) {
        return Some(flag_names(mistake));
    }
    // Cut off before any answer (a status the peer sent has no source):
    // what a TLS server does to plain text, and a mutual-TLS learner to a
    // client without its certificate; also a learner closing its
    // connections as it stops.
    std::error::Error::source(status)?;
    Some(if address.starts_with("https://") {
        "if the learner wants client certificates (mutual TLS), give --cert-file and --key-file, signed by the CA of its tls.ca_file".to_owned()
    } else if crate::connection::not_http2(status) {
        "it does not speak plain HTTP/2: if the learner serves TLS, use https:// and --ca-file"
            .to_owned()
    } else {
        "the connection closed before an answer: a learner stopping or starting, or one serving TLS (then use https:// and --ca-file)".to_owned()
    })
}

/// The actor's TLS keys in an actor's message, as this program's flags.
fn flag_names(text: &str) -> String {
    text.replace("set tls.domain", "set --domain")
        .replace("tls.ca_file must hold", "--ca-file must hold")
        .replace(
            "tls.cert_file and tls.key_file must hold",
            "--cert-file and --key-file must hold",
        )
        .replace("use http://,", "use an http:// address,")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that accepts and closes at once (a learner stopping) is not
    /// said to be a TLS learner.
    #[tokio::test]
    async fn a_closed_connection_is_not_blamed_on_tls_alone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let closer = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                drop(socket);
            }
        });
        let error = check(&address, "", &TlsConfig::default())
            .await
            .unwrap_err();
        let hint = hint(&error, &address, Duration::from_secs(5))
            .await
            .unwrap_or_default();
        assert!(
            hint.starts_with("the connection closed before an answer: a learner stopping"),
            "{error}: {hint}"
        );
        closer.abort();
    }
}
