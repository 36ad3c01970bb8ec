//! Tracing setup shared by the binaries.
//!
//! Two formats: human text (colours only when stderr is a terminal or
//! `CLICOLOR_FORCE` asks for them, and `NO_COLOR` is unset, so a log
//! written to a file has no escape codes) and
//! JSON lines (`--log-format json` or `FLGFN_LOG_FORMAT=json`), one object
//! per event carrying the fields of its spans: `actor_id`, `actor` and
//! `peer` on the learner's session events, `actor_id`, `actor_name`,
//! `learner` and `policy_version` on an actor's; a panic's report too
//! (see `log_panics_as_json`). Levels come from `RUST_LOG`.
//!
//! A binary that calls [`init_with_live_line`] (the learner) also keeps a
//! live progress line at the bottom of a terminal ([`live_status`]): log
//! lines print above it. Off a terminal, or with JSON logs, there is no
//! such line, only the periodic log lines.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with span fields, for log collectors.
    Json,
}

impl LogFormat {
    /// Its name on the command line and in `FLGFN_LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The variable that sets the log format ([`LogFlags`]).
pub const LOG_FORMAT_VARIABLE: &str = "FLGFN_LOG_FORMAT";

/// The logging flag every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogFlags {
    /// Log line format.
    #[arg(long, value_enum, env = "FLGFN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Whether logs are JSON lines. Then a span field recorded again replaces
/// its value (the text formatter appends it, so a field that changes all
/// the time, the policy version, would grow every line), and the error a
/// binary exits with is a JSON line too.
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// The format this process logs in (text until logging is set up): what
/// the processes it starts (local actors) should log in too.
pub fn log_format() -> LogFormat {
    if JSON_LOGS.load(Ordering::Relaxed) {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

/// Records the latest `value` of a span field that changes often (the
/// policy version), where the log format shows only the latest.
pub fn record_latest(span: &tracing::Span, field: &str, value: u64) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        span.record(field, value);
    }
}

/// Logs to stderr at `info` for flgfn crates and `warn` for dependencies,
/// unless `RUST_LOG` says otherwise, in text. Safe to call more than once
/// (tests).
pub fn init() {
    init_with(LogFormat::Text);
}

/// [`init`] in the given format.
pub fn init_with(format: LogFormat) {
    install(format, false);
}

/// As [`init_with`], plus a live progress line when stderr is a terminal
/// and the format is text. Returns whether there is one.
pub fn init_with_live_line(format: LogFormat) -> bool {
    install(format, true)
}

/// The live line, once made.
static LIVE_LINE: OnceLock<indicatif::ProgressBar> = OnceLock::new();

/// Whether this process draws a live line.
pub fn has_live_line() -> bool {
    LIVE_LINE.get().is_some()
}

/// Shows `message` on the live line, if there is one.
pub fn live_status(message: String) {
    if let Some(line) = LIVE_LINE.get() {
        line.set_message(message);
    }
}

/// Removes the live line for good (the run's summary follows as log lines).
pub fn live_finish() {
    if let Some(line) = LIVE_LINE.get() {
        line.finish_and_clear();
    }
}

/// Writes `line`, another process's log line (a local actor's), to
/// stderr as this process writes its own: above the live line, which
/// would otherwise run into it.
pub fn write_log_line(line: &[u8]) {
    let _ = AboveLiveLine.write_all(line);
}

/// Writes log lines to stderr, above the live line when there is one.
struct AboveLiveLine;

impl Write for AboveLiveLine {
    /// Never fails: a line that cannot be written (stderr a pipe whose
    /// reader is gone, as a local actor's once its learner died) is lost.
    /// Reporting it would not help: the formatter prints the failure to
    /// the same stderr with `eprintln!`, which panics there.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // (The formatter hands over a whole line per call.)
        let _ = match LIVE_LINE.get() {
            Some(line) if !line.is_finished() => line.suspend(|| std::io::stderr().write_all(buf)),
            _ => std::io::stderr().write_all(buf),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn install(format: LogFormat, live_line: bool) -> bool {
    let live = live_line && format == LogFormat::Text && std::io::stderr().is_terminal();
    if live {
        let line = indicatif::ProgressBar::new_spinner();
        line.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
        line.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        line.enable_steady_tick(Duration::from_millis(250));
        let _ = LIVE_LINE.set(line);
    }
    // Every flgfn crate and binary at info (flgfn-loadgen's, flgfn-sample's
    // and flgfn-experiment's own lines are logged under their binary's
    // name; flgfn-health logs nothing), libraries at warn.
    let default_filter = || {
        EnvFilter::new(
            "warn,flgfn_common=info,flgfn_actor=info,flgfn_learner=info,flgfn_loadgen=info,flgfn_sample=info,flgfn_experiment=info",
        )
    };
    // A RUST_LOG that does not parse is said once logging is up, not
    // silently replaced by the defaults.
    let (filter, unreadable) = match std::env::var("RUST_LOG") {
        Ok(levels) => match EnvFilter::try_new(&levels) {
            Ok(filter) => (filter, None),
            Err(error) => (default_filter(), Some((levels, error))),
        },
        Err(_) => (default_filter(), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| AboveLiveLine);
    JSON_LOGS.store(format == LogFormat::Json, Ordering::Relaxed);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour_allowed()).try_init(),
        LogFormat::Json => {
            log_panics_as_json();
            builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .try_init()
        }
    };
    if let Some((levels, error)) = unreadable {
        tracing::warn!(%levels, %error, "RUST_LOG is not a valid filter: using the default levels");
    }
    live
}

/// Makes a panic's report a JSON log line, in place of the default
/// hook's plain text, which a log collector cannot parse: a panic that is
/// caught (a session's, a failing libtorch call's) is logged again as the
/// error it becomes, so the run goes on with its log still JSON
/// throughout. A backtrace, where `RUST_BACKTRACE` (or
/// `RUST_LIB_BACKTRACE`) asks for one, is a field. Where `RUST_LOG` leaves
/// this line out, the hook before it reports the panic as it would have:
/// a panic is never silent.
fn log_panics_as_json() {
    static HOOKED: std::sync::Once = std::sync::Once::new();
    HOOKED.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !tracing::enabled!(tracing::Level::ERROR) {
                return before(info);
            }
            let backtrace = std::backtrace::Backtrace::capture();
            let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
                .then(|| backtrace.to_string());
            tracing::error!(
                panic = panic_message(info.payload()),
                location = info.location().map(ToString::to_string),
                thread = std::thread::current().name().unwrap_or("(unnamed)"),
                backtrace,
                "panicked"
            );
        }));
    });
}

