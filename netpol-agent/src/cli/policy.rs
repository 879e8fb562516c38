use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{print_json, table, Output};
use crate::daemon::api::{call, PolicyRow, Request, SourceFile};

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Import policies (CiliumNetworkPolicy YAML); they persist across restarts and reboots.
    /// A file with any error changes nothing.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show imported policies, or one of them.
    Get {
        name: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete imported policies: by name, those a file defines (`-f`, as kubectl), or all.
    /// Every one must exist, else nothing is deleted.
    Delete {
        #[arg(required_unless_present_any = ["all", "filename"], conflicts_with_all = ["all", "filename"])]
        names: Vec<String>,
        /// The policies these files define (their metadata.name).
        #[arg(short = 'f', long, conflicts_with = "all")]
        filename: Vec<PathBuf>,
        #[arg(long)]
        all: bool,
    },
    /// Check policy files offline (no agent needed): exit status 1 and every error on stderr.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The policies in force as Kubernetes CiliumNetworkPolicies (compose labels mapped to pod
    /// labels, the compose project to a namespace).
    Export(super::export::ExportArgs),
    /// Policies (or compose labels) that allow exactly the flows the agent recorded.
    Suggest(super::suggest::SuggestArgs),
    /// Can FROM connect to TO[:PORT[/PROTO]]? The verdict of both halves and the rules that
    /// decide them, from the maps as they are now (or `--offline` from files).
    Trace(super::trace::TraceArgs),
    /// Who may talk to whom: containers (by compose service), host and world, ports in the cells.
    Matrix(super::matrix::MatrixArgs),
}

pub fn run(cmd: PolicyCmd, socket: &Path) -> anyhow::Result<i32> {
    match cmd {
        PolicyCmd::Export(args) => super::export::run(args, socket),
        PolicyCmd::Suggest(args) => super::suggest::run(args, socket),
        PolicyCmd::Trace(args) => super::trace::run(args, socket),
        PolicyCmd::Matrix(args) => super::matrix::run(args, socket),
        PolicyCmd::Import { files } => {
            let mut sources = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                sources.push(SourceFile {
                    path: f.display().to_string(),
                    text,
                });
            }
            let data = call(socket, &Request::PolicyImport { files: sources })?;
            let names: Vec<String> = serde_json::from_value(data)?;
            for n in names {
                println!("imported {n}");
            }
            Ok(0)
        }
        PolicyCmd::Get { name, output } => {
            let data = call(socket, &Request::PolicyGet { name: name.clone() })?;
            if output == Output::Json {
                print_json(&data)?;
                return Ok(0);
            }
            let rows: Vec<PolicyRow> = serde_json::from_value(data)?;
            if name.is_some() {
                for r in rows {
                    if let Some(e) = &r.error {
                        eprintln!("{}: {e}", r.source);
                    }
                    print!("{}", r.text);
                    if !r.text.ends_with('\n') {
                        println!();
                    }
                }
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        let state = r.error.clone().unwrap_or_else(|| "in force".into());
                        vec![r.name.clone(), r.source.clone(), state]
                    })
                    .collect();
                print!("{}", table::render(&["NAME", "SOURCE", "STATE"], &cells));
            }
            Ok(0)
        }
        PolicyCmd::Delete {
            mut names,
            filename,
            all,
        } => {
            if !filename.is_empty() {
                let mut errors = Vec::new();
                for f in &filename {
                    match crate::policy::parse_file(f) {
                        Ok(ps) => names.extend(ps.into_iter().map(|p| p.name)),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                if !errors.is_empty() {
                    anyhow::bail!("{}\nnothing was deleted", errors.join("\n"));
                }
                if names.is_empty() {
                    anyhow::bail!("the files define no policy; nothing was deleted");
                }
            }
            let data = call(socket, &Request::PolicyDelete { names, all })?;
            let names: Vec<String> = serde_json::from_value(data)?;
            for n in names {
                println!("deleted {n}");
            }
            Ok(0)
        }
        PolicyCmd::Validate { files } => {
            let errors = crate::policy::validate_files(&files);
            if errors.is_empty() {
                println!("{} file(s) valid", files.len());
                Ok(0)
            } else {
                for e in &errors {
                    eprintln!("{e}");
                }
                Ok(1)
            }
        }
    }
}
