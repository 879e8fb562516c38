//! The agent's settings file, `/etc/netpol/agent.conf` (a dpkg conffile: an upgrade keeps local
//! changes).
//!
//! Every flag of `run` has an environment variable, `NETPOL_` and the flag's long name in upper
//! case with `_` for `-` (`--policy-entries` is `NETPOL_POLICY_ENTRIES`, `--masq6` is
//! `NETPOL_MASQ6`), given to it here ([`command`]) rather than flag by flag, so a flag added later
//! is configurable without more work. A repeatable flag takes a comma-separated list
//! (`NETPOL_IGNORE_LABEL=build.*,team`), and so does the flag itself.
//!
//! The file holds `NAME=value` lines of those variables (and `NETPOL_LOG`), `#` comments and
//! blank lines; a value may be quoted with `"…"` or `'…'`; an empty value is the default. The
//! agent reads it itself, before the command line is parsed, so it applies the same way under
//! systemd, started by hand or in the sidecar container. Precedence: a flag, then the process
//! environment, then the file. A line that does not parse or names an unknown variable is an
//! error with the file and line, and the agent does not start: a typo must not silently leave a
//! setting at its default.
//!
//! `teardown` reads the same file, for the pin and state directories the agent used.

use std::{collections::BTreeSet, ffi::OsString, io, path::Path};

use clap::{ArgAction, Command, CommandFactory};

use super::Cli;

/// The settings file the agent reads when `--config` / `NETPOL_CONFIG` name no other.
pub const DEFAULT_CONFIG: &str = "/etc/netpol/agent.conf";

/// Variables the file may set besides those of `run`'s flags.
const EXTRA_VARS: [&str; 1] = ["NETPOL_LOG"];

/// Flags of these subcommands get their `NETPOL_*` variable (`teardown` only for the
/// directories: its `--state` and `--force` must be typed, never read from a file).
const ENV_SUBCOMMANDS: [&str; 2] = ["run", "teardown"];
const TEARDOWN_ENV_FLAGS: [&str; 2] = ["pin-dir", "state-dir"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
}