/// Colour codes only for a person at a terminal, or where asked for
/// (`CLICOLOR_FORCE`: a local actor whose lines the learner passes on to
/// its terminal); never with `NO_COLOR`.
fn colour_allowed() -> bool {
    let forced = std::env::var_os(COLOUR_FORCE_VARIABLE).is_some_and(|value| value != "0");
    (forced || std::io::stderr().is_terminal()) && std::env::var_os("NO_COLOR").is_none()
}

/// The common convention for colours off a terminal.
pub const COLOUR_FORCE_VARIABLE: &str = "CLICOLOR_FORCE";

/// A binary's flags, parsed as [`clap::Parser::parse`] does, except that a
/// bad value that came from a variable (`FLGFN_LOG_FORMAT=xml`, an empty
/// `FLGFN_CONFIG`) is blamed on the variable: clap names only the flag,
/// which the user never typed.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
            match variable_at_fault(&T::command(), &error, &args, |name| std::env::var_os(name)) {
                Some(message) => {
                    crate::errln!("{}: error: {message}", T::command().get_name());
                    std::process::exit(2);
                }
                None => error.exit(),
            }
        }
    }
}

/// The message for `error` when the value it refuses came from an
/// argument's variable (`read` looks variables up): the flag is not among
/// `args`, and the variable is set.
fn variable_at_fault(
    command: &clap::Command,
    error: &clap::Error,
    args: &[std::ffi::OsString],
    read: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    // "--log-format <LOG_FORMAT>"
    let long = invalid.split_whitespace().next()?.strip_prefix("--")?;
    let arg = command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))?;
    let variable = arg.get_env()?.to_str()?;
    let flag = format!("--{long}");
    let typed = args.iter().skip(1).any(|given| {
        let given = given.to_string_lossy();
        given == flag || given.starts_with(&format!("{flag}="))
    });
    if typed {
        return None;
    }
    let value = read(variable)?;
    if value.is_empty() {
        return Some(format!(
            "{variable} is set but empty: unset it, or give it a value (it stands for {flag})"
        ));
    }
    let possible = match error.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(values)) => format!(" (possible values: {})", values.join(", ")),
        _ => String::new(),
    };
    // A value parser's own reason (FLGFN_RESUME_CHANGED's, say).
    let why = std::error::Error::source(error).map_or(String::new(), |why| format!(": {why}"));
    Some(format!(
        "{variable}={}: not a valid value for {flag}{possible}{why}",
        value.to_string_lossy()
    ))
}

