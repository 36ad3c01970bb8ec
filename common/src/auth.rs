//! The shared bearer token: where it comes from, how it travels, how it is
//! compared.
//!
//! Learner and actors read the same secret, from the `FLGFN_TOKEN`
//! environment variable if set and not blank, else from the file `auth.token_file`
//! (surrounding whitespace trimmed). Actors send it on every RPC as
//! `authorization: Bearer <token>`; the learner checks it in an
//! interceptor, comparing in constant time. The token never appears in
//! logs, errors or `--print-config` (only the file's path does).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Environment variable that holds the token (takes precedence over
/// `auth.token_file`).
pub const TOKEN_ENV: &str = "FLGFN_TOKEN";

/// gRPC metadata key of the token.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// `[auth]`: shared by the learner and the actors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file holding the bearer token (empty: none, unless `FLGFN_TOKEN`
    /// is set).
    pub token_file: String,
    /// Learner: listen on a non-loopback address without a token anyway
    /// (anyone who reaches the port can then train the model).
    pub allow_unauthenticated: bool,
}

/// `[tls]`: transport security between actors and learner. The learner
/// serves TLS when `cert_file` is set; an actor uses TLS for an `https://`
/// learner URL.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate: the learner's own, or an actor's client
    /// certificate for mutual TLS.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// PEM CA certificate. Actor: the CA that signed the learner's
    /// certificate (else the system's roots are not consulted: set it).
    /// Learner: when set, every client must present a certificate signed
    /// by it (mutual TLS).
    pub ca_file: String,
    /// Actor: the name the learner's certificate must carry (default: the
    /// URL's host).
    pub domain: String,
}

impl TlsConfig {
    /// Whether it names a file a client reads (CA, certificate, key): a
    /// client so configured talks TLS, and a plain-text address is a
    /// mistake it refuses rather than leave the files unused.
    pub fn names_client_files(&self) -> bool {
        [&self.ca_file, &self.cert_file, &self.key_file]
            .iter()
            .any(|file| !file.is_empty())
    }
}

/// PEM files of a [`TlsConfig`], read.
#[derive(Clone)]
pub struct TlsFiles {
    /// `cert_file` and `key_file`, if set.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// `ca_file`, if set.
    pub ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

/// Which end of a connection a [`TlsConfig`] is read for: its certificate
/// must be made for that end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// The learner: its certificate serves TLS (serverAuth).
    Learner,
    /// An actor or `flgfn-health`: its certificate, if any, is a client's
    /// for mutual TLS (clientAuth).
    Client,
}

impl TlsRole {
    /// The extendedKeyUsage this role's certificate needs, and what the
    /// peer would do with one that lacks it (the end of the refusal).
    fn purpose(self) -> (&'static [u8], &'static str) {
        use crate::key_usage::{CLIENT_AUTH, SERVER_AUTH};
        match self {
            TlsRole::Learner => (
                SERVER_AUTH,
                "not serverAuth, so actors would refuse it as a learner's (is it an actor's client certificate?): give the learner one made for serving, with extendedKeyUsage serverAuth or none",
            ),
            TlsRole::Client => (
                CLIENT_AUTH,
                "not clientAuth, so a learner requiring client certificates would refuse it (is it the learner's own?): give this client (an actor, flgfn-health) a client certificate, with extendedKeyUsage clientAuth or none, or without mutual TLS none at all",
            ),
        }
    }
}

