use std::path::Path;

use clap::Subcommand;

use super::{print_json, table, Output};
use crate::daemon::api::{call, IdentityRow, Request};

#[derive(Subcommand, Debug)]
pub enum IdentityCmd {
    /// Reserved and label identities, with their labels.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn run(cmd: IdentityCmd, socket: &Path) -> anyhow::Result<i32> {
    let IdentityCmd::List { output } = cmd;
    let data = call(socket, &Request::IdentityList)?;
    if output == Output::Json {
        print_json(&data)?;
        return Ok(0);
    }
    let rows: Vec<IdentityRow> = serde_json::from_value(data)?;
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.containers.to_string(),
                labels.join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["ID", "NAME", "CONTAINERS", "LABELS"], &cells)
    );
    Ok(0)
}
