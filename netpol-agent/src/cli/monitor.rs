use std::{io::BufRead, path::Path};

use clap::Args;

use crate::daemon::api::{connect, MonitorEvent, Request, Response};

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: crate::daemon::monitor_filter::MonitorFilter,
}

pub fn run(args: MonitorArgs, socket: &Path) -> anyhow::Result<i32> {
    let reader = connect(
        socket,
        &Request::Monitor {
            filter: args.filter,
        },
    )?;
    for line in reader.lines() {
        let line = line?;
        if let Ok(Response::Error { message }) = serde_json::from_str::<Response>(&line) {
            anyhow::bail!("{message}");
        }
        if args.json {
            println!("{line}");
            continue;
        }
        let Ok(e) = serde_json::from_str::<MonitorEvent>(&line) else {
            continue;
        };
        let what = match (&e.reason, e.kind.as_str()) {
            (Some(r), "audit") => format!("AUDIT ({r})"),
            (Some(r), _) => format!("DROP ({r})"),
            (None, _) => "FLOW".to_owned(),
        };
        let port = |p: u16| {
            if p == 0 {
                String::new()
            } else {
                format!(":{p}")
            }
        };
        println!(
            "{what:<24} {proto:<6} {src}{sp} ({sn}) -> {dst}{dp} ({dn}) on {ep} {dir}{rule}",
            proto = e.protocol,
            src = e.src,
            sp = port(e.sport),
            sn = e.src_name,
            dst = e.dst,
            dp = port(e.dport),
            dn = e.dst_name,
            ep = e.endpoint,
            dir = e.direction,
            rule = cause(&e),
        );
    }
    Ok(0)
}

/// What decided: ` policy=P rule=SECTION` for a rule (allow or deny), ` default-deny by=P1,P2`
/// for a default deny, ` not-enforced` for a flow in a direction no policy enforces, nothing for
/// other drops.
fn cause(e: &MonitorEvent) -> String {
    if let (Some(p), Some(s)) = (&e.policy, &e.section) {
        return format!(" policy={p} rule={s}");
    }
    if e.not_enforced {
        return " not-enforced".to_owned();
    }
    if e.reason.as_deref() == Some(netpol_common::DropReason::PolicyDenied.as_str()) {
        let by = if e.default_deny_by.is_empty() {
            "?".to_owned()
        } else {
            e.default_deny_by.join(",")
        };
        return format!(" default-deny by={by}");
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_name_the_policy_and_rule_or_the_default_deny() {
        let flow = MonitorEvent {
            kind: "flow".into(),
            policy: Some("db-ingress".into()),
            section: Some("ingress[0]".into()),
            ..MonitorEvent::default()
        };
        assert_eq!(cause(&flow), " policy=db-ingress rule=ingress[0]");
        let unenforced = MonitorEvent {
            kind: "flow".into(),
            not_enforced: true,
            ..MonitorEvent::default()
        };
        assert_eq!(cause(&unenforced), " not-enforced");
        let denied = MonitorEvent {
            kind: "drop".into(),
            reason: Some("policy-denied".into()),
            default_deny_by: vec!["db-ingress".into(), "app-egress".into()],
            ..MonitorEvent::default()
        };
        assert_eq!(cause(&denied), " default-deny by=db-ingress,app-egress");
        let unknown = MonitorEvent {
            reason: Some("policy-denied".into()),
            ..MonitorEvent::default()
        };
        assert_eq!(cause(&unknown), " default-deny by=?");
        let spoofed = MonitorEvent {
            reason: Some("spoofed-source".into()),
            ..MonitorEvent::default()
        };
        assert_eq!(cause(&spoofed), "");
    }
}
