//! `policy suggest [--project P] [--since DURATION] [-o yaml|labels]`: policies that allow
//! exactly the flows the agent recorded (see `policy::suggest` and `daemon::flows`).

use std::path::Path;

use clap::Args;

use crate::{
    daemon::api::{call, Request},
    policy::suggest::SuggestFormat,
};

#[derive(Args, Debug)]
pub struct SuggestArgs {
    /// Only containers of this compose project get policies (their peers may be anyone).
    #[arg(long, short = 'p')]
    pub project: Option<String>,
    /// Only flows seen in this last stretch of time (`90s`, `10m`, `2h`, `1d`, `1h30m`).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<u64>,
    /// CiliumNetworkPolicy YAML, or compose labels (`netpol.ingress` / `netpol.egress`).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: SuggestFormat,
}

/// `1h30m` → seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {s:?} (e.g. 90s, 10m, 2h, 1d, 1h30m)");
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

pub fn run(args: SuggestArgs, socket: &Path) -> anyhow::Result<i32> {
    let data = call(
        socket,
        &Request::PolicySuggest {
            project: args.project,
            since_secs: args.since,
            format: args.output,
        },
    )?;
    print!("{}", serde_json::from_value::<String>(data)?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        for bad in ["", "10", "m", "5x", "0s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
