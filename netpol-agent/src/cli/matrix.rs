//! `policy matrix [--project P]`: who may talk to whom among the running containers, the host and
//! the world (rows: from, columns: to; ports in the cells, `-` none, `*` all), computed cell by
//! cell with the same lookup as `policy trace`.

use std::path::Path;

use clap::{Args, ValueEnum};

use super::{print_json, table, trace::OfflineArgs};
use crate::{
    daemon::api::{call, Request},
    policy::trace::Matrix,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum MatrixOutput {
    #[default]
    Table,
    Json,
    /// A Graphviz digraph (`| dot -Tsvg > matrix.svg`).
    Dot,
}

#[derive(Args, Debug)]
pub struct MatrixArgs {
    /// Only the containers of this compose project (rows named by service).
    #[arg(long, short = 'p')]
    pub project: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: MatrixOutput,
    #[command(flatten)]
    pub offline: OfflineArgs,
}

pub fn run(args: MatrixArgs, socket: &Path) -> anyhow::Result<i32> {
    let m: Matrix = if args.offline.offline {
        args.offline.world()?.matrix(args.project.as_deref())?
    } else {
        serde_json::from_value(call(
            socket,
            &Request::PolicyMatrix {
                project: args.project.clone(),
            },
        )?)?
    };
    match args.output {
        MatrixOutput::Json => print_json(&serde_json::to_value(&m)?)?,
        MatrixOutput::Dot => print!("{}", m.render_dot()),
        MatrixOutput::Table => {
            let (header, rows) = m.render_table();
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            print!("{}", table::render(&header, &rows));
        }
    }
    Ok(0)
}
