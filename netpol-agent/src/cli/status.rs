use std::path::Path;

use super::{print_json, Output};
use crate::daemon::api::{call, Request};

pub fn run(output: Output, socket: &Path) -> anyhow::Result<i32> {
    let data = call(socket, &Request::Status)?;
    if output == Output::Json {
        print_json(&data)?;
        return Ok(0);
    }
    if let Some(obj) = data.as_object() {
        for (k, v) in obj {
            match v {
                serde_json::Value::String(s) => println!("{k}: {s}"),
                other => println!("{k}: {other}"),
            }
        }
    }
    Ok(0)
}
