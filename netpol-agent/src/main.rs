fn main() {
    // The command line, after the settings file (`run`, `teardown`; see cli::config).
    let cli = match netpol_agent::cli::config::parse_args() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let is_daemon = matches!(cli.command, netpol_agent::cli::Command::Run(_));
    if !is_daemon {
        // The client commands log only warnings; the daemon configures its own logging.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter("warn")
            .try_init();
    }
    match netpol_agent::cli::main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
