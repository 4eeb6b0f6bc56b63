use clap::Parser;
use clap::error::ErrorKind;

fn main() {
    let cli = match resnet_rs::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // Usage errors follow the same rule as every other error: one line, exit code 2. clap's tip ("a
            // similar argument exists") and the names of missing arguments are kept; its usage lines are not.
            eprintln!("{} (see --help)", one_line_usage_error(&e.to_string()));
            std::process::exit(2);
        }
    };
    match resnet_rs::cli::run(cli) {
        Ok(()) => {}
        // 128 + SIGINT, as shells report a Ctrl-C'd command; the message says how to resume.
        Err(e @ resnet_rs::Error::Interrupted { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        // The device, not the input: a missing or failing GPU, driver or CUDA library.
        Err(e @ resnet_rs::Error::Device(_)) => {
            eprintln!("error: {e}");
            std::process::exit(3);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// clap's multi-line usage error as one line: every line up to the usage summary, trimmed and joined.
fn one_line_usage_error(msg: &str) -> String {
    let parts: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    if parts.is_empty() { "error: invalid arguments".to_string() } else { parts.join(" ") }
}
