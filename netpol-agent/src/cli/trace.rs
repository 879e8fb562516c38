//! `policy trace FROM TO[:PORT[/PROTO]]`: can FROM open a connection to TO? Both halves (FROM's
//! egress, TO's ingress), the rule that decides each and why, computed with the datapath's own
//! lookup (see `policy::trace`) over the maps as they are now, or `--offline` over policy files
//! for described containers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{print_json, Output};
use crate::{
    daemon::api::{call, Request},
    identity::{LabelFilter, Labels, COMPOSE_PROJECT, COMPOSE_SERVICE},
    policy::trace::{self, parse_target, Cell, OfflineContainer, PeerRef, Trace, World},
};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// A container name or id, SERVICE, PROJECT/SERVICE, `host`, `world` or an IP address.
    pub from: String,
    /// The same, with `:PORT` (TCP), `:PORT/udp`, `:PORT/sctp`, `:icmp` (echo) or `:TYPE/icmp`;
    /// without a port: every port the pair may use. IPv6 with a port: `[fd00::2]:80`.
    pub to: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub offline: OfflineArgs,
}

/// `--offline`: policy files and a description of the containers instead of the agent.
#[derive(Args, Debug, Default)]
pub struct OfflineArgs {
    /// Compute from policy files for described containers (no agent needed) instead of the
    /// agent's maps.
    #[arg(long)]
    pub offline: bool,
    /// Policy files (CiliumNetworkPolicy YAML).
    #[arg(short = 'f', long = "filename", requires = "offline")]
    pub files: Vec<PathBuf>,
    /// A container: `NAME=KEY=VALUE,KEY=VALUE…` (its Docker labels; `ip=ADDRESS` sets its
    /// address, else one of 192.0.2.0/24). Repeatable.
    #[arg(long = "container", requires = "offline")]
    pub containers: Vec<String>,
    /// A compose file: every service is a container `PROJECT-SERVICE-1` with the compose
    /// project and service labels and the service's own `labels` (netpol.* included).
    #[arg(long, requires = "offline")]
    pub compose: Option<PathBuf>,
    /// The compose project (default: the compose file's directory name, as compose does).
    #[arg(long, requires = "compose")]
    pub compose_project: Option<String>,
    /// Labels left out of identities, as the agent's `run --ignore-label`.
    #[arg(long = "ignore-label", requires = "offline")]
    pub ignore_label: Vec<String>,
}

impl OfflineArgs {
    /// The world the agent would make of the files and containers; label errors and warnings
    /// go to stderr.
    pub fn world(&self) -> anyhow::Result<World> {
        let filter = LabelFilter::checked(&self.ignore_label)?;
        let mut policies = Vec::new();
        let mut errors = Vec::new();
        for f in &self.files {
            match crate::policy::parse_file_with(f, &filter) {
                Ok(p) => policies.extend(p),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("\n"));
        }
        let mut containers = Vec::new();
        if let Some(path) = &self.compose {
            containers.extend(compose_containers(path, self.compose_project.as_deref())?);
        }
        for c in &self.containers {
            containers.push(trace::parse_container_arg(c).map_err(anyhow::Error::msg)?);
        }
        if containers.is_empty() {
            anyhow::bail!(
                "--offline needs containers: --container NAME=KEY=VALUE,… or --compose FILE"
            );
        }
        let (w, notes) = trace::offline(&policies, &containers, &filter)?;
        for (c, n) in notes {
            eprintln!("{c}: {n}");
        }
        Ok(w)
    }
}

/// The services of a compose file as containers, with the labels compose would give them.
pub fn compose_containers(
    path: &Path,
    project: Option<&str>,
) -> anyhow::Result<Vec<OfflineContainer>> {
    use yaml_rust2::{Yaml, YamlLoader};
    let text = crate::policy::read_file(path)?;
    let docs = YamlLoader::load_from_str(&text).with_context(|| path.display().to_string())?;
    let project = match project {
        Some(p) => p.to_owned(),
        None => {
            let dir = std::fs::canonicalize(path)?
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            dir.to_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect()
        }
    };
    let scalar = |y: &Yaml| match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        Yaml::Null => Some(String::new()),
        _ => None,
    };
    let services = docs
        .first()
        .map(|d| &d["services"])
        .and_then(Yaml::as_hash)
        .with_context(|| format!("{}: no `services`", path.display()))?;
    let mut out = Vec::new();
    for (name, svc) in services {
        let service = scalar(name).context("a service name that is not a string")?;
        let mut labels = Labels::new();
        labels.insert(COMPOSE_PROJECT.into(), project.clone());
        labels.insert(COMPOSE_SERVICE.into(), service.clone());
        match &svc["labels"] {
            Yaml::Hash(h) => {
                for (k, v) in h {
                    let (Some(k), Some(v)) = (scalar(k), scalar(v)) else {
                        anyhow::bail!(
                            "{}: services.{service}.labels: not a string",
                            path.display()
                        );
                    };
                    labels.insert(k, v);
                }
            }
            Yaml::Array(a) => {
                for item in a {
                    let kv = scalar(item).with_context(|| {
                        format!(
                            "{}: services.{service}.labels: not a string",
                            path.display()
                        )
                    })?;
                    let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                    labels.insert(k.to_owned(), v.to_owned());
                }
            }
            Yaml::BadValue | Yaml::Null => {}
            _ => anyhow::bail!(
                "{}: services.{service}.labels: not a map or list",
                path.display()
            ),
        }
        let name = svc["container_name"]
            .as_str()
            .map_or_else(|| format!("{project}-{service}-1"), str::to_owned);
        out.push(OfflineContainer {
            name,
            labels,
            addr: None,
        });
    }
    Ok(out)
}

pub fn run(args: TraceArgs, socket: &Path) -> anyhow::Result<i32> {
    let (to, l4) = parse_target(&args.to)?;
    let data = if args.offline.offline {
        let w = args.offline.world()?;
        let from = PeerRef::parse(&args.from);
        match l4 {
            Some(l4) => serde_json::to_value(w.trace(&from, &to, l4)?)?,
            None => serde_json::to_value(w.trace_all(&from, &to)?)?,
        }
    } else {
        call(
            socket,
            &Request::PolicyTrace {
                from: args.from.clone(),
                to: args.to.clone(),
            },
        )?
    };
    if args.output == Output::Json {
        print_json(&data)?;
        return Ok(0);
    }
    if l4.is_some() {
        let t: Trace = serde_json::from_value(data)?;
        print!("{}", t.render());
    } else {
        let c: Cell = serde_json::from_value(data)?;
        let addr = |a: &Option<String>| a.as_ref().map_or(String::new(), |a| format!(" ({a})"));
        println!(
            "{}{} -> {}{}: {}",
            c.from,
            addr(&c.from_addr),
            c.to,
            addr(&c.to_addr),
            if c.ports.is_empty() {
                "nothing is allowed".to_owned()
            } else {
                format!("allowed {}", c.text)
            }
        );
    }
    Ok(0)
}