/// Reads the files `config` names for `role`; an error names the key.
pub fn read_tls(config: &TlsConfig, role: TlsRole) -> Result<TlsFiles, ConfigError> {
    // Each must hold a PEM block of its kind: rustls takes a file without
    // one (DER, the wrong file) as an empty set of roots or no identity,
    // and the handshakes then fail later with an error naming no file.
    let read = |field: &'static str,
                path: &str,
                kind: &str|
     -> Result<Option<Vec<u8>>, ConfigError> {
        if path.is_empty() {
            return Ok(None);
        }
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigError::invalid(field, format!("cannot read {}: {e}", shown_path(path)))
        })?;
        let text = String::from_utf8_lossy(&bytes);
        if !text.contains("-----BEGIN ") || !text.contains(kind) {
            return Err(ConfigError::invalid(
                field,
                format!("{path} holds no PEM {kind} block (-----BEGIN ...{kind}-----)"),
            ));
        }
        // Look-alikes: a request is no certificate (and would read as an
        // empty chain, blamed on the key), and an encrypted key cannot
        // be read without its passphrase.
        if kind == "CERTIFICATE" && !text.contains("-----BEGIN CERTIFICATE-----") {
            let why = if text.contains("-----BEGIN CERTIFICATE REQUEST-----") {
                "a certificate request, not a certificate: sign it first (as in the README's OpenSSL recipe)"
            } else {
                "no PEM certificate (-----BEGIN CERTIFICATE-----)"
            };
            return Err(ConfigError::invalid(field, format!("{path} holds {why}")));
        }
        // (PKCS#8's own label, or the older form's header line.)
        if kind == "PRIVATE KEY"
            && (text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
                || text.contains("Proc-Type: 4,ENCRYPTED"))
        {
            return Err(ConfigError::invalid(
                field,
                format!(
                    "{path} holds an encrypted private key, which cannot be read without its passphrase: write it unencrypted where only its owner can read it (`(umask 077; openssl pkey -in {path} -out plain.key)`)"
                ),
            ));
        }
        if kind == "PRIVATE KEY" {
            warn_if_others_can_read(field, path);
        }
        Ok(Some(bytes))
    };
    let cert = read("tls.cert_file", &config.cert_file, "CERTIFICATE")?;
    let key = read("tls.key_file", &config.key_file, "PRIVATE KEY")?;
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => {
            let presented = check_key_pair(config, &cert, &key)?;
            check_purpose(config, &presented, role)?;
            Some((cert, key))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "tls.key_file",
                "tls.cert_file is set without its key",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "tls.cert_file",
                "tls.key_file is set without its certificate",
            ));
        }
    };
    let ca = read("tls.ca_file", &config.ca_file, "CERTIFICATE")?;
    if let Some(ca) = &ca {
        check_ca(config, ca)?;
    }
    Ok(TlsFiles { identity, ca })
}

/// Refuses a CA file none of whose certificates parse as one: rustls
/// would drop each silently, leaving no root to trust, and every handshake
/// would fail later blaming the peer's certificate (or, on the learner,
/// all three TLS files at once).
fn check_ca(config: &TlsConfig, ca: &[u8]) -> Result<(), ConfigError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let refuse =
        |why: String| ConfigError::invalid("tls.ca_file", format!("{}: {why}", config.ca_file));
    let certificates = CertificateDer::pem_slice_iter(ca)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refuse(format!("cannot parse its certificates: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, unusable) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(refuse(format!(
            "holds no certificate usable as a CA ({unusable} that do not parse as one)"
        )));
    }
    Ok(())
}

