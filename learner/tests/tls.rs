//! TLS and mutual TLS with certificates made in the test: an `https://`
//! actor trains a TLS learner; plain text to it fails cleanly; with client
//! certificates required, an actor without one is turned away and one with
//! a certificate from the CA trains.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use flgfn_actor::{ActorError, ActorOptions};
use flgfn_common::config::Config;
use flgfn_learner::RunOptions;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::net::TcpListener;
use tonic_health::pb::health_check_response::ServingStatus;

/// PEM files in `dir`: a CA, a learner certificate for `localhost` and a
/// client certificate, each signed by the CA and made for its purpose
/// (extendedKeyUsage serverAuth, clientAuth), as the README's recipe.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    /// The learner's, out of date since 2001.
    expired_server: (PathBuf, PathBuf),
}

fn make_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = |name: &str, host: &str, purpose: ExtendedKeyUsagePurpose, expired: bool| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        params.extended_key_usages = vec![purpose];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (
            write(&format!("{name}.pem"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let (serving, client) = (
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let server = leaf("learner", "localhost", serving.clone(), false);
    let client = leaf("actor", "actor-1", client, false);
    let expired_server = leaf("learner-expired", "localhost", serving, true);
    Pki {
        ca: write("ca.pem", ca.pem()),
        server,
        client,
        expired_server,
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

async fn start(
    config: &Config,
) -> (
    u16,
    tokio::task::JoinHandle<Result<flgfn_learner::TrainingOutcome, flgfn_learner::LearnerError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        RunOptions::default(),
        std::future::pending::<()>(),
    ));
    (port, learner)
}

fn actor_config(base: &Config, url: String, pki: &Pki, client_certificate: bool) -> Config {
    let mut config = base.clone();
    config.actor.learner = url;
    config.actor.reconnect_attempts = 2;
    config.actor.reconnect_initial_s = 0.05;
    config.tls = Default::default();
    config.tls.ca_file = path(&pki.ca);
    config.tls.domain = "localhost".to_owned();
    if client_certificate {
        config.tls.cert_file = path(&pki.client.0);
        config.tls.key_file = path(&pki.client.1);
    }
    config
}

/// The error an actor with `config` stops with, by itself within
/// `seconds` (else fails, saying `why` it should have).
async fn actor_error(config: Config, name: &str, seconds: u64, why: &str) -> ActorError {
    tokio::time::timeout(
        Duration::from_secs(seconds),
        flgfn_actor::run(config, options(name), std::future::pending()),
    )
    .await
    .expect(why)
    .unwrap_err()
}

/// The error of an actor with `config` whose certificate check fails: it
/// must end at once, as fatal.
async fn refused_certificate(config: Config) -> String {
    let error = actor_error(
        config,
        "refused",
        20,
        "a refused certificate ends the actor, with no retry",
    )
    .await;
    assert!(matches!(error, ActorError::Fatal(_)), "{error:?}");
    error.to_string()
}

/// The error of an actor whose TLS files are refused as configuration,
/// before any connection (else fails, saying `why` it should have been).
async fn configuration_refused(config: Config, name: &str, why: &str) -> String {
    let error = actor_error(config, name, 20, why).await;
    assert!(matches!(error, ActorError::Config(_)), "{error:?}");
    error.to_string()
}

fn options(name: &str) -> ActorOptions {
    ActorOptions {
        name: name.to_owned(),
        seed_offset: None,
    }
}

/// Two set-up mistakes end the actor at once, saying what they are: an
/// https:// address of a plain-text learner, and a learner whose
/// certificate is itself a CA's (`openssl req -x509` makes such by
/// default), given to the actor as its CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_set_up_mistakes_are_final_and_named() {
    let dir = std::env::temp_dir().join(format!("flgfn-tls-mistakes-{}", std::process::id()));
    let pki = make_pki(&dir);
    let plain_config = support::tiny_config();
    let (port, plain_learner) = start(&plain_config).await;
    let mut https_to_plain = actor_config(
        &plain_config,
        format!("https://127.0.0.1:{port}"),
        &pki,
        false,
    );
    https_to_plain.actor.reconnect_attempts = 0;
    let probe = https_to_plain.tls.clone();
    let error = refused_certificate(https_to_plain).await;
    assert!(
        error.contains("does not speak TLS") && error.contains("http://"),
        "{error}"
    );
    let https = format!("https://127.0.0.1:{port}");
    let error = flgfn_actor::health::check(&https, "", &probe)
        .await
        .unwrap_err();
    let hint = flgfn_actor::health::hint(&error, &https, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert!(hint.contains("does not speak TLS"), "{error}: {hint}");
    plain_learner.abort();

    // One certificate as both the learner's and the actors' CA.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let certificate = params.self_signed(&key).unwrap();
    let cert_file = dir.join("self-signed-ca.pem");
    let key_file = dir.join("self-signed-ca.key");
    std::fs::write(&cert_file, certificate.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let mut config = support::tiny_config();
    config.tls.cert_file = path(&cert_file);
    config.tls.key_file = path(&key_file);
    let (port, learner) = start(&config).await;
    let mut actor = actor_config(&config, format!("https://127.0.0.1:{port}"), &pki, false);
    actor.tls.ca_file = path(&cert_file);
    actor.actor.reconnect_attempts = 0;
    let error = refused_certificate(actor).await;
    assert!(error.contains("is a CA certificate"), "{error}");
    learner.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner whose certificate is out of date (expired, or this clock is
/// off, as at boot before time sync) may be given a new one, or the clock
/// set: the actor retries, saying why, instead of stopping for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_learner_certificate_is_retried_naming_it() {
    let dir = std::env::temp_dir().join(format!("flgfn-tls-expired-{}", std::process::id()));
    let pki = make_pki(&dir);
    let mut config = support::tiny_config();
    config.tls.cert_file = path(&pki.expired_server.0);
    config.tls.key_file = path(&pki.expired_server.1);
    let (port, learner) = start(&config).await;
    let actor = actor_config(&config, format!("https://127.0.0.1:{port}"), &pki, false);
    let error = actor_error(
        actor,
        "patient",
        30,
        "the actor gives up after its attempts",
    )
    .await;
    assert!(matches!(error, ActorError::GaveUp { .. }), "{error:?}");
    let error = error.to_string();
    assert!(error.contains("out of date"), "{error}");
    // The last error, after giving up, does not say it is retrying.
    assert!(!error.contains("retrying"), "{error}");
    learner.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_actor_trains_a_tls_learner_and_plain_text_fails_cleanly() {
    let dir = std::env::temp_dir().join(format!("flgfn-tls-{}", std::process::id()));
    let pki = make_pki(&dir);
    let mut config = support::tiny_config();
    config.learner.max_steps = 20;
    config.tls.cert_file = path(&pki.server.0);
    config.tls.key_file = path(&pki.server.1);
    let (port, learner) = start(&config).await;

    // The health probe speaks TLS to an https:// address with the CA; in
    // plain text, or without the CA, it gets no answer.
    let https = format!("https://127.0.0.1:{port}");
    let probe = actor_config(&config, https.clone(), &pki, false).tls;
    assert_eq!(
        support::health(&https, &probe).await.unwrap(),
        ServingStatus::Serving
    );
    // An http:// address with TLS files is refused, naming the fix.
    let plain_url = format!("http://127.0.0.1:{port}");
    let error = flgfn_actor::health::check(&plain_url, "", &probe)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("--address") && error.contains(&https),
        "{error}"
    );
    // Plain text without TLS files reaches the port and gets no answer;
    // flgfn-health's hint names TLS.
    let error = flgfn_actor::health::check(&plain_url, "", &Default::default())
        .await
        .unwrap_err();
    let hint = flgfn_actor::health::hint(&error, &plain_url, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    // (Whether the TLS server's alert arrived as a frame HTTP/2 refuses,
    // or the connection closed first, it is asked as the actor asks it.)
    assert_eq!(
        hint, "the learner serves TLS: use https:// and --ca-file",
        "{error}"
    );
    let error = flgfn_actor::health::check(&https, "", &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("tls.ca_file"), "{error}");
    // Another scheme is refused, not probed as plain text.
    let error =
        flgfn_actor::health::check(&format!("ftp://127.0.0.1:{port}"), "", &Default::default())
            .await
            .unwrap_err()
            .to_string();
    assert!(error.contains("--address"), "{error}");
    // A bare HOST:PORT with the CA is refused, not probed in plain text.
    let error = flgfn_actor::health::check(&format!("127.0.0.1:{port}"), "", &probe)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("use https://127.0.0.1:{port}")),
        "{error}"
    );

    // An http:// URL with [tls] files is refused before anything is sent
    // (the token would travel in clear).
    let plain = actor_config(&config, format!("http://127.0.0.1:{port}"), &pki, false);
    let error = flgfn_actor::run(plain.clone(), options("plain"), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("actor.learner") && error.contains("https://"),
        "{error}"
    );
    // Plain text to a TLS port, without TLS files (and with no limit on
    // attempts): the actor finds the learner's TLS and stops at once,
    // naming the fix; the learner carries on.
    let mut plain = plain;
    plain.tls = Default::default();
    plain.actor.reconnect_attempts = 0;
    let error = actor_error(plain, "plain", 30, "the actor stops, finding TLS").await;
    assert!(matches!(error, ActorError::Fatal(_)), "{error:?}");
    assert!(
        error.to_string().contains(&format!(
            "the learner at http://127.0.0.1:{port} serves TLS: give actor.learner as https://"
        )),
        "{error}"
    );

    // A certificate the actor does not accept is final, not retried for
    // ever (0 attempts: no limit), and names what to fix: the CA...
    let other_pki = make_pki(&dir.join("other"));
    let mut strange_ca = actor_config(&config, https.clone(), &other_pki, false);
    strange_ca.actor.reconnect_attempts = 0;
    let error = refused_certificate(strange_ca).await;
    assert!(error.contains("tls.ca_file"), "{error}");
    // ...or the name.
    let mut wrong_name = actor_config(&config, https.clone(), &pki, false);
    wrong_name.actor.reconnect_attempts = 0;
    wrong_name.tls.domain = "elsewhere".to_owned();
    let error = refused_certificate(wrong_name).await;
    assert!(error.contains("tls.domain"), "{error}");

    let secure = actor_config(&config, format!("https://127.0.0.1:{port}"), &pki, false);
    let actor = tokio::spawn(flgfn_actor::run(
        secure,
        options("secure"),
        std::future::pending(),
    ));
    let outcome = support::finished_learner(learner).await;
    assert_eq!(outcome.steps, 20);
    let report = support::finished_actor(actor).await;
    assert!(report.chunks_sent > 0);
    // The learner counted the plain-text clients and the failed
    // handshakes (an unknown CA, a wrong name): each at least once.
    let rejections = &outcome.final_report.rejections;
    for reason in ["plain_text_at_tls", "tls_handshake_failed"] {
        assert!(
            rejections.get(reason) >= Some(&1),
            "{reason}: {rejections:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_actors_with_a_certificate_from_the_ca() {
    let dir = std::env::temp_dir().join(format!("flgfn-mtls-{}", std::process::id()));
    let pki = make_pki(&dir);
    let mut config = support::tiny_config();
    config.learner.max_steps = 20;
    config.tls.cert_file = path(&pki.server.0);
    config.tls.key_file = path(&pki.server.1);
    config.tls.ca_file = path(&pki.ca);
    let (port, learner) = start(&config).await;
    let url = format!("https://127.0.0.1:{port}");

    // The health probe needs a client certificate too.
    let member_tls = actor_config(&config, url.clone(), &pki, true).tls;
    assert_eq!(
        support::health(&url, &member_tls).await.unwrap(),
        ServingStatus::Serving
    );
    let anonymous_tls = actor_config(&config, url.clone(), &pki, false).tls;
    let error = flgfn_actor::health::check(&url, "", &anonymous_tls)
        .await
        .unwrap_err();
    let hint = flgfn_actor::health::hint(&error, &url, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert!(hint.contains("--cert-file"), "{error}: {hint}");

    // Turned away for good, with what to fix (0 attempts: no limit).
    let mut anonymous = actor_config(&config, url.clone(), &pki, false);
    anonymous.actor.reconnect_attempts = 0;
    let error = refused_certificate(anonymous).await;
    assert!(error.contains("tls.cert_file"), "{error}");

    // A client key that is not its certificate's: refused before any
    // connection, with both files named (retrying cannot mend a file).
    let mut mismatched = actor_config(&config, url.clone(), &pki, true);
    mismatched.tls.key_file = path(&pki.server.1);
    mismatched.actor.reconnect_attempts = 0;
    let error = configuration_refused(
        mismatched,
        "mismatched",
        "a key of another pair ends the actor at once",
    )
    .await;
    assert!(error.contains("tls.key_file"), "{error}");
    assert!(error.contains(&path(&pki.client.0)), "{error}");
    assert!(error.contains(&path(&pki.server.1)), "{error}");

    let member = actor_config(&config, url, &pki, true);
    let actor = tokio::spawn(flgfn_actor::run(
        member,
        options("member"),
        std::future::pending(),
    ));
    let outcome = support::finished_learner(learner).await;
    assert_eq!(outcome.steps, 20);
    support::finished_actor(actor).await;
    // The anonymous probe and actor failed their handshakes; the
    // members' connections count nothing.
    let rejections = &outcome.final_report.rejections;
    assert!(
        rejections.get("tls_handshake_failed") >= Some(&2),
        "{rejections:?}"
    );
    assert!(
        !rejections.contains_key("plain_text_at_tls"),
        "{rejections:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn half_configured_tls_is_refused_with_the_field_named() {
    let dir = std::env::temp_dir().join(format!("flgfn-badkey-{}", std::process::id()));
    let pki = make_pki(&dir);
    // Each half alone, and client certificates without TLS: never plain
    // text where TLS was asked for.
    let halves = [
        (
            Some(&pki.server.0),
            None,
            None,
            "tls.key_file",
            "without its key",
        ),
        (
            None,
            Some(&pki.server.1),
            None,
            "tls.cert_file",
            "without its certificate",
        ),
        (
            None,
            None,
            Some(&pki.ca),
            "tls.ca_file",
            "need the learner to serve TLS",
        ),
    ];
    for (cert, key, ca, field, why) in halves {
        let mut config = support::tiny_config();
        config.tls.cert_file = cert.map(|p| path(p)).unwrap_or_default();
        config.tls.key_file = key.map(|p| path(p)).unwrap_or_default();
        config.tls.ca_file = ca.map(|p| path(p)).unwrap_or_default();
        let error = support::learner_refusal(config, "127.0.0.1:0").await;
        assert!(error.contains(field) && error.contains(why), "{error}");
    }

    // A key that is PEM but not a key: the error says more than tonic's
    // own "transport error".
    let bad_key = dir.join("bad.key");
    std::fs::write(
        &bad_key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let mut config = support::tiny_config();
    config.tls.cert_file = path(&pki.server.0);
    config.tls.key_file = path(&bad_key);
    let error = support::learner_refusal(config, "127.0.0.1:0").await;
    assert!(error.contains("tls.key_file"), "{error}");
    assert!(error.contains("private key"), "{error}");

    // A key that is not the certificate's.
    let mut config = support::tiny_config();
    config.tls.cert_file = path(&pki.server.0);
    config.tls.key_file = path(&pki.client.1);
    let error = support::learner_refusal(config, "127.0.0.1:0").await;
    assert!(error.contains("tls.key_file"), "{error}");
    assert!(error.contains("does not match"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One role's certificate given to the other is refused where the
/// configuration is read, by its purpose: an actor's client certificate
/// to the learner (which would start, serve it, and see every actor's
/// handshake fail), and the learner's to an actor for mutual TLS.
#[tokio::test]
async fn each_role_refuses_a_certificate_made_for_the_other() {
    let dir = std::env::temp_dir().join(format!("flgfn-purpose-{}", std::process::id()));
    let pki = make_pki(&dir);
    let mut config = support::tiny_config();
    config.tls.cert_file = path(&pki.client.0);
    config.tls.key_file = path(&pki.client.1);
    config.tls.ca_file = path(&pki.ca);
    let error = support::learner_refusal(config.clone(), "127.0.0.1:0").await;
    assert!(error.contains("tls.cert_file"), "{error}");
    assert!(error.contains(&path(&pki.client.0)), "{error}");
    assert!(
        error.contains("lists clientAuth, not serverAuth"),
        "{error}"
    );

    let mut learners = actor_config(&config, "https://127.0.0.1:1".to_owned(), &pki, true);
    learners.tls.cert_file = path(&pki.server.0);
    learners.tls.key_file = path(&pki.server.1);
    let error = configuration_refused(
        learners,
        "with-the-learners",
        "a certificate for the other role ends the actor at once",
    )
    .await;
    assert!(error.contains("tls.cert_file"), "{error}");
    assert!(
        error.contains("lists serverAuth, not clientAuth"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner whose host accepts connections but never answers (a frozen
/// process; the kernel still completes TCP) holds neither the TLS
/// handshake nor the actor forever: each attempt ends after the handshake
/// timeout, and the actor gives up after its attempts. A closed port says
/// why it failed, not only "transport error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_does_not_hang_on_a_learner_that_accepts_and_never_answers() {
    let dir = std::env::temp_dir().join(format!("flgfn-frozen-{}", std::process::id()));
    let pki = make_pki(&dir);
    let frozen = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = frozen.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = frozen.accept().await {
            sockets.push(socket);
        }
    });
    let mut config = actor_config(
        &support::tiny_config(),
        format!("https://127.0.0.1:{port}"),
        &pki,
        false,
    );
    config.actor.reconnect_attempts = 1;
    let started = std::time::Instant::now();
    let error = actor_error(config.clone(), "frozen", 40, "the actor gives up by itself").await;
    let ActorError::GaveUp { last, .. } = &error else {
        panic!("{error:?}")
    };
    assert!(last.contains("no answer"), "{last}");
    assert!(started.elapsed() >= Duration::from_secs(5), "{error:?}");
    held.abort();

    // Nothing listens: the reason is in the message.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    config.actor.learner = format!("http://127.0.0.1:{port}");
    config.tls = Default::default();
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        flgfn_actor::run(config, options("closed"), std::future::pending()),
    )
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(error.to_lowercase().contains("refused"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}
