//! A refused configuration file's error, made to say what the parser's
//! does not. The TOML parser names a place and a problem; a user also
//! needs the key meant (``did you mean `learning_rate`?``), the names a key
//! takes, and why a `[task]` or a section was refused, on the first line,
//! where a log collector or `head -1` reads it.

use serde::Deserialize;

use super::{Config, ConfigError, TaskConfig, schema};
use crate::tasks::lattice::LatticeConfig;
use crate::tasks::set_generation::SetGenerationConfig;

impl ConfigError {
    /// [`ConfigError::Parse`] for the parser's `error`, with the key or
    /// name meant where it refused a misspelt one (`did you mean ...?`),
    /// TOML's limit for an integer past it, and `hint` if given. (Read
    /// from the parser's own message, not the quoted line of the file.)
    pub(super) fn parse(path: String, error: &toml::de::Error, hint: Option<String>) -> Self {
        let meant = did_you_mean(error.message());
        let hints: Vec<String> = [integer_limit(error.message()), hint]
            .into_iter()
            .flatten()
            .collect();
        ConfigError::Parse {
            path,
            message: parse_message(error, meant, &hints),
        }
    }
}

/// The error for TOML `text` that the schema refused with the parser's
/// `error` (`origin` names the text): at the key's line where the parser
/// had only the section, with a hint where one says more than the parser
/// (another task's keys, a section of the wrong shape, the names a key
/// takes). The text is read again to find them: only once it is refused.
pub(super) fn refusal(text: &str, origin: &str, error: toml::de::Error) -> ConfigError {
    let table: Option<toml::Table> = toml::from_str(text).ok();
    let error = table
        .as_ref()
        .and_then(|table| task_key_error(text, table, &error))
        .unwrap_or(error);
    let refused = refused_name(error.message());
    let (section, line) = error_place(text, &error);
    // Another task's key in [task] (not misspelt: no `did you mean`), or
    // a type refused in [task] that the other task reads.
    let in_task = |name: &str| {
        table
            .as_ref()
            .and_then(|t| t.get("task"))
            .and_then(toml::Value::as_table)
            .is_some_and(|task| task.contains_key(name))
    };
    let task_error = match refused {
        Some(name) => in_task(name),
        None => section
            .as_ref()
            .is_none_or(|s| s.as_deref() == Some("task")),
    };
    let in_file = |name: &str| format!("`name = \"{name}\"` in [task]");
    if task_error && let Some(hint) = table.as_ref().and_then(|t| another_tasks_keys(t, in_file)) {
        return ConfigError::Parse {
            path: origin.to_owned(),
            message: parse_message(&error, None, &[hint]),
        };
    }
    // A section of the wrong shape, where the error points at it.
    let shape = table
        .as_ref()
        .and_then(misshapen_section)
        .filter(|(name, _)| {
            error.message().contains("invalid type")
                && line.is_none_or(|line| line.contains(name.as_str()))
        })
        .map(|(_, hint)| hint);
    let hint = shape.or_else(|| names_taken(text, &error));
    let refused = ConfigError::parse(origin.to_owned(), &error, hint);
    // A value refused in [auth] or [tls] (or given as either section) may
    // be a secret put in the wrong place: the parser's message and excerpt
    // repeat it, so it is left out of both.
    let key = line
        .and_then(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()));
    // The refused key's path, quotes aside (`"allow" = ...`, a dotted
    // `auth.allow = ...`), under its section.
    let mut key_path: Vec<&str> = match &section {
        Some(Some(section)) => vec![section.as_str()],
        _ => Vec::new(),
    };
    if section.is_some()
        && let Some((key, _)) = key
    {
        key_path.extend(
            key.split('.')
                .map(|part| part.trim().trim_matches(['"', '\''])),
        );
    }
    let secret_place = holds_secrets(key_path.first().copied());
    match refused {
        ConfigError::Parse { path, message } if secret_place => {
            // The value as typed (quotes, escapes, a comment; a number),
            // then the strings it reads as (an inline table's too).
            let typed = key.map(|(_, value)| value);
            let parsed = table.as_ref().and_then(|table| value_at(table, &key_path));
            let strings: Vec<&str> = match parsed {
                Some(toml::Value::String(text)) => vec![text.as_str()],
                Some(toml::Value::Table(keys)) => {
                    keys.values().filter_map(toml::Value::as_str).collect()
                }
                _ => Vec::new(),
            };
            ConfigError::Parse {
                path,
                message: without_secrets(message, typed.into_iter().chain(strings)),
            }
        }
        refused => refused,
    }
}

