//! Command-line flags shared by `flgfn-actor` and `flgfn-loadgen`: where
//! the configuration comes from, and the two keys both override.

use std::path::PathBuf;

use flgfn_common::config::{
    CONFIG_VARIABLE, Config, ConfigError, describe_layers, env_overrides, flgfn_variables,
    host_and_port, is_port,
};

/// The configuration file and the flags that override it.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFlags {
    /// TOML configuration; task and model must match the learner's.
    /// `-` reads it from standard input. `FLGFN_<SECTION>__<KEY>` variables
    /// override it, flags override both.
    #[arg(long, value_name = "FILE", env = CONFIG_VARIABLE)]
    pub config: Option<PathBuf>,
    /// Learner endpoint, e.g. http://10.0.0.5:50051, or a bare
    /// HOST:PORT for plain text (https:// is spelt out) (overrides
    /// actor.learner).
    #[arg(long, value_name = "URL")]
    pub learner: Option<String>,
    /// Environments rolled out together, i.e. trajectories per chunk
    /// (overrides actor.envs; 0: as many as make 5,120 transitions, 16 to
    /// 256, within 16 MB replayed and the same file's learner limits).
    #[arg(long, value_name = "N")]
    pub envs: Option<usize>,
}

/// An address as a URL, as `--learner` gives `actor.learner` and
/// `flgfn-health` takes one: a bare HOST:PORT, as the Python actor takes
/// one too, is plain text, http://. TLS is spelt out: with TLS files set,
/// [`crate::client_tls`] refuses the plain-text address, saying to use
/// https://, as for any http:// URL.
pub(crate) fn with_scheme(learner: &str) -> String {
    if learner.contains("://") {
        learner.to_owned()
    } else {
        format!("http://{learner}")
    }
}

/// [`with_scheme`] for an address `flag` gave, refused where it is bare
/// and has no port: as a URL it would be port 80, where no learner
/// listens unless told to, and the actor would retry there for ever.
pub(crate) fn flag_address_with_scheme(address: &str, flag: &str) -> Result<String, ConfigError> {
    let has_port = host_and_port(address).1.is_some_and(is_port);
    if !address.contains("://") && !has_port {
        return Err(ConfigError::invalid(
            flag,
            format!(
                "`{address}` has no port from 1 to 65535: give HOST:PORT (a learner listens on port 50051 unless told otherwise), or a URL (http://{address} for port 80)"
            ),
        ));
    }
    Ok(with_scheme(address))
}

impl ConfigFlags {
    /// The file (or the defaults) with the flags applied, not yet
    /// validated: callers may override more before validating.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load_unvalidated(self.config.as_deref())?;
        if let Some(learner) = &self.learner {
            config.actor.learner = flag_address_with_scheme(learner, "--learner")?;
        }
        if let Some(envs) = self.envs {
            config.actor.envs = envs;
        }
        Ok(config)
    }

    /// The configuration flags given, with the key each sets (for errors
    /// and `--print-config`).
    pub fn flag_keys(&self) -> Vec<(&'static str, &'static str)> {
        [
            ("--learner", "actor.learner", self.learner.is_some()),
            ("--envs", "actor.envs", self.envs.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, key, given)| given.then_some((flag, key)))
        .collect()
    }

    /// [`Config::validate`], naming the flag or variable that set a key
    /// it refuses (`more_flags`: the binary's own, with their keys).
    pub fn validate(
        &self,
        config: &Config,
        more_flags: &[(&'static str, &'static str)],
    ) -> Result<(), ConfigError> {
        let mut flags = self.flag_keys();
        flags.extend_from_slice(more_flags);
        config.validate_layers(&env_overrides(flgfn_variables()?), &flags)
    }

    /// `--print-config`'s output: where the configuration came from, then
    /// the configuration (`more_flags` as for [`ConfigFlags::validate`]).
    pub fn print(
        &self,
        config: &Config,
        more_flags: &[(&'static str, &'static str)],
    ) -> Result<(), ConfigError> {
        let flags: Vec<&str> = self
            .flag_keys()
            .iter()
            .chain(more_flags)
            .map(|&(flag, _)| flag)
            .collect();
        let overrides = env_overrides(flgfn_variables()?);
        // Read as a start reads them: a file that would stop the actor
        // stops this too.
        let token = flgfn_common::auth::load_token(&config.auth)?;
        let tls = crate::client_tls(config)?;
        flgfn_common::out!(
            "{}{}",
            describe_layers(self.config.as_deref(), &overrides, &flags),
            flgfn_common::auth::describe_secrets(token.as_ref(), &config.tls, tls.is_some())
        );
        flgfn_common::out!("{}", config.to_toml());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--learner HOST:PORT` is plain text, as `flgfn-health` takes it; a
    /// URL is kept; with TLS files a bare address is refused by name,
    /// saying to use https://.
    #[test]
    fn a_bare_learner_address_is_plain_text() {
        let mut config = Config::default();
        assert_eq!(with_scheme("10.0.0.5:50051"), "http://10.0.0.5:50051");
        assert_eq!(with_scheme("[::1]:50051"), "http://[::1]:50051");
        assert_eq!(
            with_scheme("https://learner:50051"),
            "https://learner:50051"
        );
        config.actor.learner = with_scheme("learner:50051");
        assert!(config.validate().is_ok());
        // A bare host has no port to reach: refused, with the remedy.
        for bare in [
            "learner",
            "[::1]",
            "10.0.0.5",
            "learner:",
            "user:pw@learner",
            "learner:0",
        ] {
            let refused = flag_address_with_scheme(bare, "--learner")
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("--learner") && refused.contains("HOST:PORT"),
                "{refused}"
            );
        }
        assert_eq!(
            flag_address_with_scheme("http://learner", "--learner").unwrap(),
            "http://learner"
        );
        assert_eq!(
            flag_address_with_scheme("[::1]:50051", "--learner").unwrap(),
            "http://[::1]:50051"
        );
        config.tls.ca_file = "ca.pem".to_owned();
        let refused = crate::client_tls(&config).unwrap_err().to_string();
        assert!(
            refused.contains("actor.learner") && refused.contains("use https://"),
            "{refused}"
        );
    }

    /// A file whose value alone would be refused starts all the same where
    /// a flag replaces it: flags apply before validation.
    #[test]
    fn a_flag_can_correct_what_the_file_got_wrong() {
        let path = std::env::temp_dir().join(format!("flgfn-flag-fix-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[actor]\nlearner = \"ftp://learner:50051\"\nenvs = 8\n",
        )
        .unwrap();
        let flags = |learner: Option<&str>| ConfigFlags {
            config: Some(path.clone()),
            learner: learner.map(str::to_owned),
            envs: Some(3),
        };
        let refused = flags(None).load().unwrap().validate().unwrap_err();
        assert!(refused.to_string().contains("actor.learner"), "{refused}");
        let config = flags(Some("learner:50051")).load().unwrap();
        config.validate().unwrap();
        assert_eq!(config.actor.learner, "http://learner:50051");
        assert_eq!(config.actor.envs, 3);
        std::fs::remove_file(&path).unwrap();
    }
}
