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
        // A client command writing into a closed pipe (`netpol-agent status | head -1`) ends
        // quietly, as other Unix tools do, instead of panicking in println!. Only the client:
        // the daemon keeps ignoring SIGPIPE, so a client that goes away cannot kill it.
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
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
