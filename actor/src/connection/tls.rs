//! TLS mistakes told apart: a certificate refused for good or for now,
//! a TLS learner reached over plain text, a plain-text one over TLS.

use std::time::Duration;

/// The first bytes of the HTTP/2 client preface, which is what a plain-text
/// client sends first: a TLS server reads them as a record header of an
/// unknown type, and answers with an alert. Exactly one record header
/// long, so the server reads all of it and its close cannot reset the
/// connection under its alert.
pub(super) const PLAIN_TEXT_PROBE: &[u8; 5] = b"PRI *";

/// Whether the server at `url`'s host and port answers plain text as a TLS
/// server does: with an alert record (content type 21, version 3.x). Asked
/// once an `http://` address answered with something that is not HTTP/2,
/// to name the fix rather than retry for ever. False for anything else
/// (no answer in [`TLS_PROBE_TIMEOUT`], a closed connection, other bytes).
pub(crate) async fn answers_as_tls(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(authority) = url
        .parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|uri| Some(format!("{}:{}", uri.host()?, uri.port_u16().unwrap_or(80))))
    else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream.write_all(PLAIN_TEXT_PROBE).await.ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        Some(head == [TLS_ALERT_RECORD, 3])
    };
    matches!(
        tokio::time::timeout(TLS_PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// How long the TLS probe waits for its alert: a TLS server answers the
/// probe's record header within a round trip, while another server may
/// wait for more (an HTTP/1 server for the end of its line: each attempt
/// at a web server took 10 s with the handshake's timeout here).
const TLS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A TLS record's first byte when it is an alert.
const TLS_ALERT_RECORD: u8 = 0x15;

/// Alerts by which a TLS server refuses its client's certificate.
const CERTIFICATE_REFUSED: [rustls::AlertDescription; 7] = {
    use rustls::AlertDescription as Alert;
    [
        Alert::CertificateRequired,
        Alert::BadCertificate,
        Alert::UnknownCA,
        Alert::CertificateUnknown,
        Alert::CertificateExpired,
        Alert::CertificateRevoked,
        Alert::UnsupportedCertificate,
    ]
};

/// What is wrong with TLS (a certificate, or no TLS at all), among an
/// error's causes.
#[derive(Debug, Clone, Copy)]
pub(super) enum CertificateTrouble {
    /// No retry can fix it: the learner's certificate failed this actor's
    /// checks (but for its dates), or the learner refused this actor's
    /// certificate (mutual TLS). Says what to fix.
    Final(&'static str),
    /// The learner's certificate is out of date: it may be given a new
    /// one, or this clock set (at boot, before time sync). Retried.
    OutOfDate,
}

impl CertificateTrouble {
    /// What a retried connection error says first ("" when the trouble,
    /// if any, is not the certificate).
    pub(super) fn retry_prefix(trouble: Option<Self>) -> &'static str {
        match trouble {
            Some(CertificateTrouble::OutOfDate) => {
                "tls: the learner's certificate is out of date (expired, or not yet valid by this machine's clock; retried, as it may be renewed): "
            }
            _ => "",
        }
    }
}

/// The certificate trouble among `error`'s causes, if any.
pub(super) fn certificate_trouble(
    error: &(dyn std::error::Error + 'static),
) -> Option<CertificateTrouble> {
    use CertificateTrouble::{Final, OutOfDate};
    use rustls::{CertificateError, Error as TlsError};
    const NOT_FOR_THIS_NAME: &str =
        "the learner's certificate is not for this name: set tls.domain to a name it carries";
    const NOT_ACCEPTED: &str =
        "the learner's certificate was not accepted: tls.ca_file must hold the CA that signed it";
    const REFUSED: &str = "the learner refused this client's certificate (mutual TLS): tls.cert_file and tls.key_file must hold one signed by the CA of the learner's tls.ca_file";
    const A_CA: &str = "the learner's certificate is a CA certificate (CA:TRUE, as `openssl req -x509` makes by default): give the learner one signed by a CA, and the actors that CA (see the README's recipe)";
    const NOT_TLS: &str = "the learner does not speak TLS at this address: use http://, or give the learner tls.cert_file and tls.key_file";
    let mut cause = Some(error);
    while let Some(current) = cause {
        // An io::Error leaves the error it wraps out of the sources; and
        // an alert that arrives after the handshake (TLS 1.3 checks the
        // client's certificate then) reaches here through HTTP/2 as the
        // alert's text only.
        let wrapped = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        let tls = current
            .downcast_ref::<TlsError>()
            .or_else(|| wrapped?.downcast_ref::<TlsError>());
        match tls {
            Some(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => return Some(Final(NOT_FOR_THIS_NAME)),
            Some(TlsError::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            )) => return Some(OutOfDate),
            // (webpki's reason travels as an opaque error: by its name.)
            Some(TlsError::InvalidCertificate(CertificateError::Other(other)))
                if format!("{other:?}").contains("CaUsedAsEndEntity") =>
            {
                return Some(Final(A_CA));
            }
            Some(TlsError::InvalidCertificate(_)) => return Some(Final(NOT_ACCEPTED)),
            // A plain-text server's first bytes, read as a TLS record.
            Some(TlsError::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                return Some(Final(NOT_TLS));
            }
            Some(TlsError::AlertReceived(alert)) if CERTIFICATE_REFUSED.contains(alert) => {
                return Some(Final(REFUSED));
            }
            Some(_) => {}
            None => {
                if let Some(text) = wrapped.map(ToString::to_string)
                    && CERTIFICATE_REFUSED
                        .iter()
                        .any(|&alert| TlsError::AlertReceived(alert).to_string() == text)
                {
                    return Some(Final(REFUSED));
                }
            }
        }
        cause = current.source();
    }
    None
}

/// A TLS set-up mistake among `error`'s causes that no retry can mend,
/// saying what to fix (in the actor's configuration keys).
pub(crate) fn tls_mistake(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    match certificate_trouble(error) {
        Some(CertificateTrouble::Final(problem)) => Some(problem),
        _ => None,
    }
}