/// The value at `path` (section, key, ...) of `table`.
fn value_at<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut keys = table;
    for part in parents {
        keys = keys.get(*part)?.as_table()?;
    }
    keys.get(*last)
}

/// Whether `section` is one of those that name secrets' files ([auth],
/// [tls]): a value refused there may be a secret put in the wrong place.
pub(super) fn holds_secrets(section: Option<&str>) -> bool {
    matches!(section, Some("auth" | "tls"))
}

/// What stands for a value left out of an error.
const NOT_SHOWN: &str = "(value not shown)";

/// `message` without `secrets` (those of more than 2 characters), as the
/// parser quotes a string (`string "..."`) and as they are; a place
/// (`line 100, column 8: `, an excerpt's `100 | `) keeps its numbers.
fn without_secrets<'a>(message: String, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let secrets: Vec<&str> = secrets
        .into_iter()
        .filter(|secret| secret.chars().count() > 2)
        .collect();
    if secrets.is_empty() {
        return message;
    }
    message
        .split_inclusive('\n')
        .map(|line| {
            let (place, text) = split_place(line);
            let text = secrets.iter().fold(text.to_owned(), |text, secret| {
                text.replace(&format!("{secret:?}"), NOT_SHOWN)
                    .replace(secret, NOT_SHOWN)
            });
            format!("{place}{text}")
        })
        .collect()
}

/// A message line's place, if it starts with one (`job.toml: line 100,
/// column 8: `, or an excerpt's `100 | `), and the rest.
fn split_place(line: &str) -> (&str, &str) {
    let digits_then = |text: &str, after: &str| {
        let digits = text.chars().take_while(char::is_ascii_digit).count();
        (digits > 0 && text[digits..].starts_with(after)).then_some(digits + after.len())
    };
    if let Some(at) = line.find(", column ")
        && let Some(end) = digits_then(&line[at + ", column ".len()..], ": ")
    {
        return line.split_at(at + ", column ".len() + end);
    }
    let indent = line.len() - line.trim_start().len();
    match digits_then(&line[indent..], " | ") {
        Some(end) => line.split_at(indent + end),
        None => ("", line),
    }
}

/// The error for `FLGFN_` variables (`origin` names them and the layer
/// below) that the schema refused once applied, as `merged`: with
/// [`refusal`]'s hint where a `[task]` key belongs to another task,
/// in place of the nearest spelling (`side` is a lattice key, not a
/// misspelt `size`). `secrets` are the values of the variables that set
/// `[auth]` and `[tls]` keys, left out of a message about such a key: no
/// secret where they went, but maybe one where they went wrong
/// (`FLGFN_AUTH__ALLOW_UNAUTHENTICATED=<token>`).
pub(super) fn variables_refusal(
    origin: String,
    merged: &toml::Table,
    error: &toml::de::Error,
    secrets: &[&str],
) -> ConfigError {
    let in_task = |name: &str| {
        merged
            .get("task")
            .and_then(toml::Value::as_table)
            .is_some_and(|task| task.contains_key(name))
    };
    let hint = refused_name(error.message())
        .filter(|name| in_task(name))
        .and_then(|_| another_tasks_keys(merged, |name| format!("FLGFN_TASK__NAME={name}")));
    let refused = match hint {
        Some(hint) => ConfigError::Parse {
            path: origin,
            message: parse_message(error, None, &[hint]),
        },
        None => ConfigError::parse(origin, error, None),
    };
    // The key the parser names (`in `learner.threads``); none named, any.
    let shown = error.to_string();
    let refused_key = shown
        .lines()
        .find_map(|line| line.strip_prefix("in `").and_then(|k| k.strip_suffix('`')));
    let secret_place = refused_key.is_none_or(|key| holds_secrets(key.split('.').next()));
    match refused {
        ConfigError::Parse { path, message } if secret_place => ConfigError::Parse {
            path,
            message: without_secrets(message, secrets.iter().copied()),
        },
        refused => refused,
    }
}

/// A section given as something other than one table (`[[learner]]`, a
/// list of tables; `learner = 5`), which the parser reports as a type
/// without saying what was meant: a hint to add to the parse error.
fn misshapen_section(table: &toml::Table) -> Option<(String, String)> {
    let (name, value) = table.iter().find(|(name, value)| {
        schema().get(*name).is_some_and(toml::Value::is_table) && !value.is_table()
    })?;
    let given = if value
        .as_array()
        .is_some_and(|items| !items.is_empty() && items.iter().all(toml::Value::is_table))
    {
        format!("`[[{name}]]` (two pairs of brackets) makes it a list of tables")
    } else {
        // Its kind, not the value: `auth = "..."` may be a secret put
        // where a section belongs.
        format!("here it is a value of type {}", value.type_str())
    };
    Some((
        name.clone(),
        format!(
            "(`{name}` is one section: write `[{name}]` with its keys on the lines below; {given})"
        ),
    ))
}

