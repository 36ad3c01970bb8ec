//! Checks made before the learner takes actors: that the run fits its
//! limits (the weights in one message, an evaluation in memory, a
//! trajectory in a session), that the learner is not exposed without a
//! token, and that its local actors fit its session and connection
//! limits. Settings allowed but risky (no token where allowed, a token
//! without TLS, a lag bound or evaluation size that would mislead) are
//! warned about.

use std::sync::Arc;

use flgfn_common::auth;
use flgfn_common::config::{Config, ConfigError};
use flgfn_common::env::Environment;
use tracing::warn;

use crate::error::LearnerError;
use crate::evaluator;

/// More local actors than the learner serves at once are refused, naming
/// `launch.actors`: each takes a process, and those past the limit would
/// be refused and retry for ever.
fn check_local_actors_fit(
    config: &Config,
    local_actors: Option<usize>,
) -> Result<(), LearnerError> {
    let Some(count) = local_actors else {
        return Ok(());
    };
    for (limit, value) in [
        ("learner.max_sessions", config.learner.max_sessions),
        ("learner.max_connections", config.learner.max_connections),
    ] {
        if count > value {
            return Err(ConfigError::invalid_pair(
                "launch.actors",
                limit,
                format!(
                    "{count} local actors are more than {limit} ({value}), which the learner serves at once"
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// A learner listening beyond loopback with no token is refused (anyone
/// who reaches the port could train the model) unless
/// `auth.allow_unauthenticated`, and warned about if so; one with a token
/// but no TLS is warned about (the token travels in clear). (An IPv4
/// loopback written as IPv6, [::ffff:127.0.0.1], is loopback too, as the
/// actor reckons it.)
pub(crate) fn check_exposure(
    config: &Config,
    has_token: bool,
    local_address: Option<std::net::SocketAddr>,
) -> Result<(), LearnerError> {
    let Some(address) = local_address.filter(|a| !a.ip().to_canonical().is_loopback()) else {
        return Ok(());
    };
    if !has_token && !config.auth.allow_unauthenticated {
        return Err(ConfigError::invalid(
            "auth.token_file",
            format!(
                "the learner listens on {address}, beyond loopback, with no token: anyone who reaches the port could train the model. Set auth.token_file or {}, or auth.allow_unauthenticated = true",
                auth::TOKEN_ENV
            ),
        )
        .into());
    }
    if !has_token {
        warn!(
            %address,
            "no token beyond loopback (auth.allow_unauthenticated): anyone who reaches the port can train the model"
        );
    }
    if has_token && config.tls.cert_file.is_empty() {
        warn!(
            %address,
            "plain text beyond loopback: actors' token and the weights travel in clear; fine on a private network, elsewhere set tls.cert_file and tls.key_file"
        );
    }
    Ok(())
}

/// The exposure check of a start (`check_exposure`) for `--print-config`, which binds nothing: on the
/// first address `learner.listen` resolves to here (a start binds the
/// first that it can: that one, unless it is taken). One that does not
/// resolve here is left to the start, which may run on another host.
pub fn check_listen_exposure(config: &Config, has_token: bool) -> Result<(), LearnerError> {
    use std::net::ToSocketAddrs;
    let first = config
        .learner
        .listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next());
    match first {
        Some(address) => check_exposure(config, has_token, Some(address)),
        None => Ok(()),
    }
}

/// The checks of a start that need neither a listener nor a checkpoint,
/// with `local_actors` local actors if any; the task they build, for the
/// start to go on with. `--print-config` makes them too, so that a
/// configuration it passes is one a start takes (the Slurm script reads
/// the job's configuration so before it starts anything).
pub fn check_startup(
    config: &Config,
    local_actors: Option<usize>,
) -> Result<Arc<dyn Environment>, LearnerError> {
    config.validate()?;
    check_local_actors_fit(config, local_actors)?;
    let env = flgfn_common::tasks::build(&config.task)?;
    check_run_fits(config, env.as_ref())?;
    if let Some(count) = local_actors {
        check_local_actor_chunks(config, env.as_ref(), count)?;
    }
    Ok(env)
}

/// Local actors whose chunks this learner would refuse are found out
/// before anything starts, naming actor.envs, rather than each refused at
/// its handshake once started.
fn check_local_actor_chunks(
    config: &Config,
    env: &dyn Environment,
    count: usize,
) -> Result<(), LearnerError> {
    let envs = config.envs_for(env) as u64;
    crate::service::ChunkLimits::of(&config.learner)
        .check(env, envs, "actor.envs")
        .map(drop)
        .map_err(|refusal| {
            LearnerError::LocalActors(std::io::Error::other(format!(
                "the {count} local actors' chunks would be refused: {refusal}"
            )))
        })
}

/// What this task and configuration need of the learner's limits, checked
/// before the model is made: the weights fit in one message (a network
/// larger would start, then fail at every actor's first grant), an
/// evaluation's samples fit in memory, and a session can hold one
/// trajectory. Settings that would make lag or quality figures mislead
/// are warned about.
fn check_run_fits(config: &Config, env: &dyn Environment) -> Result<(), LearnerError> {
    config.weights_fit(
        env,
        config.learner.max_message_bytes,
        "learner.max_message_bytes",
    )?;
    let eval_bytes = evaluator::held_bytes(env, config.learner.eval_samples);
    if eval_bytes > evaluator::EVAL_HELD_BYTES {
        return Err(ConfigError::invalid(
            "learner.eval_samples",
            format!(
                "{} samples of this task hold up to {eval_bytes} bytes while an evaluation scores them, more than the {} it may take; lower learner.eval_samples",
                config.learner.eval_samples,
                evaluator::EVAL_HELD_BYTES
            ),
        )
        .into());
    }
    if let Some(warning) = config.learner.lag_bound_warning() {
        warn!("{warning}");
    }
    // The quality thresholds are set against the sampling noise of 4,096
    // samples (paper-notes): fewer make the distances noisier and quality
    // later, more make it earlier. Said, not refused: a quick look wants
    // fewer.
    let calibrated = flgfn_common::config::LearnerConfig::default().eval_samples;
    if config.learner.eval_samples != calibrated && env.reference().is_some() {
        warn!(
            eval_samples = config.learner.eval_samples,
            "learner.eval_samples is not {calibrated}, which the quality thresholds are set for: at_quality and time_to_quality_s are not comparable with runs at {calibrated}"
        );
    }
    let trajectory_bytes =
        flgfn_common::trajectory::ReplayedTrajectory::max_held_bytes(env, env.max_trajectory_len())
            as u64;
    if trajectory_bytes > config.learner.max_session_bytes {
        return Err(ConfigError::invalid(
            "learner.max_session_bytes",
            format!(
                "{} bytes cannot hold even one trajectory of this task ({trajectory_bytes} bytes replayed)",
                config.learner.max_session_bytes
            ),
        )
        .into());
    }
    Ok(())
}
