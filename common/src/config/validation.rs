//! What the schema's types cannot say: ranges, units, combinations of
//! keys, and whether the weights fit in one message. Checked after every
//! layer is applied, so that a flag can mend what a file got wrong.

use super::{ActorConfig, Config, ConfigError, LearnerConfig, ObjectiveName, WeightEncoding};
use crate::env::Environment;

impl Config {
    /// Checks every field that has a restricted range. Call again after
    /// applying command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Building the task validates its parameters.
        let env = crate::tasks::build(&self.task)?;
        // TOML integers are signed: a larger value could be given by a
        // flag (--seed, --max-steps) but not written to a file, a
        // checkpoint's configuration, or the local actors' configuration.
        for (field, value) in [
            ("seed", self.seed),
            ("learner.max_steps", self.learner.max_steps),
        ] {
            if value > i64::MAX as u64 {
                return Err(ConfigError::invalid(
                    field,
                    format!(
                        "{value} is above {} (TOML integers are 64-bit signed)",
                        i64::MAX
                    ),
                ));
            }
        }
        if self.model.hidden.is_empty() || self.model.hidden.contains(&0) {
            return Err(ConfigError::invalid(
                "model.hidden",
                "needs at least one layer, each wider than 0",
            ));
        }
        positive_finite("objective.lambda", self.objective.lambda)?;
        positive_finite(
            "objective.log_z_learning_rate",
            self.objective.log_z_learning_rate,
        )?;
        let l = &self.learner;
        positive_finite("learner.learning_rate", l.learning_rate)?;
        unit_interval(
            "learner.final_learning_rate_fraction",
            l.final_learning_rate_fraction,
        )?;
        at_least("learner.batch_transitions", l.batch_transitions, 1)?;
        // The trainer holds a whole batch, replayed (~200 bytes per
        // transition on the small task), before it steps.
        at_most(
            "learner.batch_transitions",
            l.batch_transitions,
            MAX_BATCH_TRANSITIONS,
        )?;
        if l.max_batch_transitions < l.batch_transitions {
            // Either may be the one the user set: name both, and the
            // default, which a user raising batch_transitions alone meets.
            let default = LearnerConfig::default().max_batch_transitions;
            return Err(ConfigError::invalid_pair(
                "learner.max_batch_transitions",
                "learner.batch_transitions",
                format!(
                    "{} is less than learner.batch_transitions ({}): a batch starts at batch_transitions and grows up to max_batch_transitions (by default {default}); raise max_batch_transitions to at least {}, or lower batch_transitions",
                    l.max_batch_transitions, l.batch_transitions, l.batch_transitions,
                ),
            ));
        }
        at_most(
            "learner.max_batch_transitions",
            l.max_batch_transitions,
            MAX_BATCH_TRANSITIONS,
        )?;
        at_least("learner.publish_every", l.publish_every as usize, 1)?;
        at_least("learner.max_policy_lag", l.max_policy_lag as usize, 1)?;
        at_least(
            "learner.max_in_flight_batches",
            l.max_in_flight_batches as usize,
            1,
        )?;
        // The room's ceiling is max_batch_transitions times this: kept far
        // from overflow and from what a channel can be sized to.
        at_most(
            "learner.max_in_flight_batches",
            usize::try_from(l.max_in_flight_batches).unwrap_or(usize::MAX),
            MAX_IN_FLIGHT_BATCHES,
        )?;
        if l.max_in_flight_batches > l.max_policy_lag {
            let default = LearnerConfig::default().max_in_flight_batches;
            return Err(ConfigError::invalid_pair(
                "learner.max_in_flight_batches",
                "learner.max_policy_lag",
                format!(
                    "{} is more than learner.max_policy_lag ({}): data granted would age past the bound before it is trained; set max_in_flight_batches at most max_policy_lag (its default, {default}, needs max_policy_lag >= {default})",
                    l.max_in_flight_batches, l.max_policy_lag,
                ),
            ));
        }
        at_least(
            "learner.weights_refresh_steps",
            l.weights_refresh_steps as usize,
            1,
        )?;
        // Data is sampled with weights up to publish_every steps older than
        // the trainer, and an actor's up to weights_refresh_steps versions
        // older than that: past max_policy_lag every chunk would be dropped
        // before new weights could reach an actor, and training would stall.
        if l.publish_every.saturating_add(l.weights_refresh_steps) > l.max_policy_lag {
            let field = if l.publish_every > l.weights_refresh_steps {
                "learner.publish_every"
            } else {
                "learner.weights_refresh_steps"
            };
            return Err(ConfigError::invalid_pair(
                field,
                "learner.max_policy_lag",
                format!(
                    "learner.publish_every ({}) + learner.weights_refresh_steps ({}) is more than learner.max_policy_lag ({}): every chunk would be too old to train on before new weights reached the actors",
                    l.publish_every, l.weights_refresh_steps, l.max_policy_lag
                ),
            ));
        }
        for (field, threads) in [
            ("learner.threads", l.threads),
            ("learner.async_threads", l.async_threads),
            ("learner.ingest_threads", l.ingest_threads),
        ] {
            at_least(field, threads, 1)?;
            at_most(field, threads, MAX_THREADS)?;
        }
        at_least("learner.eval_samples", l.eval_samples, 1)?;
        // Blank is neither a folder anyone meant nor "" (no checkpoints).
        if !l.checkpoint_dir.is_empty() && l.checkpoint_dir.trim().is_empty() {
            return Err(ConfigError::invalid(
                "learner.checkpoint_dir",
                format!(
                    "{:?} is blank: give a folder, or \"\" for no checkpoints",
                    l.checkpoint_dir
                ),
            ));
        }
        at_most("learner.eval_samples", l.eval_samples, MAX_EVAL_SAMPLES)?;
        at_least("learner.keep_checkpoints", l.keep_checkpoints, 1)?;
        at_least("learner.max_sessions", l.max_sessions, 1)?;
        at_least("learner.max_connections", l.max_connections, 1)?;
        at_most(
            "learner.max_connections",
            l.max_connections,
            MAX_CONNECTIONS,
        )?;
        timer_seconds(
            "learner.idle_connection_s",
            l.idle_connection_s,
            MIN_IDLE_CONNECTION_S,
        )?;
        if !l.checkpoint_every_s.is_finite() || l.checkpoint_every_s < 0.0 {
            return Err(ConfigError::invalid(
                "learner.checkpoint_every_s",
                format!(
                    "must be 0 (off) or a positive number of seconds, got {}",
                    l.checkpoint_every_s
                ),
            ));
        }
        timer_seconds(
            "learner.stall_timeout_s",
            l.stall_timeout_s,
            MIN_STALL_TIMEOUT_S,
        )?;
        timer_seconds("learner.keepalive_s", l.keepalive_s, MIN_KEEPALIVE_S)?;
        if l.stuck_after_s != 0.0 && !(1.0..=MAX_WAIT_S).contains(&l.stuck_after_s) {
            return Err(ConfigError::invalid(
                "learner.stuck_after_s",
                format!(
                    "must be 0 (never) or between 1 and {MAX_WAIT_S} seconds (a day), got {}",
                    l.stuck_after_s
                ),
            ));
        }
        if !matches!(l.unfinished_exit_status, 0 | 3..=125) {
            return Err(ConfigError::invalid(
                "learner.unfinished_exit_status",
                format!(
                    "must be 0 or 3 to 125 (1 and 2 are the learner's errors, 126 and above the shell's), got {}",
                    l.unfinished_exit_status
                ),
            ));
        }
        positive_finite("learner.first_report_s", l.first_report_s)?;
        positive_finite("learner.report_every_s", l.report_every_s)?;
        if l.first_report_s > l.report_every_s {
            let default = LearnerConfig::default();
            return Err(ConfigError::invalid_pair(
                "learner.first_report_s",
                "learner.report_every_s",
                format!(
                    "{} is more than learner.report_every_s ({}): the first report comes no later than the others (by default {} and {}); lower first_report_s or raise report_every_s",
                    l.first_report_s,
                    l.report_every_s,
                    default.first_report_s,
                    default.report_every_s
                ),
            ));
        }
        at_least("learner.max_message_bytes", l.max_message_bytes, 1 << 20)?;
        // gRPC frames a message's length in 32 bits.
        at_most(
            "learner.max_message_bytes",
            l.max_message_bytes,
            u32::MAX as usize,
        )?;
        at_least(
            "learner.max_chunk_trajectories",
            l.max_chunk_trajectories,
            1,
        )?;
        // None would train nothing and wait for ever.
        at_least("launch.actors", self.launch.actors, 1)?;
        check_listen_address(&self.learner.listen)?;
        let a = &self.actor;
        at_least("actor.threads", a.threads, 1)?;
        at_most("actor.threads", a.threads, MAX_THREADS)?;
        // (The handshake declares it in 32 bits.)
        at_most("actor.envs", a.envs, u32::MAX as usize)?;
        unit_interval("actor.epsilon", a.epsilon)?;
        unit_interval("actor.truncate_fraction", a.truncate_fraction)?;
        // Every trajectory cut short: none reaches a terminal state, where
        // the reward (TB, DB, SubTB) or the boundary log F~(x) = 0 (FL-DB,
        // FL-SubTB) ties the flows to the target. A learner that trains on
        // complete ones only (TB, or told to drop prefixes) would wait for
        // data for ever; any other would fit flows consistent with each
        // other and with no target (the last step's policy is never
        // trained), its loss falling all the same.
        if a.truncate_fraction >= 1.0 {
            let why = if self.objective.name == ObjectiveName::Tb {
                "objective.name = \"tb\" trains on complete trajectories only"
            } else if !self.objective.trains_on_truncated() {
                "objective.drop_truncated = true trains on complete trajectories only"
            } else {
                "no trajectory would reach a terminal state, where the reward ties the flows to the target (the forward-looking objectives learn from prefixes, but need some complete trajectories)"
            };
            return Err(ConfigError::invalid(
                "actor.truncate_fraction",
                format!(
                    "1 cuts every trajectory short, and {why}: lower it (the paper truncates up to 0.9)"
                ),
            ));
        }
        at_least("actor.truncate_cap", a.truncate_cap, 1)?;
        learner_url(&a.learner)?;
        timer_seconds(
            "actor.reconnect_initial_s",
            a.reconnect_initial_s,
            MIN_RECONNECT_S,
        )?;
        seconds_up_to_a_day("actor.reconnect_max_s", a.reconnect_max_s)?;
        timer_seconds("actor.keepalive_s", a.keepalive_s, MIN_KEEPALIVE_S)?;
        if a.progress_log_s != 0.0 {
            timer_seconds("actor.progress_log_s", a.progress_log_s, 1.0)?;
        }
        if a.reconnect_max_s < a.reconnect_initial_s {
            let default = ActorConfig::default();
            return Err(ConfigError::invalid_pair(
                "actor.reconnect_max_s",
                "actor.reconnect_initial_s",
                format!(
                    "{} is less than actor.reconnect_initial_s ({}): the pause between attempts doubles from reconnect_initial_s up to reconnect_max_s (by default {} and {}); raise reconnect_max_s or lower reconnect_initial_s",
                    a.reconnect_max_s,
                    a.reconnect_initial_s,
                    default.reconnect_initial_s,
                    default.reconnect_max_s
                ),
            ));
        }
        // Weights travel in one message, which gRPC frames in 32 bits: a
        // network beyond that even as bf16 (the smallest encoding) is
        // refused by every process (one too large to allocate would abort
        // an actor's rollout thread). An actor checks no more: it takes
        // weights up to the learner's limit, in the learner's encoding,
        // whatever its own; the learner checks both of its own
        // (`weights_fit`).
        self.weights_fit_in(
            env.as_ref(),
            WeightEncoding::Bf16,
            u32::MAX as usize,
            "gRPC's 4 GiB",
            "narrow model.hidden",
        )
    }

    /// Whether this network's weights, in `learner.weight_encoding`, fit in
    /// one message of `limit` bytes (`limit_name` says whose limit, in the
    /// error). `env` is this configuration's task, built.
    pub fn weights_fit(
        &self,
        env: &dyn Environment,
        limit: usize,
        limit_name: &str,
    ) -> Result<(), ConfigError> {
        let remedy = match self.learner.weight_encoding {
            WeightEncoding::F32 => {
                "narrow model.hidden, raise learner.max_message_bytes (up to 4 GiB), or set learner.weight_encoding = \"bf16\" (half the bytes)"
            }
            WeightEncoding::Bf16 => {
                "narrow model.hidden, or raise learner.max_message_bytes (up to 4 GiB)"
            }
        };
        self.weights_fit_in(env, self.learner.weight_encoding, limit, limit_name, remedy)
    }

    fn weights_fit_in(
        &self,
        env: &dyn Environment,
        encoding: WeightEncoding,
        limit: usize,
        limit_name: &str,
        remedy: &str,
    ) -> Result<(), ConfigError> {
        let model = crate::policy::ModelSpec::new(env, &self.model);
        let weight_bytes = model.weight_bytes(encoding, &model.weight_metadata(&env.spec()));
        if weight_bytes > limit as u128 {
            // (The limit's name is a key where a setting sets it.)
            return Err(ConfigError::invalid_pair(
                "model.hidden",
                limit_name,
                format!(
                    "a network of {} parameters takes about {weight_bytes} bytes as {} weights, more than one message may carry ({limit_name} = {limit}); {remedy}",
                    model.parameter_count(),
                    encoding.name(),
                ),
            ));
        }
        Ok(())
    }
}