/// The top-level section whose table holds byte `at` of TOML `text`: the
/// last `[name]` or `[[name]]` header before it (its first dotted part),
/// None before any header.
fn section_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at).unwrap_or(text);
    before.lines().rev().find_map(|line| {
        let header = line.trim_start().strip_prefix('[')?;
        let name = header.trim_start_matches('[').split([']', '.']).next()?;
        Some(name.trim().trim_matches('"').to_owned())
    })
}

/// Where the parser's `error` is: its top-level section (None: not known;
/// Some(None): before any header), and its line of `text`. An error from
/// an edited table has no place in the text, only the key it names ("in
/// `learner.threads`"), whose first part is the section.
fn error_place<'t>(
    text: &'t str,
    error: &toml::de::Error,
) -> (Option<Option<String>>, Option<&'t str>) {
    let at = error.span().map(|span| span.start.min(text.len()));
    let section = match at {
        Some(at) => Some(section_at(text, at)),
        None => error.to_string().lines().find_map(|line| {
            let key = line.strip_prefix("in `")?.strip_suffix('`')?;
            Some(Some(key.split('.').next().unwrap_or(key).to_owned()))
        }),
    };
    (section, at.map(|at| line_at(text, at)))
}

/// The error for a `[task]` refused where it is refused, at its key's
/// line, where the parser's `error` had only the section (the task is
/// tagged by its name, and serde reads a tagged value from a buffer that
/// has no places in the text). The text is read again as the named task's
/// own keys, with `name = ...` blanked (the other lines keep their
/// places) where the text still parses so. None where `error` is not in
/// `[task]` or this reading finds nothing more precise.
fn task_key_error(
    text: &str,
    table: &toml::Table,
    error: &toml::de::Error,
) -> Option<toml::de::Error> {
    #[derive(Deserialize)]
    struct TaskOnly<T> {
        #[expect(dead_code, reason = "read for its errors only")]
        task: T,
    }
    fn read_as<T: serde::de::DeserializeOwned>(text: &str) -> Option<toml::de::Error> {
        toml::from_str::<TaskOnly<T>>(text).err()
    }
    let in_task = match error_place(text, error) {
        // The `[task]` header's line itself.
        (_, Some(line)) => {
            line.trim_start().starts_with('[')
                && section_at(line, line.len()).as_deref() == Some("task")
        }
        (section, None) => section.flatten().as_deref() == Some("task"),
    };
    let task = table.get("task")?.as_table()?;
    if !in_task {
        return None;
    }
    let name = match task.get("name") {
        Some(name) => name.as_str()?.to_owned(),
        None => TaskConfig::default().name(),
    };
    // A name whose string spans lines leaves its rest behind: nothing
    // more precise.
    let blanked = blank_task_name(text);
    if toml::from_str::<toml::Table>(&blanked).is_err() {
        return None;
    }
    let precise = TaskConfig::every_task()
        .into_iter()
        .find(|task| task.name() == name)
        .and_then(|task| match task {
            TaskConfig::SetGeneration(_) => read_as::<SetGenerationConfig>(&blanked),
            TaskConfig::Lattice(_) => read_as::<LatticeConfig>(&blanked),
        })?;
    // A `name` that blanking missed (`task.name = ...`, an inline table)
    // is refused as unknown here: nothing more precise either.
    let places_a_key = error_place(text, &precise)
        .1
        .is_some_and(|line| !line.trim_start().starts_with('['));
    (places_a_key && refused_name(precise.message()) != Some("name")).then_some(precise)
}

/// The names a key takes, where it takes one of a few names (an enum) and
/// was given another type, which the parser reports only as "wanted
/// string or table": found by reading the text again with a name that no
/// variant has in the value's place, which serde refuses listing them.
fn names_taken(text: &str, error: &toml::de::Error) -> Option<String> {
    const NO_VARIANT: &str = "?";
    if !error.message().starts_with("wanted string or table") {
        return None;
    }
    let span = error.span()?;
    let probe = format!(
        "{}\"{NO_VARIANT}\"{}",
        text.get(..span.start)?,
        text.get(span.end..)?
    );
    let table: toml::Table = toml::from_str(&probe).ok()?;
    let refused = toml::from_str::<Config>(&probe).err()?;
    let refused = task_key_error(&probe, &table, &refused).unwrap_or(refused);
    if refused.span().map(|at| at.start) != Some(span.start) {
        return None;
    }
    let expected = refused
        .message()
        .strip_prefix(&format!("unknown variant `{NO_VARIANT}`, expected "))?
        .lines()
        .next()?;
    // The key before `=`: on its own line, in an inline table, or dotted.
    let key = text
        .get(..span.start)?
        .trim_end()
        .strip_suffix('=')?
        .trim_end()
        .rsplit([',', '{', '\n', ' ', '\t'])
        .next()?;
    Some(format!("(`{key}` takes a name, in quotes: {expected})"))
}

