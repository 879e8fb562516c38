use std::{io::BufRead, path::Path};

use clap::Args;

use crate::daemon::api::{connect, MonitorEvent, Request, Response};

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: MonitorArgs, socket: &Path) -> anyhow::Result<i32> {
    let reader = connect(socket, &Request::Monitor)?;
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
        let what = match &e.reason {
            Some(r) => format!("DROP ({r})"),
            None => "FLOW".to_owned(),
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
            rule = e
                .rule
                .as_deref()
                .map(|r| format!(" rule {r}"))
                .unwrap_or_default(),
        );
    }
    Ok(0)
}
