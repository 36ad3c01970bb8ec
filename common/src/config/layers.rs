//! The layers over the file: `FLGFN_<SECTION>__<KEY>` variables applied
//! to it, misspelt variables warned about (one that is not read would run
//! a container quietly on the defaults), and an error blamed on the layer
//! that set its key.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use super::diagnostics::{holds_secrets, typos_allowed, variables_refusal};
use super::{CONFIG_VARIABLE, Config, ConfigError, STDIN_PATH, name_default_task, schema};

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "FLGFN_";
/// Between the section and the key in such a variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// One configuration key set by an environment variable.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvOverride {
    /// The variable, e.g. `FLGFN_LEARNER__LISTEN`.
    pub variable: String,
    /// The key it sets, e.g. `["learner", "listen"]`.
    pub key: Vec<String>,
    /// Its value: a TOML value when it reads as one (`64`, `true`,
    /// `[256, 256]`, `"text"`), else the text itself as a string
    /// (`0.0.0.0:50051`, `http://learner:50051`).
    pub value: toml::Value,
    /// The variable's text, as given: the value if a string key needs it
    /// (`123456` for a path).
    pub text: String,
}

impl EnvOverride {
    fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let (last, sections) = self.key.split_last().expect("keys are never empty");
        let mut current = table;
        for section in sections {
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = entry.as_table_mut().ok_or_else(|| {
                ConfigError::invalid(
                    &self.key.join("."),
                    format!("set by {}, but `{section}` is not a section", self.variable),
                )
            })?;
        }
        current.insert(last.clone(), self.value.clone());
        Ok(())
    }
}

/// This process's `FLGFN_` variables, name and value. No other variable
/// is read: `std::env::vars()` panics on any variable that is not UTF-8
/// (a file name in a foreign encoding, say), and one the program never
/// reads must not stop it from starting. A configuration key
/// (`FLGFN_SEED`, `FLGFN_<SECTION>__<KEY>`, or one misspelt with a single
/// underscore) or an `FLGFN_` name that is not UTF-8 is an error naming
/// it; another `FLGFN_` variable whose value is not UTF-8 (`FLGFN_CONFIG`,
/// a path) is left out, for its own reader.
pub fn flgfn_variables() -> Result<Vec<(String, String)>, ConfigError> {
    flgfn_variables_of(std::env::vars_os())
}

/// [`flgfn_variables`] of a given environment.
pub(super) fn flgfn_variables_of(
    variables: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut found = Vec::new();
    for (name, value) in variables {
        if !is_flgfn_variable(&name) {
            continue;
        }
        let name = name.into_string().map_err(|name| {
            ConfigError::invalid(&name.to_string_lossy(), "the variable's name is not UTF-8")
        })?;
        match value.into_string() {
            Ok(value) => found.push((name, value)),
            // (A name one underscore away from a key, too: dropped, it
            // would not be warned about.)
            // (Not one named by a key alone, `FLGFN_NAME`: likely another
            // tool's, only warned about.)
            Err(_) if is_configuration_key(&name) || meant_with_section(&name).is_some() => {
                return Err(ConfigError::invalid(
                    &name,
                    "the variable's value is not UTF-8",
                ));
            }
            Err(_) => {}
        }
    }
    Ok(found)
}

/// Whether an `FLGFN_` variable sets a configuration key (see
/// [`env_overrides`]).
fn is_configuration_key(variable: &str) -> bool {
    variable
        .strip_prefix(ENV_PREFIX)
        .is_some_and(|name| name == "SEED" || name.contains(ENV_SEPARATOR))
}

/// Whether a variable's name starts with `FLGFN_`, UTF-8 or not.
pub fn is_flgfn_variable(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes())
}