/// The variable of flag `--long`: `NETPOL_` + `LONG` with `_` for `-`.
pub fn env_name(long: &str) -> String {
    format!("NETPOL_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// The command line with every `run` flag (and `teardown`'s directories) bound to its
/// `NETPOL_*` variable.
pub fn command() -> Command {
    let mut cmd = Cli::command();
    for sub in ENV_SUBCOMMANDS {
        cmd = cmd.mut_subcommand(sub, |c| {
            c.mut_args(|a| {
                let Some(long) = a.get_long().map(str::to_owned) else {
                    return a;
                };
                if long == "help" || (sub == "teardown" && !TEARDOWN_ENV_FLAGS.contains(&&*long)) {
                    return a;
                }
                let repeated = matches!(a.get_action(), ArgAction::Append);
                let a = a.env(env_name(&long));
                if repeated {
                    a.value_delimiter(',')
                } else {
                    a
                }
            })
        });
    }
    cmd
}

/// The variables the settings file may set: those of `run`'s flags, `NETPOL_LOG`.
pub fn known_vars() -> BTreeSet<String> {
    let mut out: BTreeSet<String> = EXTRA_VARS.iter().map(|s| (*s).to_owned()).collect();
    if let Some(run) = command().find_subcommand("run") {
        out.extend(
            run.get_arguments()
                .filter_map(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned()),
        );
    }
    out
}

/// Parses the text of a settings file into `(NAME, value)` pairs, in order; `path` is for
/// messages.
pub fn parse(
    path: &str,
    text: &str,
    known: &BTreeSet<String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| ConfigError::Syntax {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err(err(format!("expected NAME=value, found {line:?}")));
        };
        let name = name.trim();
        if !known.contains(name) {
            let hint = if name.starts_with("NETPOL_") {
                String::new()
            } else {
                " (settings are NETPOL_* variables)".to_owned()
            };
            return Err(err(format!(
                "unknown setting {name:?}{hint}; known: {}",
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => match value[1..].strip_suffix(q) {
                Some(inner) if !inner.contains(q) => inner,
                _ => return Err(err(format!("{name}: unbalanced quote in {value:?}"))),
            },
            _ => {
                if value.contains(['"', '\'']) {
                    return Err(err(format!(
                        "{name}: a quote inside an unquoted value ({value:?})"
                    )));
                }
                // A comment after the value, as in `NETPOL_MASQ6=off  # no IPv6 here`.
                value.split(" #").next().unwrap_or("").trim_end()
            }
        };
        if out.iter().any(|(n, _): &(String, String)| n == name) {
            return Err(err(format!("{name} is set twice")));
        }
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Reads the settings file at `path`; a missing file is no settings (the package ships one, but
/// a hand-built agent need not have one).
pub fn load(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    parse(&path.display().to_string(), &text, &known_vars())
}

/// Parses the command line; for `run` and `teardown`, first applies the settings file (each
/// variable not already in the environment), then parses again, so that flags win over the
/// environment, and the environment over the file.
pub fn parse_args() -> Result<Cli, ConfigError> {
    parse_args_from(std::env::args_os().collect())
}

fn parse_args_from(args: Vec<OsString>) -> Result<Cli, ConfigError> {
    use clap::FromArgMatches as _;
    let from = |args: &[OsString]| {
        let m = command().get_matches_from(args);
        Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
    };
    let cli = from(&args);
    if !matches!(
        cli.command,
        super::Command::Run(_) | super::Command::Teardown(_)
    ) {
        return Ok(cli);
    }
    let settings = load(&cli.config)?;
    if settings.is_empty() {
        return Ok(cli);
    }
    for (name, value) in settings {
        // `NAME=` leaves the setting at its default.
        if !value.is_empty() && std::env::var_os(&name).is_none() {
            // Single-threaded: nothing has been spawned yet.
            std::env::set_var(name, value);
        }
    }
    Ok(from(&args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeSet<String> {
        known_vars()
    }

    #[test]
    fn every_run_flag_has_its_variable() {
        let cmd = command();
        let run = cmd.find_subcommand("run").expect("run");
        for a in run.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if long == "help" {
                continue;
            }
            assert_eq!(
                a.get_env().map(|e| e.to_string_lossy().into_owned()),
                Some(env_name(long)),
                "--{long}"
            );
        }
        assert!(known().contains("NETPOL_POLICY_ENTRIES"));
        assert!(known().contains("NETPOL_MASQ6"));
        assert!(known().contains("NETPOL_LOG"));
    }

    #[test]
    fn teardown_reads_only_the_directories() {
        let cmd = command();
        let td = cmd.find_subcommand("teardown").expect("teardown");
        let with_env: Vec<String> = td
            .get_arguments()
            .filter(|a| a.get_env().is_some())
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        assert_eq!(with_env, ["pin-dir", "state-dir"]);
    }

    #[test]
    fn parses_names_values_quotes_and_comments() {
        let text = "# settings\n\nNETPOL_MASQ6=off   # no IPv6 here\nexport NETPOL_LOG=debug\n\
                    NETPOL_IGNORE_LABEL=\"build.*,team\"\nNETPOL_PIN_DIR='/sys/fs/bpf/x y'\n";
        let got = parse("agent.conf", text, &known()).expect("parses");
        assert_eq!(
            got,
            [
                ("NETPOL_MASQ6".to_owned(), "off".to_owned()),
                ("NETPOL_LOG".to_owned(), "debug".to_owned()),
                ("NETPOL_IGNORE_LABEL".to_owned(), "build.*,team".to_owned()),
                ("NETPOL_PIN_DIR".to_owned(), "/sys/fs/bpf/x y".to_owned()),
            ]
        );
    }

    #[test]
    fn errors_name_the_file_and_line() {
        for (text, needle) in [
            (
                "NETPOL_MASQ=off\n",
                "agent.conf:1: unknown setting \"NETPOL_MASQ\"",
            ),
            (
                "\nmasq6=off\n",
                "agent.conf:2: unknown setting \"masq6\" (settings are NETPOL_*",
            ),
            ("NETPOL_MASQ6\n", "agent.conf:1: expected NAME=value"),
            (
                "NETPOL_MASQ6=\"off\n",
                "agent.conf:1: NETPOL_MASQ6: unbalanced quote",
            ),
            (
                "NETPOL_MASQ6=o\"ff\n",
                "agent.conf:1: NETPOL_MASQ6: a quote inside",
            ),
            (
                "NETPOL_MASQ6=on\nNETPOL_MASQ6=off\n",
                "agent.conf:2: NETPOL_MASQ6 is set twice",
            ),
        ] {
            let e = parse("agent.conf", text, &known())
                .expect_err(text)
                .to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    /// The shipped conffile parses, sets nothing, every setting it documents (commented out, at
    /// its default) is one the agent knows, and it documents every `run` flag's variable (and
    /// NETPOL_LOG): a flag added without its line fails here.
    #[test]
    fn the_packaged_agent_conf_parses_and_documents_known_settings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.conf");
        let text = std::fs::read_to_string(&path).expect("read packaging/agent.conf");
        let set = parse("agent.conf", &text, &known()).expect("packaging/agent.conf parses");
        assert!(
            set.is_empty(),
            "the shipped agent.conf sets nothing: {set:?}"
        );
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#NETPOL_"))
            .map(|l| format!("NETPOL_{}\n", l.trim()))
            .collect();
        let documented =
            parse("agent.conf (commented)", &uncommented, &known()).unwrap_or_else(|e| {
                panic!("the commented-out settings of packaging/agent.conf must parse: {e}")
            });
        // Every `run` flag, and NETPOL_LOG.
        let run = command()
            .find_subcommand("run")
            .expect("run")
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "help")
            .map(env_name)
            .chain(EXTRA_VARS.iter().map(|v| v.to_string()))
            .collect::<Vec<_>>();
        assert!(run.len() > 20, "{run:?}");
        for var in run {
            assert!(
                documented.iter().any(|(n, _)| *n == var),
                "packaging/agent.conf does not document {var}"
            );
        }
    }

    #[test]
    fn the_file_applies_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("netpol-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let conf = dir.join("agent.conf");
        std::fs::write(
            &conf,
            "NETPOL_POLICY_ENTRIES=77\nNETPOL_IGNORE_LABEL=a,b\nNETPOL_FRAG_ENTRIES=55\n",
        )
        .expect("write");
        let args = |extra: &[&str]| -> Vec<OsString> {
            let mut v: Vec<OsString> = vec!["netpol-agent".into(), "--config".into()];
            v.push(conf.clone().into());
            v.push("run".into());
            v.extend(extra.iter().map(OsString::from));
            v
        };
        // The process environment is shared by the tests of this binary: only this test sets
        // these variables.
        let cli = parse_args_from(args(&["--frag-entries", "9"])).expect("parses");
        let super::super::Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.policy_entries, 77);
        assert_eq!(run.ignore_labels, ["a", "b"]);
        assert_eq!(run.frag_entries, 9, "a flag wins over the file");
        for v in [
            "NETPOL_POLICY_ENTRIES",
            "NETPOL_IGNORE_LABEL",
            "NETPOL_FRAG_ENTRIES",
        ] {
            std::env::remove_var(v);
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