/// Longest wait any setting may ask for: a day. A larger "forever" would
/// overflow the timers built from it.
pub const MAX_WAIT_S: f64 = 86_400.0;

/// Shortest `learner.idle_connection_s`: an actor's connection is idle
/// between its handshake and its session, for a round trip.
pub const MIN_IDLE_CONNECTION_S: f64 = 1.0;

/// Shortest `learner.stall_timeout_s`: below it, every actor would be
/// ended before its first chunk could arrive.
pub const MIN_STALL_TIMEOUT_S: f64 = 0.1;

/// Shortest `actor.reconnect_initial_s`: a shorter first wait retries in
/// a tight loop (the jittered wait rounds to nothing).
pub const MIN_RECONNECT_S: f64 = 0.01;

/// Shortest `actor.keepalive_s` and `learner.keepalive_s`: each side drops
/// a connection whose ping goes unanswered for twice this, so shorter
/// would drop every connection over a link with a longer round trip.
pub const MIN_KEEPALIVE_S: f64 = 1.0;

/// A timer's seconds: at least `min`, at most [`MAX_WAIT_S`] (a day), so
/// that its deadline can always be computed.
fn timer_seconds(field: &str, value: f64, min: f64) -> Result<(), ConfigError> {
    if (min..=MAX_WAIT_S).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be between {min} and {MAX_WAIT_S} seconds (a day), got {value}"),
        ))
    }
}

