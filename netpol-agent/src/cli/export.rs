//! `policy export --namespace NS [NAME…]`: the policies in force (files, imports, compose labels)
//! as Kubernetes CiliumNetworkPolicies (see `policy::export` for the label mapping). `-f FILE…`
//! exports policy files offline instead, without an agent.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::daemon::api::{call, Request};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The Kubernetes namespace the compose project becomes (`metadata.namespace`).
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// Only these policies (their netpol name, e.g. `compose:shop/db`, or the exported one).
    pub names: Vec<String>,
    /// Export these policy files instead of the agent's policies in force (offline).
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: ExportArgs, socket: &Path) -> anyhow::Result<i32> {
    let yaml = if args.files.is_empty() {
        let data = call(
            socket,
            &Request::PolicyExport {
                namespace: args.namespace,
                names: args.names,
            },
        )?;
        serde_json::from_value::<String>(data)?
    } else {
        let mut policies = Vec::new();
        for f in &args.files {
            policies.extend(crate::policy::parse_file(f)?);
        }
        crate::policy::export::export(&policies, &args.namespace, &args.names)?
    };
    print!("{yaml}");
    Ok(0)
}