/// The configuration keys set by `variables` (pass [`flgfn_variables`]):
/// every `FLGFN_<SECTION>__<KEY>` (upper case, `__` between the parts,
/// e.g. `FLGFN_TASK__SET_SIZE`) and `FLGFN_SEED`, in name order. Other
/// `FLGFN_` variables (`FLGFN_TOKEN`, `FLGFN_CONFIG`, `FLGFN_LOG_FORMAT`)
/// are not configuration keys and are left alone.
pub fn env_overrides(variables: impl IntoIterator<Item = (String, String)>) -> Vec<EnvOverride> {
    let mut overrides: Vec<EnvOverride> = variables
        .into_iter()
        .filter_map(|(variable, text)| {
            if !is_configuration_key(&variable) {
                return None;
            }
            let name = variable.strip_prefix(ENV_PREFIX)?;
            let key: Vec<String> = if name == "SEED" {
                vec!["seed".to_owned()]
            } else {
                name.split(ENV_SEPARATOR).map(str::to_lowercase).collect()
            };
            Some(EnvOverride {
                variable,
                key,
                value: typed_value(&text),
                text,
            })
        })
        .collect();
    overrides.sort_by(|a, b| a.variable.cmp(&b.variable));
    overrides
}

/// A value as given: a TOML value where it reads as one (`64`, `true`,
/// `[256, 256]`, `"text"`), else the text itself as a string.
fn typed_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// A setting given as `key=value` (`flgfn-experiment --set`), its key as
/// in a job file (`actor.epsilon`, `learner.learning_rate`, `seed`),
/// its value as a variable's: an override named `--set <key>` in errors.
pub fn setting_override(setting: &str) -> Result<EnvOverride, String> {
    let (key, text) = setting
        .split_once('=')
        .ok_or_else(|| format!("--set {setting}: give KEY=VALUE (actor.epsilon=1.0)"))?;
    let key = key.trim();
    let parts: Vec<String> = key.split('.').map(str::to_owned).collect();
    if parts.iter().any(|part| {
        part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }) {
        return Err(format!(
            "--set {setting}: `{key}` is no key (a section and a key in lower case, joined by a dot: actor.epsilon)"
        ));
    }
    Ok(EnvOverride {
        variable: format!("--set {key}"),
        key: parts,
        value: typed_value(text.trim()),
        text: text.trim().to_owned(),
    })
}

/// Variables that look meant for a configuration key but are not read:
/// `FLGFN_<SECTION>_<KEY>`, a real section and key with one underscore
/// between them (`FLGFN_LEARNER_THREADS`; not `FLGFN_ACTOR_BIN`, which
/// names no key), and `FLGFN_<KEY>` or `FLGFN_<SECTION>` without the
/// rest (`FLGFN_LISTEN`, `FLGFN_TASK`: a container would quietly run on
/// the defaults), each with the variable meant, in name order.
pub fn misspelt_variables(names: impl IntoIterator<Item = String>) -> Vec<(String, String)> {
    let mut misspelt: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|name| {
            let meant = meant_variable(&name)?;
            Some((name, meant))
        })
        .collect();
    misspelt.sort();
    misspelt
}

/// The variable a misspelt one was meant as (`FLGFN_LEARNER__THREADS` for
/// `FLGFN_LEARNER_THREADS`; `FLGFN_LEARNER__THREADS or
/// FLGFN_ACTOR__THREADS` for `FLGFN_THREADS`; see [`misspelt_variables`]).
pub fn meant_variable(name: &str) -> Option<String> {
    meant_with_section(name)
        .or_else(|| meant_without_section(name))
        .or_else(|| meant_by_spelling(name))
}

/// The `FLGFN_` variables the binaries read that are not configuration
/// keys (and `FLGFN_SEED`, which is one).
const VARIABLES_OF_THEIR_OWN: [&str; 10] = [
    crate::auth::TOKEN_ENV,
    CONFIG_VARIABLE,
    "FLGFN_SEED",
    crate::telemetry::LOG_FORMAT_VARIABLE,
    "FLGFN_RESUME_CHANGED",
    "FLGFN_HEALTH_ADDRESS",
    "FLGFN_HEALTH_CA_FILE",
    "FLGFN_HEALTH_CERT_FILE",
    "FLGFN_HEALTH_KEY_FILE",
    "FLGFN_HEALTH_DOMAIN",
];