/// Refuses a certificate whose extendedKeyUsage leaves out `role`'s
/// purpose, which its peers would refuse in every handshake: above all
/// one role's certificate given to the other (a learner serving an
/// actor's client certificate, whose actors each fail to connect).
fn check_purpose(config: &TlsConfig, presented: &[u8], role: TlsRole) -> Result<(), ConfigError> {
    use crate::key_usage::{extended_key_usages, purpose_name};
    let Some(purposes) = extended_key_usages(presented) else {
        return Ok(());
    };
    let (needed, refusal) = role.purpose();
    if purposes.contains(&needed) {
        return Ok(());
    }
    // (An empty list, which webpki refuses too, lists no purpose.)
    let listed = if purposes.is_empty() {
        "no purpose".to_owned()
    } else {
        purposes
            .iter()
            .map(|id| purpose_name(id))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(ConfigError::invalid(
        "tls.cert_file",
        format!(
            "{}: its extendedKeyUsage lists {listed}, {refusal}",
            config.cert_file
        ),
    ))
}

/// Refuses certificates that do not parse, a key rustls cannot use, and a
/// key that is not the one of the certificate's public key. tonic finds
/// these only when it builds its TLS setup, the learner at startup and an
/// actor at its first connection, with errors that name no file; a key
/// from another pair is a common slip when certificates are renewed.
/// Gives the chain's first certificate, the one presented (DER).
fn check_key_pair(config: &TlsConfig, cert: &[u8], key: &[u8]) -> Result<Vec<u8>, ConfigError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            let why = format!("{}: cannot parse its certificates: {e}", config.cert_file);
            ConfigError::invalid("tls.cert_file", why)
        })?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        let why = format!("{}: cannot parse its private key: {e}", config.key_file);
        ConfigError::invalid("tls.key_file", why)
    })?;
    let presented = chain.first().map(|c| c.to_vec()).unwrap_or_default();
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
        Ok(_) => Ok(presented),
        Err(rustls::Error::InconsistentKeys(_)) => Err(ConfigError::invalid(
            "tls.key_file",
            format!(
                "{} does not match the certificate of tls.cert_file ({}): set both from one key pair",
                config.key_file, config.cert_file
            ),
        )),
        // (rustls says "invalid peer certificate", of this process's own;
        // webpki's reason travels as an opaque error: by its name.)
        Err(rustls::Error::InvalidCertificate(reason)) => {
            let why = if format!("{reason:?}").contains("UnsupportedCertVersion") {
                "an X.509 version 1 certificate: it has no extensions, so no subjectAltName for the names clients dial (`openssl x509 -req` makes one without `-extfile`); sign it again with its names, as in the README's OpenSSL recipe".to_owned()
            } else {
                format!("the certificate cannot be used: {reason:?}")
            };
            Err(ConfigError::invalid(
                "tls.cert_file",
                format!("{}: {why}", config.cert_file),
            ))
        }
        Err(e) => Err(ConfigError::invalid(
            "tls.key_file",
            format!("{}: the private key cannot be used: {e}", config.key_file),
        )),
    }
}

/// A bearer token. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Token {
    secret: String,
    /// Where it was read (`FLGFN_TOKEN`, `auth.token_file`): for an
    /// error when the learner refuses it.
    from: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A token's least length: guessing it must be out of reach.
const MIN_TOKEN_CHARS: usize = 16;

impl Token {
    /// A token from its text: printable ASCII without spaces (it travels in
    /// an HTTP/2 header), at least 16 characters.
    pub fn new(text: &str, source: &str) -> Result<Self, ConfigError> {
        if text.len() < MIN_TOKEN_CHARS {
            return Err(ConfigError::invalid(
                source,
                format!(
                    "the token has {} characters; use at least {MIN_TOKEN_CHARS}",
                    text.len()
                ),
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                source,
                "the token must be printable ASCII without spaces",
            ));
        }
        // Copied from a .env file, or quoted as in a shell: the other side
        // would be given it without, and refuse it.
        if text.starts_with(&format!("{TOKEN_ENV}=")) {
            return Err(ConfigError::invalid(
                source,
                format!("the token starts with `{TOKEN_ENV}=`: give the token alone"),
            ));
        }
        let quoted = |quote: char| text.starts_with(quote) && text.ends_with(quote);
        if quoted('"') || quoted('\'') {
            return Err(ConfigError::invalid(
                source,
                "the token is in quotes, which would be part of it: remove them",
            ));
        }
        Ok(Token {
            secret: text.to_owned(),
            from: source.to_owned(),
        })
    }

    /// Where the token was read.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The `authorization` header value.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.secret)
    }

    /// Whether `header` (an `authorization` value) carries this token, in
    /// time that does not depend on where they differ.
    pub fn matches(&self, header: &[u8]) -> bool {
        same_secret(header, self.header_value().as_bytes())
    }
}