/// TOML `text` with the `name = ...` line of its `[task]` section (and of
/// any `[task.x]`, which a task never has) turned to spaces, every other
/// byte in its place.
fn blank_task_name(text: &str) -> String {
    let mut section: Option<String> = None;
    let mut blanked = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            section = section_at(line, line.len());
        }
        let names_the_task = section.as_deref() == Some("task")
            && trimmed
                .strip_prefix("name")
                .is_some_and(|rest| rest.trim_start().starts_with('='));
        if names_the_task {
            let body = line.trim_end_matches(['\n', '\r']);
            blanked.push_str(&" ".repeat(body.len()));
            blanked.push_str(&line[body.len()..]);
        } else {
            blanked.push_str(line);
        }
    }
    blanked
}

/// The line of TOML `text` that holds byte `at`.
fn line_at(text: &str, at: usize) -> &str {
    let start = text
        .get(..at)
        .and_then(|before| before.rfind('\n'))
        .map_or(0, |newline| newline + 1);
    let rest = text.get(start..).unwrap_or_default();
    rest.lines().next().unwrap_or_default()
}

/// Why a `[task]` table that its own task refuses would be read by
/// another task (its keys are that task's, its `name` missing or other):
/// a hint to add to the parse error, if so.
/// (`selects`: how the user would name a task, where they write.)
fn another_tasks_keys(table: &toml::Table, selects: fn(&str) -> String) -> Option<String> {
    let task = table.get("task")?.as_table()?;
    let named = task.get("name").and_then(toml::Value::as_str);
    let current = named.map_or_else(|| TaskConfig::default().name(), str::to_owned);
    let parses_as = |name: &str| {
        let mut renamed = task.clone();
        renamed.insert("name".to_owned(), toml::Value::String(name.to_owned()));
        toml::Value::Table(renamed).try_into::<TaskConfig>().is_ok()
    };
    // A name no task has (a typo) is serde's to report: the keys may be
    // right for the task meant.
    let names: Vec<String> = TaskConfig::every_task()
        .iter()
        .map(TaskConfig::name)
        .collect();
    if !names.contains(&current) || parses_as(&current) {
        return None;
    }
    let chosen = if named.is_some() { "" } else { ", the default" };
    names.into_iter().find_map(|name| {
        (name != current && parses_as(&name)).then(|| {
            format!(
                "(these are keys of the {name} task, which {} selects; this [task] is {current}{chosen})",
                selects(&name)
            )
        })
    })
}

/// The line `did you mean `learning_rate`?` for a parser's message that
/// refuses an unknown key or name (`unknown field `learning_rat`,
/// expected one of ...`; `unknown variant ...`), where one of those it
/// expected is close: one letter off (two for names of six letters or
/// more), the same but for underscores and case, a whole word of it
/// (`universe` for `universe_size`), or a word users write for it (`gpu`
/// for `cuda`, see [`SYNONYMS`]).
fn did_you_mean(message: &str) -> Option<String> {
    Some(format!("did you mean {}?", meant_name(message)?))
}

