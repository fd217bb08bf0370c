//! `ch-remote`: drives an Hourglass (or Cloud Hypervisor) VMM through its HTTP API socket.
//!
//! A drop-in for Cloud Hypervisor's client for the commands Hourglass serves, with the same
//! option syntax (`restore source_url=file:///snap,resume=true`) and the same output: the JSON
//! answer of `ping` and `info` on stdout; on failure, the chain of errors (the server's causes
//! included) on stderr and exit status 1. Hourglass extensions: `resume [clock_policy=frozen]`,
//! `clock_policy=` on `restore` and `receive-migration`.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm::api::client::api_request;
use vmm::api::{
    ReceiveMigrationConfig, RestoreConfig, ResumeConfig, SendMigrationConfig, SnapshotConfig,
};

#[derive(Parser, Debug)]
#[command(
    name = "ch-remote",
    version,
    about = "Remotely control an Hourglass (or Cloud Hypervisor) VMM.",
    arg_required_else_help = true
)]
struct Cli {
    /// HTTP API socket path (UNIX domain socket).
    #[arg(long = "api-socket", value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Info on the VM
    Info,
    /// Pause the VM
    Pause,
    /// Ping the VMM to check for API server availability
    Ping,
    /// Receive a VM migration
    #[command(name = "receive-migration")]
    ReceiveMigration {
        /// "<receiver_url>" or "receiver_url=<url>[,memory_mode=precopy]
        /// [,clock_policy=wallclock|frozen]"; the URL is unix:<path> or tcp:<host>:<port>
        receive_migration_config: String,
    },
    /// Restore VM from a snapshot
    Restore {
        /// "source_url=file:///<dir>[,prefault=on|off][,memory_restore_mode=copy|ondemand]
        /// [,resume=true|false][,clock_policy=wallclock|frozen]"
        restore_config: String,
    },
    /// Resume the VM
    Resume {
        /// Hourglass extension: "clock_policy=wallclock|frozen"
        resume_config: Option<String>,
    },
    /// Initiate a VM migration
    #[command(name = "send-migration")]
    SendMigration {
        /// "<destination_url>" or "destination_url=<url>[,local=on|off][,preserve_source=on|off]
        /// [,downtime_ms=<ms>][,timeout_s=<s>][,timeout_strategy=cancel|ignore]
        /// [,connections=<n>][,memory_mode=precopy]"; the URL is unix:<path> or tcp:<host>:<port>
        send_migration_config: String,
        /// Send memory by file descriptor over the local Unix socket (same as local=on)
        #[arg(long)]
        local: bool,
    },
    /// Shutdown the VM
    Shutdown,
    /// Shutdown the VMM
    #[command(name = "shutdown-vmm")]
    ShutdownVmm,
    /// Create a snapshot from VM
    Snapshot {
        /// file:///<directory>
        destination_url: String,
    },
}

/// An error answer from the server, shown like Cloud Hypervisor's client shows it.
#[derive(Debug)]
struct ServerResponse {
    status: u16,
    body: String,
}

impl fmt::Display for ServerResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Server responded with {} ({})",
            status_name(self.status),
            self.status
        )
    }
}

impl std::error::Error for ServerResponse {}

/// The names Cloud Hypervisor's client uses, extended with the codes Hourglass also sends.
fn status_name(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "Ok",
        204 => "NoContent",
        400 => "BadRequest",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        413 => "PayloadTooLarge",
        429 => "TooManyRequests",
        431 => "RequestHeaderFieldsTooLarge",
        500 => "InternalServerError",
        501 => "NotImplemented",
        _ => "Unknown",
    }
}

/// The request a command makes: method, endpoint, JSON body.
fn request(command: &Command) -> anyhow::Result<(&'static str, &'static str, Option<String>)> {
    let json = |v: serde_json::Result<String>| v.context("cannot serialize the request body");
    Ok(match command {
        Command::Ping => ("GET", "vmm.ping", None),
        Command::Info => ("GET", "vm.info", None),
        Command::Pause => ("PUT", "vm.pause", None),
        Command::Shutdown => ("PUT", "vm.shutdown", None),
        Command::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        Command::Resume { resume_config } => {
            // Cloud Hypervisor sends no body; so do we unless an option is given.
            let body = match resume_config {
                None => None,
                Some(s) => Some(json(serde_json::to_string(&ResumeConfig::from_options(
                    s,
                )?))?),
            };
            ("PUT", "vm.resume", body)
        }
        Command::Snapshot { destination_url } => {
            let c = SnapshotConfig::from_options(destination_url)?;
            ("PUT", "vm.snapshot", Some(json(serde_json::to_string(&c))?))
        }
        Command::Restore { restore_config } => {
            let c = RestoreConfig::from_options(restore_config)?;
            ("PUT", "vm.restore", Some(json(serde_json::to_string(&c))?))
        }
        Command::SendMigration {
            send_migration_config,
            local,
        } => {
            let mut options = send_migration_config.clone();
            if *local {
                options.push_str(",local=on");
            }
            let c = SendMigrationConfig::from_options(&options)?;
            (
                "PUT",
                "vm.send-migration",
                Some(json(serde_json::to_string(&c))?),
            )
        }
        Command::ReceiveMigration {
            receive_migration_config,
        } => {
            let c = ReceiveMigrationConfig::from_options(receive_migration_config)?;
            (
                "PUT",
                "vm.receive-migration",
                Some(json(serde_json::to_string(&c))?),
            )
        }
    })
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let (method, endpoint, body) = request(&cli.command)?;
    let (status, answer) = api_request(&cli.api_socket, method, endpoint, body.as_deref())
        .with_context(|| format!("the {endpoint} request failed"))?;
    if status == 200 || status == 204 {
        if !answer.is_empty() {
            // vm.info pretty-printed, as Cloud Hypervisor's client prints it (about 3 KB: one
            // line is unreadable); anything else, or what is not JSON, as received.
            let pretty = (endpoint == "vm.info")
                .then(|| serde_json::from_str::<serde_json::Value>(&answer).ok())
                .flatten()
                .and_then(|v| serde_json::to_string_pretty(&v).ok());
            println!("{}", pretty.as_deref().unwrap_or(&answer));
        }
        return Ok(());
    }
    Err(anyhow::Error::new(ServerResponse {
        status,
        body: answer,
    })
    .context(format!("the {endpoint} request failed")))
}

/// Prints the chain of errors as Cloud Hypervisor's tools do, expanding the server's causes.
fn print_error(err: &anyhow::Error) {
    let mut lines: Vec<String> = Vec::new();
    for cause in err.chain() {
        lines.push(cause.to_string());
        if let Some(server) = cause.downcast_ref::<ServerResponse>() {
            match serde_json::from_str::<Vec<String>>(&server.body) {
                Ok(causes) => lines.extend(causes),
                Err(e) => lines.push(format!(
                    "X: Can't get remote's error messages from JSON response: {e}: body='{}'",
                    server.body
                )),
            }
        }
    }
    if lines.len() == 1 {
        eprintln!("Error: ch-remote exited with the following error:");
        eprintln!("  {}", lines[0]);
    } else {
        eprintln!("Error: ch-remote exited with the following chain of errors:");
        for (level, line) in lines.iter().enumerate() {
            eprintln!("  {level}: {line}");
        }
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}