/// Whether `given` equals `expected`, in time that depends on their
/// lengths only, not on where they differ: for secrets (the token, a
/// session key) compared with what a client sent.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    // black_box keeps the optimiser from seeing the fold's value, and so
    // from turning it into a loop that stops at the first difference: in
    // practice, as std promises nothing for cryptography.
    given
        .iter()
        .zip(expected)
        .fold(0u8, |diff, (a, b)| std::hint::black_box(diff | (a ^ b)))
        == 0
}

/// `--print-config`'s lines on the secrets, once they were read as a start
/// reads them (so that a token or TLS file that would stop the binary
/// stops `--print-config` too): where the token came from, never the token,
/// and which TLS files were read (`tls_read`: false where this binary
/// reads none for its settings, an actor with an `http://` learner).
pub fn describe_secrets(token: Option<&Token>, tls: &TlsConfig, tls_read: bool) -> String {
    let token = token.map_or_else(
        || "none (calls carry no token)".to_owned(),
        |token| format!("from {} (not shown), read", token.from()),
    );
    let files: Vec<&str> = [
        ("tls.cert_file", &tls.cert_file),
        ("tls.key_file", &tls.key_file),
        ("tls.ca_file", &tls.ca_file),
    ]
    .into_iter()
    .filter(|(_, path)| tls_read && !path.is_empty())
    .map(|(key, _)| key)
    .collect();
    let tls = if files.is_empty() {
        "none read (plain text)".to_owned()
    } else {
        format!("{} read", files.join(", "))
    };
    format!("# Token: {token}\n# TLS files: {tls}\n")
}

/// A path from a key that names a secret's file, as errors show it: as
/// it is, unless it may be the secret itself, put in the path's key (a
/// token set as `FLGFN_AUTH__TOKEN_FILE`, a key's PEM text as
/// `FLGFN_TLS__KEY_FILE`), which stays out of logs and errors: a PEM
/// marker or a control character (a line break), or what a generated
/// token looks like (a token's length, no `.`, all hex digits or upper and
/// lower case letters with digits, as base64 has) unless its folder
/// exists. A heuristic: a hand-made passphrase put there still shows.
fn shown_path(path: &str) -> String {
    let has = |test: fn(&char) -> bool| path.chars().any(|c| test(&c));
    let generated = path.chars().all(|c| c.is_ascii_hexdigit())
        || (has(char::is_ascii_uppercase)
            && has(char::is_ascii_lowercase)
            && has(char::is_ascii_digit));
    let in_a_folder = path.contains('/')
        && std::path::Path::new(path)
            .parent()
            .is_some_and(|folder| !folder.as_os_str().is_empty() && folder.is_dir());
    let token_like =
        path.len() >= MIN_TOKEN_CHARS && !path.contains('.') && generated && !in_a_folder;
    let may_be_secret = path.contains("-----") || path.chars().any(char::is_control) || token_like;
    if may_be_secret {
        format!(
            "a value of {} characters, not shown: it looks like a secret, not a path",
            path.chars().count()
        )
    } else {
        path.to_owned()
    }
}

/// The configured token: `FLGFN_TOKEN` if set and not empty, else the
/// contents of `auth.token_file` if set, else none.
pub fn load_token(config: &AuthConfig) -> Result<Option<Token>, ConfigError> {
    token_from(std::env::var_os(TOKEN_ENV), config)
}