fn positive_finite(field: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is not a positive number"),
        ))
    }
}

/// An actor wait (`reconnect_*_s`, `keepalive_s`): positive, at most
/// [`MAX_WAIT_S`].
fn seconds_up_to_a_day(field: &str, value: f64) -> Result<(), ConfigError> {
    positive_finite(field, value)?;
    if value > MAX_WAIT_S {
        return Err(ConfigError::invalid(
            field,
            format!("{value} s is more than a day ({MAX_WAIT_S} s)"),
        ));
    }
    Ok(())
}

/// `actor.learner` must be an `http://` or `https://` URL with a host and
/// a port that is one (or none: 80 or 443): a URL that cannot connect
/// would fail every attempt, and with the default unlimited
/// `reconnect_attempts` the actor would retry forever, far from the
/// setting. (A path is ignored, and the actor says so: a shared job file
/// may name an ingress's, and the learner must start whatever it says.)
fn learner_url(url: &str) -> Result<(), ConfigError> {
    let invalid = |why: String| Err(ConfigError::invalid("actor.learner", why));
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return invalid(format!(
            "{url:?} is not an http:// or https:// URL (e.g. http://learner:50051)"
        ));
    };
    let (host, port) = host_and_port(rest.split(['/', '?', '#']).next().unwrap_or(""));
    if host.is_empty() {
        return invalid(format!("{url:?} names no host"));
    }
    if let Some(bad) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return invalid(format!("{url:?} holds {bad:?}, which no URL may"));
    }
    if let Some(port) = port
        && !is_port(port)
    {
        return invalid(format!("{url:?}: {port:?} is no port (1 to 65535)"));
    }
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map(drop)
        .or_else(|error| {
            invalid(format!(
                "{url:?} is no URL an actor can connect to: {error}"
            ))
        })
}