/// The variable that sets `key` of `section`: `FLGFN_LEARNER__LISTEN`.
fn key_variable(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}{ENV_SEPARATOR}{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// A misspelling of a variable the binaries read (`FLGFN_TOKN`,
/// `FLGFN_SEEDS`, `FLGFN_LOG_FROMAT`: one letter off, two for names of
/// six letters or more), or a key's name without its underscores
/// (`FLGFN_MAXSTEPS`): the variable meant. Unread, `FLGFN_TOKN` would
/// leave a learner without its token, `FLGFN_SEDD` a run unreproducible.
/// (Not a key's name misspelt: the scripts' own variables, such as
/// `FLGFN_TASKS` or `FLGFN_PORT`, are that close to keys.)
fn meant_by_spelling(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains(ENV_SEPARATOR) || VARIABLES_OF_THEIR_OWN.contains(&name) {
        return None;
    }
    // (The prefix is the same on both sides: the distance is the rest's.
    // Case aside: `FLGFN_seed` is as unread as `FLGFN_SEDD`.)
    let allowed = typos_allowed(rest);
    let upper = name.to_ascii_uppercase();
    if let Some(own) = VARIABLES_OF_THEIR_OWN
        .iter()
        .find(|own| strsim::levenshtein(&upper, own) <= allowed)
    {
        return Some((*own).to_owned());
    }
    let squeezed = rest.replace('_', "").to_ascii_lowercase();
    let mut meant: Vec<String> = schema()
        .iter()
        .filter_map(|(section, keys)| {
            let key = keys
                .as_table()?
                .keys()
                .find(|key| key.contains('_') && key.replace('_', "") == squeezed)?;
            Some(key_variable(section, key))
        })
        .collect();
    meant.sort();
    (!meant.is_empty()).then(|| meant.join(" or "))
}

/// `FLGFN_<SECTION>_<KEY>`, a real section and key with one underscore
/// between them: the variable meant (see [`misspelt_variables`]).
pub fn meant_with_section(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains(ENV_SEPARATOR) {
        return None;
    }
    let schema = schema();
    let is_key = |section: &str, key: &str| {
        schema
            .get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|keys| keys.contains_key(key))
    };
    // (ASCII only: a lower case of another length would move the split.)
    let lower = rest.to_ascii_lowercase();
    let at = lower
        .match_indices('_')
        .map(|(at, _)| at)
        .find(|&at| is_key(&lower[..at], &lower[at + 1..]))?;
    Some(format!(
        "{ENV_PREFIX}{}{ENV_SEPARATOR}{}",
        &rest[..at],
        &rest[at + 1..]
    ))
}

/// `FLGFN_<KEY>` or `FLGFN_<SECTION>` alone: every variable it may have
/// meant (see [`misspelt_variables`]).
fn meant_without_section(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains(ENV_SEPARATOR) || rest == "SEED" {
        return None;
    }
    let lower = rest.to_ascii_lowercase();
    let mut meant: Vec<String> = schema()
        .iter()
        .filter_map(|(section, keys)| {
            let keys = keys.as_table()?;
            if *section == lower {
                Some(key_variable(section, "<KEY>"))
            } else {
                keys.contains_key(&lower)
                    .then(|| key_variable(section, &lower))
            }
        })
        .collect();
    meant.sort();
    (!meant.is_empty()).then(|| meant.join(" or "))
}