/// [`load_token`] with `FLGFN_TOKEN`'s value given. One that is not UTF-8
/// is an error, not unset: a learner would otherwise fall back to no
/// token at all.
fn token_from(
    variable: Option<std::ffi::OsString>,
    config: &AuthConfig,
) -> Result<Option<Token>, ConfigError> {
    let variable = variable
        .map(|value| {
            value
                .into_string()
                .map_err(|_| ConfigError::invalid(TOKEN_ENV, "the token is not UTF-8"))
        })
        .transpose()?;
    if let Some(text) = variable
        && !text.trim().is_empty()
    {
        let mut token = Token::new(text.trim(), TOKEN_ENV)?;
        if !config.token_file.is_empty() {
            token.from = format!(
                "{TOKEN_ENV}, which overrides auth.token_file ({})",
                shown_path(&config.token_file)
            );
        }
        return Ok(Some(token));
    }
    if config.token_file.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config.token_file).map_err(|e| {
        ConfigError::invalid(
            "auth.token_file",
            format!("cannot read {}: {e}", shown_path(&config.token_file)),
        )
    })?;
    let mut token = Token::new(text.trim(), "auth.token_file")?;
    token.from = format!("auth.token_file ({})", config.token_file);
    warn_if_others_can_read("auth.token_file", &config.token_file);
    Ok(Some(token))
}

/// Warns where a secret's file may be read by every user of the machine:
/// on a shared host (a Slurm cluster's nodes, a workstation) anyone could
/// then join the run with the token, or pose as the learner with its key.
/// A warning, not a refusal: inside a container "every user" is the
/// container's, and Kubernetes mounts Secrets 0644 unless its
/// `defaultMode` says otherwise. Said once per field and process (local
/// actors read the same files as their learner).
fn warn_if_others_can_read(field: &'static str, path: &str) {
    static SAID: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());
    let Some(mode) = others_can_read(std::path::Path::new(path)) else {
        return;
    };
    let mut said = SAID
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !said.contains(&field) {
        said.push(field);
        tracing::warn!(
            field,
            path,
            mode = %format!("{mode:03o}"),
            "this secret's file is readable by every user of this machine: `chmod 600` it (640 to share it with a group)"
        );
    }
}

/// The permission bits of the file at `path` where "others" may read it
/// (links followed: a Kubernetes Secret's files are links).
#[cfg(unix)]
fn others_can_read(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o004 != 0).then_some(mode)
}

/// Other systems' permissions are not modes: nothing to say there.
#[cfg(not(unix))]
fn others_can_read(_path: &std::path::Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error `read_tls` refuses `config` with.
    fn tls_refusal(config: &TlsConfig) -> String {
        read_tls(config, TlsRole::Learner)
            .err()
            .unwrap()
            .to_string()
    }

    /// A secret's file readable by others is noticed, whatever else its
    /// mode grants; one kept to its owner or group is not.
    #[cfg(unix)]
    #[test]
    fn a_secret_readable_by_every_user_is_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("flgfn-auth-mode-{}", std::process::id()));
        std::fs::write(&path, "0123456789abcdef").unwrap();
        for (mode, noticed) in [
            (0o644, Some(0o644)),
            (0o604, Some(0o604)),
            (0o444, Some(0o444)),
            (0o600, None),
            (0o640, None),
            (0o400, None),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(others_can_read(&path), noticed, "mode {mode:o}");
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(others_can_read(&path), None, "no file, nothing to say");
    }

    /// An X.509 version 1 certificate (self-signed by `openssl x509 -req`
    /// without `-extfile`, valid to 2126) and its key, made for this test
    /// alone (it guards nothing).
    const VERSION_1_CERT: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBJDCBywIUYzy0dC+Nwjr+rMhmvNGCr5ks8WowCgYIKoZIzj0EAwIwFDESMBAG\n\
A1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwNTA2NDgwN1oYDzIxMjYxMTExMDY0ODA3\n\
WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC\n\
AAQb80nr3bPs04li6BkIZ4Zk8nVyN+2HH4NaO2RgLBoUvyPXB2Z+x3HeMpRekopg\n\
FN/dqdGiBG3lJhDrLJwtQlkCMAoGCCqGSM49BAMCA0gAMEUCIGC3zBVzt3qf1QIV\n\
PSJ2BGBb47U1a32aroghglnoFfbfAiEA7WtE+IlaJRqpDOBIy1jySfXcIJEFE9ye\n\
u6DOd5BEyXU=\n\
-----END CERTIFICATE-----\n";
    const VERSION_1_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg2d4dvfJFpAHP+xHc\n\