/// An address's host and the port it names, if any: any user and
/// password before the host are left out, and an IPv6 address keeps its
/// colons inside brackets.
pub fn host_and_port(authority: &str) -> (&str, Option<&str>) {
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// Whether `port` is a port a connection can go to (1 to 65535).
pub fn is_port(port: &str) -> bool {
    port.parse::<u16>().is_ok_and(|port| port > 0)
}

fn unit_interval(field: &str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is not in [0, 1]"),
        ))
    }
}

/// Most threads of any kind: more is a typo, and would fail later, far
/// from the setting (a thread that cannot be spawned).
pub const MAX_THREADS: usize = 4096;

/// Most connections a learner may be configured to hold: Linux's default
/// ceiling on a process's open files (`fs.nr_open`).
const MAX_CONNECTIONS: usize = 1 << 20;

/// Most evaluation samples (each evaluation holds them all in memory).
pub const MAX_EVAL_SAMPLES: usize = 1 << 24;

/// Upper bound of `learner.batch_transitions`.
pub const MAX_BATCH_TRANSITIONS: usize = 1 << 20;

/// Upper bound of `learner.max_in_flight_batches`.
pub const MAX_IN_FLIGHT_BATCHES: usize = 1 << 16;

/// `learner.listen` is `host:port` (a name, an IPv4 address or a
/// bracketed IPv6 one, and a port number): caught here, a forgotten host
/// (`50051`) is named as the key instead of failing to bind.
fn check_listen_address(listen: &str) -> Result<(), ConfigError> {
    let invalid = |why: &str| {
        ConfigError::invalid(
            "learner.listen",
            format!("{listen:?} {why}; give host:port, e.g. 127.0.0.1:50051 or 0.0.0.0:50051"),
        )
    };
    let (host, port) = listen
        .rsplit_once(':')
        .filter(|_| !listen.ends_with(']'))
        .ok_or_else(|| invalid("is not host:port"))?;
    if host.is_empty() {
        return Err(invalid("has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(invalid("has an IPv6 address without brackets"));
    }
    port.parse::<u16>()
        .map_err(|_| invalid("has no port number from 0 to 65535 after its last ':'"))?;
    Ok(())
}

fn at_most(field: &str, value: usize, max: usize) -> Result<(), ConfigError> {
    if value <= max {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is more than {max}"),
        ))
    }
}

fn at_least(field: &str, value: usize, min: usize) -> Result<(), ConfigError> {
    if value >= min {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is less than {min}"),
        ))
    }
}
