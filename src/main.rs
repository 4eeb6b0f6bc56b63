use clap::Parser;
use clap::error::ErrorKind;

fn main() {
    let cli = match resnet_rs::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // Usage errors follow the same rule as every other error: one line, exit code 2.
            let msg = e.to_string();
            eprintln!("{} (see --help)", msg.lines().next().unwrap_or("error: invalid arguments"));
            std::process::exit(2);
        }
    };
    match resnet_rs::cli::run(cli) {
        Ok(()) => {}
        // 128 + SIGINT, as shells report a Ctrl-C'd command; the message says how to resume.
        Err(e @ resnet_rs::error::Error::Interrupted { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