/// `error` with the layer that set its key appended, where that was not
/// the file: `(set by --threads)`, `(set by FLGFN_LEARNER__THREADS)`. Where
/// the file set that key and the error refuses a pair
/// ([`ConfigError::invalid_pair`]), the layer that set the other:
/// `(learner.report_every_s set by FLGFN_LEARNER__REPORT_EVERY_S)`. For
/// errors found after validation too (a key a checkpoint refuses).
pub fn blame_layer(
    error: ConfigError,
    overrides: &[EnvOverride],
    flags: &[(&str, &str)],
) -> ConfigError {
    match error {
        ConfigError::Invalid {
            field,
            reason,
            partner,
        } => {
            // The last of each kind to set the key: the one applied.
            let layer_of = |key: &str| {
                flags
                    .iter()
                    .rfind(|(_, flagged)| *flagged == key)
                    .map(|(flag, _)| (*flag).to_owned())
                    .or_else(|| {
                        overrides
                            .iter()
                            .rfind(|o| o.key.join(".") == key)
                            .map(|o| o.variable.clone())
                    })
            };
            let blamed = layer_of(&field)
                .map(|layer| format!("set by {layer}"))
                .or_else(|| {
                    let partner = partner.as_deref()?;
                    layer_of(partner).map(|layer| format!("{partner} set by {layer}"))
                });
            let reason = match blamed {
                Some(blamed) => format!("{reason} ({blamed})"),
                None => reason,
            };
            ConfigError::Invalid {
                field,
                reason,
                partner,
            }
        }
        other => other,
    }
}

/// How a configuration path is named in messages: `-` is standard input;
/// a path that came from `FLGFN_CONFIG` (not `--config`) says so, since
/// a user who gave no path may not know where it came from.
fn path_name(path: &Path) -> String {
    if path == Path::new(STDIN_PATH) {
        return "standard input".to_owned();
    }
    let from_variable = std::env::var_os(CONFIG_VARIABLE).is_some_and(|named| named == path)
        && !std::env::args_os().any(|arg| {
            arg.to_str()
                .is_some_and(|arg| arg == "--config" || arg.starts_with("--config="))
        });
    if from_variable {
        format!("{} (named by {CONFIG_VARIABLE})", path.display())
    } else {
        path.display().to_string()
    }
}

/// Where an effective configuration came from, as TOML comment lines
/// for `--print-config`: the layers in order of precedence.
pub fn describe_layers(path: Option<&Path>, overrides: &[EnvOverride], flags: &[&str]) -> String {
    let file = path.map_or("no file".to_owned(), path_name);
    let env = if overrides.is_empty() {
        "no FLGFN_ variables".to_owned()
    } else {
        overrides
            .iter()
            .map(|o| o.variable.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let flags = if flags.is_empty() {
        "no flags".to_owned()
    } else {
        flags.join(", ")
    };
    format!(
        "# Effective configuration. Layers, later ones win:\n\
         #   defaults < {file} < environment ({env}) < command line ({flags})\n"
    )
}

impl Config {
    /// This configuration with `overrides` applied (see
    /// [`setting_override`]), validated; an override of a key the schema
    /// lacks, or of the wrong type, is an error naming it.
    pub fn with_settings(&self, overrides: &[EnvOverride]) -> Result<Self, ConfigError> {
        let config =
            Self::layered_text(&self.to_toml(), "the configuration".to_owned(), overrides)?;
        config.validate()?;
        Ok(config)
    }

    pub(super) fn layered(
        path: Option<&Path>,
        overrides: &[EnvOverride],
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => {
                let origin = path_name(path);
                let text = if path == Path::new(STDIN_PATH) {
                    std::io::read_to_string(std::io::stdin())
                } else {
                    std::fs::read_to_string(path)
                };
                let text = text.map_err(|source| ConfigError::Io {
                    path: origin.clone(),
                    source,
                })?;
                (text, origin)
            }
            None => (String::new(), "the defaults".to_owned()),
        };
        Self::layered_text(&text, origin, overrides)
    }

    /// The TOML `text` (read from `origin`) with `overrides` applied,
    /// unvalidated; the error blames the layer at fault.
    fn layered_text(
        text: &str,
        origin: String,
        overrides: &[EnvOverride],
    ) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Self::parse_toml(text, &origin);
        }
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::parse(origin.clone(), &e, None))?;
        let all: Vec<&EnvOverride> = overrides.iter().collect();
        let error = match with_overrides(&table, &all)? {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        // The table as the schema refused it, for the error's hint.
        let merged = applied(&table, overrides)?;
        // Each as given and as read (`'token'` reads as `token`).
        let secrets: Vec<&str> = overrides
            .iter()
            .filter(|o| holds_secrets(o.key.first().map(String::as_str)))
            .flat_map(|o| [Some(o.text.as_str()), o.value.as_str()])
            .flatten()
            .collect();
        // Blame the layer at fault: the file on its own, with its line
        // numbers (unless a variable mends it), else the one variable
        // that fails on top of it alone, else all of them together.
        let alone = |layer: &EnvOverride| with_overrides(&table, &[layer]);
        match Self::parse_toml(text, &origin) {
            Err(file_error) => {
                if !overrides
                    .iter()
                    .any(|layer| alone(layer).is_ok_and(|result| result.is_ok()))
                {
                    return Err(file_error);
                }
            }
            // The one variable without which the rest loads (a variable
            // may fail alone yet be right: a lattice key with the task set
            // by another variable).
            Ok(_) if overrides.len() > 1 => {
                for (at, layer) in overrides.iter().enumerate() {
                    let others: Vec<&EnvOverride> = overrides
                        .iter()
                        .enumerate()
                        .filter(|&(other, _)| other != at)
                        .map(|(_, o)| o)
                        .collect();
                    if with_overrides(&table, &others).is_ok_and(|result| result.is_ok()) {
                        return Err(variables_refusal(
                            format!("{} (applied to {origin})", layer.variable),
                            &merged,
                            &error,
                            &secrets,
                        ));
                    }
                }
            }
            Ok(_) => {}
        }
        let variables: Vec<&str> = overrides.iter().map(|o| o.variable.as_str()).collect();
        Err(variables_refusal(
            format!("{} (applied to {origin})", variables.join(", ")),
            &merged,
            &error,
            &secrets,
        ))
    }

    /// [`Config::validate`] for a binary, whose error says which layer
    /// set the key it names when that was not the file: a flag (`flags`:
    /// each flag given, with the key it sets) or an `FLGFN_` variable
    /// (`overrides`). "0 is less than 1" for `learner.threads` sent a user
    /// to a file that said 2.
    pub fn validate_layers(
        &self,
        overrides: &[EnvOverride],
        flags: &[(&str, &str)],
    ) -> Result<(), ConfigError> {
        self.validate()
            .map_err(|error| blame_layer(error, overrides, flags))
    }
}