/// A parser's refusal with all that matters on its first line, for a log
/// collector or `head -1`: where (`line 2, column 1`, or the key where
/// there is no text to point in), what, the name meant and `hints`. Then
/// the parser's excerpt of the file, any further lines of its message,
/// and, where no name meant was found, the names it expected.
fn parse_message(error: &toml::de::Error, meant: Option<String>, hints: &[String]) -> String {
    let shown = error.to_string();
    let message_line = error.message().lines().next().unwrap_or_default();
    // `unknown field `x`, expected one of `a`, `b`, ...`: the list is
    // long, and the name meant says more.
    let (problem, expected) = match message_line.split_once(", expected ") {
        Some((refused, expected))
            if message_line.starts_with("unknown field")
                || message_line.starts_with("unknown variant") =>
        {
            (refused, Some(expected))
        }
        _ => (message_line, None),
    };
    // The parser's text: `TOML parse error at line 2, column 1`, the
    // excerpt, the message, then `in `learner.max_steps`` where its error
    // has a key and no place.
    let mut place = None;
    let mut excerpt = Vec::new();
    let mut rest = Vec::new();
    let mut message_seen = false;
    for line in shown.lines() {
        if let Some(at) = line.strip_prefix("TOML parse error at ") {
            place = Some(at.to_owned());
        } else if line == message_line {
            message_seen = true;
        } else if let Some(key) = line.strip_prefix("in `").and_then(|k| k.strip_suffix('`')) {
            place.get_or_insert_with(|| format!("`{key}`"));
        } else if message_seen {
            rest.push(line);
        } else if place.is_some() {
            excerpt.push(line);
        }
    }
    let mut first = match place {
        Some(place) => format!("{place}: {problem}"),
        None => problem.to_owned(),
    };
    for hint in meant.iter().chain(hints) {
        // A hint in parentheses reads on from the problem.
        first.push_str(if hint.starts_with('(') { " " } else { "; " });
        first.push_str(hint);
    }
    // An unknown key's value says nothing about the mistake, and may be a
    // secret put where no key takes it (`token = "..."` under [auth]): the
    // excerpt shows the key, not the value.
    let unknown_field = message_line.starts_with("unknown field");
    let excerpt = excerpt
        .into_iter()
        .map(|line| match line.split_once(" | ") {
            Some((number, text)) if unknown_field && number.trim().parse::<u64>().is_ok() => {
                match text.split_once('=') {
                    Some((key, _)) => format!("{number} | {key}= (value not shown)"),
                    None => line.to_owned(),
                }
            }
            _ => line.to_owned(),
        });
    let mut lines = vec![first];
    lines.extend(excerpt.chain(rest.into_iter().map(str::to_owned)));
    if let (None, Some(expected)) = (&meant, expected) {
        lines.push(format!("expected {expected}"));
    }
    lines.join("\n")
}

/// The line saying why an integer the parser read was refused as a
/// `i128` (the TOML parser's wording for one beyond 64 bits).
fn integer_limit(message: &str) -> Option<String> {
    message
        .contains("as i128")
        .then(|| format!("TOML integers are 64-bit: at most {}", i64::MAX))
}

/// How many letters a misspelling of `name` may be off by: one, two for
/// names of six letters or more (variables and keys alike).
pub(super) fn typos_allowed(name: &str) -> usize {
    if name.chars().count() >= 6 { 2 } else { 1 }
}

/// The key or name an "unknown field" or "unknown variant" message
/// refuses.
fn refused_name(message: &str) -> Option<&str> {
    let (_, refused) = message
        .split_once("unknown field `")
        .or_else(|| message.split_once("unknown variant `"))?;
    Some(refused.split_once('`')?.0)
}

/// The names meant by a refused one (see [`did_you_mean`]), quoted and
/// joined by `or`.
fn meant_name(message: &str) -> Option<String> {
    let given = refused_name(message)?;
    let rest = message.split_once(&format!("`{given}`"))?.1;
    let expected = rest.lines().next()?.split_once("expected ")?.1;
    let candidates = expected.split('`').skip(1).step_by(2);
    // A word users write for one of ours that no spelling is near
    // (`gpu` is one letter from `cpu`, the opposite choice).
    if let Some(&(_, ours)) = SYNONYMS.iter().find(|&&(theirs, ours)| {
        given.eq_ignore_ascii_case(theirs) && candidates.clone().any(|c| c == ours)
    }) {
        return Some(format!("`{ours}`"));
    }
    let allowed = typos_allowed(given);
    let squeeze = |name: &str| name.replace('_', "").to_lowercase();
    // A whole word of three letters or more (`s` would match every
    // `..._s`).
    let word_of = |long: &str, word: &str| {
        word.chars().count() >= 3
            && (long.starts_with(&format!("{word}_")) || long.ends_with(&format!("_{word}")))
    };
    let close: Vec<(usize, &str)> = candidates
        .filter(|candidate| !candidate.is_empty())
        .map(|candidate| (strsim::levenshtein(given, candidate), candidate))
        .filter(|&(distance, candidate)| {
            distance <= allowed
                || squeeze(given) == squeeze(candidate)
                || word_of(given, candidate)
                || word_of(candidate, given)
        })
        .collect();
    let nearest = close.iter().map(|&(distance, _)| distance).min()?;
    let meant: Vec<String> = close
        .iter()
        .filter(|&&(distance, _)| distance == nearest)
        .map(|(_, candidate)| format!("`{candidate}`"))
        .collect();
    Some(meant.join(" or "))
}

/// Words for a name of ours: (theirs, ours).
const SYNONYMS: &[(&str, &str)] = &[("gpu", "cuda")];