XVmIw8nAlOuivdP6Ts249XncoDGhRANCAAQb80nr3bPs04li6BkIZ4Zk8nVyN+2H\n\
H4NaO2RgLBoUvyPXB2Z+x3HeMpRekopgFN/dqdGiBG3lJhDrLJwtQlkC\n\
-----END PRIVATE KEY-----\n";

    #[test]
    fn a_version_1_certificate_is_named_as_such() {
        let dir = std::env::temp_dir().join(format!("flgfn-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("v1.pem"), dir.join("v1.key"));
        std::fs::write(&cert, VERSION_1_CERT).unwrap();
        std::fs::write(&key, VERSION_1_KEY).unwrap();
        let config = TlsConfig {
            cert_file: cert.display().to_string(),
            key_file: key.display().to_string(),
            ..TlsConfig::default()
        };
        let error = tls_refusal(&config);
        assert!(
            error.contains("tls.cert_file")
                && error.contains("X.509 version 1")
                && !error.contains("peer"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A line of a .env file, or a quoted token, is refused, not taken
    /// whole; the token says where it was read, the variable over the file.
    #[test]
    fn a_token_copied_with_its_wrapping_is_refused_and_sources_are_named() {
        for (wrapped, why) in [
            (
                "FLGFN_TOKEN=0123456789abcdef0123",
                "starts with `FLGFN_TOKEN=`",
            ),
            ("\"0123456789abcdef0123\"", "quote"),
            ("'0123456789abcdef0123'", "quote"),
        ] {
            let error = Token::new(wrapped, "auth.token_file")
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("auth.token_file") && error.contains(why),
                "{error}"
            );
        }
        let config = AuthConfig {
            token_file: "/run/secrets/token".to_owned(),
            ..AuthConfig::default()
        };
        let token = token_from(Some("0123456789abcdef0123".into()), &config)
            .unwrap()
            .unwrap();
        assert_eq!(
            token.from(),
            "FLGFN_TOKEN, which overrides auth.token_file (/run/secrets/token)"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_token_variable_that_is_not_utf8_is_an_error_not_unset() {
        use std::os::unix::ffi::OsStringExt;
        let latin1 = std::ffi::OsString::from_vec(b"\xffabcdefghijklmnopqrstuvwxyz".to_vec());
        let error = token_from(Some(latin1), &AuthConfig::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains(TOKEN_ENV), "{error}");
        assert!(token_from(None, &AuthConfig::default()).unwrap().is_none());
        assert!(
            token_from(Some("  ".into()), &AuthConfig::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_tls_file_without_its_pem_block_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("flgfn-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let der = dir.join("ca.der");
        std::fs::write(&der, [0x30, 0x82, 0x01, 0x0a]).unwrap();
        let config = TlsConfig {
            ca_file: der.display().to_string(),
            ..TlsConfig::default()
        };
        let error = tls_refusal(&config);
        assert!(
            error.contains("tls.ca_file") && error.contains("no PEM CERTIFICATE"),
            "{error}"
        );
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        // A PEM block whose body is no certificate: refused by name, not
        // left to fail every handshake later.
        let config = TlsConfig {
            ca_file: pem.display().to_string(),
            ..TlsConfig::default()
        };
        let error = tls_refusal(&config);
        assert!(
            error.contains("tls.ca_file") && error.contains("no certificate usable as a CA"),
            "{error}"
        );
        // Look-alikes: a certificate request given as the certificate or
        // the CA, and an encrypted key (bodies never read: refused by
        // their labels).
        let csr = dir.join("learner.csr");
        std::fs::write(
            &csr,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .unwrap();
        let encrypted = dir.join("learner.key");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let path = |p: &std::path::Path| p.display().to_string();
        for (config, field, says) in [
            (
                TlsConfig {
                    cert_file: path(&csr),
                    key_file: path(&encrypted),
                    ..TlsConfig::default()
                },
                "tls.cert_file",
                "a certificate request, not a certificate",
            ),
            (
                TlsConfig {
                    ca_file: path(&csr),
                    ..TlsConfig::default()
                },
                "tls.ca_file",
                "a certificate request, not a certificate",
            ),
            (
                TlsConfig {
                    cert_file: path(&pem),
                    key_file: path(&encrypted),
                    ..TlsConfig::default()
                },
                "tls.key_file",
                "an encrypted private key",
            ),
        ] {
            let error = tls_refusal(&config);
            assert!(error.contains(field) && error.contains(says), "{error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_compare_whole_and_never_print() {
        let token = Token::new("0123456789abcdef-secret", "t").unwrap();
        assert!(token.matches(b"Bearer 0123456789abcdef-secret"));
        assert!(!token.matches(b"Bearer 0123456789abcdef-secreT"));
        assert!(!token.matches(b"Bearer 0123456789abcdef"));
        assert!(!token.matches(b"0123456789abcdef-secret"));
        assert!(!format!("{token:?}").contains("secret"));
        assert!(
            Token::new("short", "t")
                .unwrap_err()
                .to_string()
                .contains("16")
        );
        assert!(Token::new("has a space in it ok", "t").is_err());
    }

    /// A secret put in a path's key stays out of the error that the path
    /// cannot be read; a path is shown as it is.
    #[test]
    fn a_secret_in_a_paths_key_is_not_echoed() {
        let token = "0123456789abcdef0123456789abcdef";
        let pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n";
        let base64 = "q0/Zr+9xYwTq1kB2mV7cLw==";
        // The error of a token file that cannot be read.
        let unread = |token_file: &str| {
            let config = AuthConfig {
                token_file: token_file.to_owned(),
                ..AuthConfig::default()
            };
            token_from(None, &config).unwrap_err().to_string()
        };
        let echoes = |error: &str| {
            error.contains("0123456789abcdef")
                || error.contains("MIGHAgEAMBMG")
                || error.contains("q0/Zr")
        };
        for secret in [token, pem, base64] {
            let error = unread(secret);
            assert!(
                error.contains("auth.token_file") && error.contains("not shown"),
                "{error}"
            );
            assert!(!echoes(&error), "{error}");
            // (No certificate: the key is read, and cannot be.)
            let error = tls_refusal(&TlsConfig {
                key_file: secret.to_owned(),
                ..TlsConfig::default()
            });
            assert!(
                error.contains("tls.key_file") && error.contains("not shown"),
                "{error}"
            );
            assert!(!echoes(&error), "{error}");
        }
        let error = tls_refusal(&TlsConfig {
            cert_file: "/nonexistent/cert.pem".to_owned(),
            ..TlsConfig::default()
        });
        assert!(
            error.contains("tls.cert_file") && error.contains("cannot read /nonexistent/cert.pem:"),
            "{error}"
        );
        for path in [
            "/run/secrets/flgfn-token",
            "token",
            "./token.txt",
            "/home/u/c++/certs/ca.pem",
            "flgfn-learner-token",
            // A generated name in a folder that exists.
            "/tmp/0123456789abcdef0123",
        ] {
            let error = unread(path);
            assert!(error.contains(&format!("cannot read {path}:")), "{error}");
        }
    }

    #[test]
    fn a_token_file_is_read_and_trimmed() {
        let path = std::env::temp_dir().join(format!("flgfn-token-{}", std::process::id()));
        std::fs::write(&path, "  abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let config = AuthConfig {
            token_file: path.display().to_string(),
            ..AuthConfig::default()
        };
        // FLGFN_TOKEN unset (whatever this process's environment holds).
        let token = token_from(None, &config).unwrap().unwrap();
        assert!(token.matches(b"Bearer abcdefghijklmnopqrstuvwxyz"));
        std::fs::remove_file(&path).unwrap();
        let error = token_from(None, &config).unwrap_err().to_string();
        assert!(error.contains("auth.token_file"), "{error}");
        assert!(token_from(None, &AuthConfig::default()).unwrap().is_none());
    }
}