/// `table` (a file's) with `layers` applied in order, as a table (an
/// error: a variable that cannot be applied, its section not one).
fn applied<'a>(
    table: &toml::Table,
    layers: impl IntoIterator<Item = &'a EnvOverride>,
) -> Result<toml::Table, ConfigError> {
    let mut table = table.clone();
    for layer in layers {
        layer.apply(&mut table)?;
    }
    Ok(table)
}

/// `table` (a file's) with `overrides` applied, as a configuration: the
/// outer error is a variable that cannot be applied (its section is not
/// one), the inner one the schema's refusal. A value read as a number, a
/// date or a boolean for a key that takes text is meant as text
/// (FLGFN_LEARNER__CHECKPOINT_DIR=123456): no such value fits a text key,
/// so it is applied as its text.
fn with_overrides(
    table: &toml::Table,
    overrides: &[&EnvOverride],
) -> Result<Result<Config, toml::de::Error>, ConfigError> {
    let as_given = overrides.iter().map(|&layer| {
        if !layer.value.is_str() && takes_text(&layer.key) {
            EnvOverride {
                value: toml::Value::String(layer.text.clone()),
                ..layer.clone()
            }
        } else {
            layer.clone()
        }
    });
    let mut table = applied(table, &as_given.collect::<Vec<_>>())?;
    name_default_task(&mut table);
    Ok(table.try_into::<Config>())
}

/// Whether the key is one whose value is text (the schema lists every
/// key, the optional ones too, with a value of its type).
fn takes_text(key: &[String]) -> bool {
    let mut table = super::schema();
    for (i, part) in key.iter().enumerate() {
        match table.get(part) {
            Some(toml::Value::Table(inner)) if i + 1 < key.len() => table = inner,
            Some(value) if i + 1 == key.len() => return value.is_str(),
            _ => return false,
        }
    }
    false
}
