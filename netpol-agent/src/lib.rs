//! netpol-agent: watches Docker, assigns identities, persists policy and fills the BPF maps.
//!
//! Module map (only `datapath` touches aya):
//! - `datapath`: load, pin, adopt, attach; typed map access behind the [`datapath::Datapath`] trait.
//! - `docker`: bollard list + events → domain events; host veth discovery.
//! - `identity`: label sets → stable identity numbers.
//! - `policy`: CiliumNetworkPolicy subset and compose-label shorthand: parse, validate, compile.
//! - `store`: atomic persistence under `/var/lib/netpol/`.
//! - `reconcile`: desired state vs the maps, as a diff, applied whole or not at all.
//! - `metrics`: the Prometheus metrics (names, labels, one scrape's encoding).
//! - `daemon`: the `run` loop, the control socket and the metrics endpoint.
//! - `cli`: one file per subcommand.

pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod docker;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod store;