/// The process exit status for a binary's result, printing an error as
/// `program: error: cause: cause...` (`{:#}` gives anyhow's one-line chain,
/// without the backtrace its Debug form adds).
pub fn exit_status<E: std::fmt::Display>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    // The live line first, or the error would be written onto it, after
    // its spinner and clock.
    live_finish();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // (Unless RUST_LOG filters errors out here: then as text.)
            if JSON_LOGS.load(Ordering::Relaxed) && tracing::enabled!(tracing::Level::ERROR) {
                // JSON logs: the line that matters most is one a log
                // collector can read too.
                tracing::error!(program, error = %format!("{error:#}"), "exiting with an error");
            } else {
                crate::errln!("{program}: error: {error:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Text to stdout, dropped if it cannot be written: like `print!`, which
/// panics when stdout is closed (`| head`, or a `| tee` that died), and a
/// closed console must not end an experiment whose results go to files.
/// The exit status, not stdout, says whether a binary did its work.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::write!(::std::io::stdout(), $($arg)*);
    }};
}

/// [`out!`] with a newline, in place of `println!`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// A line to stderr, dropped if it cannot be written (`eprintln!` panics
/// on a closed stderr, as a dead learner leaves its local actors').
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

/// An error and its causes on one line, `error: cause: cause...`: tonic's
/// transport errors say only "transport error" and keep why (refused,
/// no such host, a certificate) in their sources.
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source's text in their own.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What a panic said (tch's panics carry libtorch's message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::with_causes;

    /// Set in the child process of [`a_panic_is_a_json_line_in_json_logs`].
    const PANIC_CHILD: &str = "FLGFN_TEST_JSON_PANIC_CHILD";

    /// With JSON logs, a caught panic leaves stderr JSON throughout (the
    /// hook writes there, so the test reads a child's).
    #[test]
    fn a_panic_is_a_json_line_in_json_logs() {
        if std::env::var_os(PANIC_CHILD).is_some() {
            super::init_with(super::LogFormat::Json);
            let caught = std::panic::catch_unwind(|| panic!("a test panic {}", 7));
            tracing::info!(caught = caught.is_err(), "after the panic");
            return;
        }
        let child = |rust_log: Option<&str>| {
            let mut command =
                std::process::Command::new(std::env::current_exe().expect("the test binary"));
            command
                .args([
                    "--exact",
                    "telemetry::tests::a_panic_is_a_json_line_in_json_logs",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env(PANIC_CHILD, "1")
                .env_remove("RUST_LOG");
            if let Some(levels) = rust_log {
                command.env("RUST_LOG", levels);
            }
            command.output().expect("the test binary runs")
        };
        // With the line filtered out, the panic is still said, as Rust
        // says it by default.
        let silenced = child(Some("off"));
        let stderr = String::from_utf8_lossy(&silenced.stderr);
        assert!(
            stderr.contains("panicked at") && stderr.contains("a test panic 7"),
            "{stderr}"
        );
        let child = child(None);
        let stderr = String::from_utf8_lossy(&child.stderr);
        assert!(child.status.success(), "{stderr}");
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect();
        let panicked = lines
            .iter()
            .find(|line| line["fields"]["message"] == "panicked")
            .unwrap_or_else(|| panic!("{stderr}"));
        assert_eq!(panicked["level"], "ERROR");
        assert_eq!(panicked["fields"]["panic"], "a test panic 7");
        let location = panicked["fields"]["location"].as_str().unwrap_or_default();
        assert!(location.starts_with("common/src/telemetry.rs:"), "{stderr}");
        assert!(
            lines.iter().any(|line| line["fields"]["caught"] == true),
            "{stderr}"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_is_shown_with_its_causes() {
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(with_causes(&error), "transport error: connection refused");
        let plain = std::io::Error::other("alone");
        assert_eq!(with_causes(&plain), "alone");
    }
}
