use std::path::Path;

use clap::Subcommand;

use super::{print_json, table, Output};
use crate::daemon::api::{call, EndpointRow, Request};

#[derive(Subcommand, Debug)]
pub enum EndpointCmd {
    /// Every container the agent knows, enforced or not (with the reason).
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn run(cmd: EndpointCmd, socket: &Path) -> anyhow::Result<i32> {
    let EndpointCmd::List { output } = cmd;
    let data = call(socket, &Request::EndpointList)?;
    if output == Output::Json {
        print_json(&data)?;
        return Ok(0);
    }
    let rows: Vec<EndpointRow> = serde_json::from_value(data)?;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.network.clone(),
                r.identity
                    .map_or("-".into(), |i| format!("{i} ({})", r.identity_name)),
                opt(&r.ipv4),
                opt(&r.ipv6),
                if r.ingress_enforced {
                    "enforced".into()
                } else {
                    "open".into()
                },
                if r.egress_enforced {
                    "enforced".into()
                } else {
                    "open".into()
                },
                r.state.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "CONTAINER",
                "NETWORK",
                "IDENTITY",
                "IPV4",
                "IPV6",
                "INGRESS",
                "EGRESS",
                "STATE"
            ],
            &cells
        )
    );
    Ok(0)
}
