//! The `tidings` command: parses flags, sets up logging, and hands off to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use tidings::cli::{self, Client};
use tidings::config::{Config, Overrides};

/// Tidings: a real-time hub for background work.
///
/// Jobs publish messages to channels; Tidings stores each channel's history durably and pushes
/// every new message to browsers (WebSocket, SSE, long-poll), terminals and webhooks. A reader
/// who joins late or reconnects gets exactly what it missed, in order, then the live stream.
#[derive(Parser, Debug)]
#[command(name = "tidings", version, propagate_version = true)]
struct Cli {
    /// The hub client commands talk to.
    #[arg(
        long,
        global = true,
        env = "TIDINGS_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// API key (or client token) sent as a Bearer credential.
    #[arg(long, global = true, env = "TIDINGS_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub (embedded store in ./tidings-data unless told otherwise).
    ///
    /// Configuration comes from --config (TOML), then TIDINGS__SECTION__KEY environment
    /// variables (e.g. TIDINGS__SERVER__LISTEN), then these flags. See tidings.example.toml.
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory of the embedded store.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Storage engine: "embedded" or redis://host:port/db.
        #[arg(long)]
        engine: Option<String>,
        /// Allow listening on a non-loopback address without API keys.
        #[arg(long)]
        insecure: bool,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Publish one message: DATA is JSON (text that is not JSON is sent as a string); "-" or
    /// nothing reads standard input.
    Publish {
        channel: String,
        data: Option<String>,
        /// Event name (default "message").
        #[arg(long)]
        event: Option<String>,
        /// Idempotency key: a second publish with the same id stores nothing.
        #[arg(long)]
        id: Option<String>,
    },
    /// Print a channel's messages as they arrive, one JSON object per line.
    Tail {
        channel: String,
        /// Start after this seq (0 = the whole retained history); default: new messages only.
        #[arg(long)]
        since: Option<u64>,
    },
    /// Start a run of JOB; with --follow, print its output live and exit with its exit code.
    Run {
        job: String,
        /// A declared job parameter, as name=value (repeatable).
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Print the run's output as it is printed and exit with the run's exit code.
        #[arg(long)]
        follow: bool,
    },
    /// Manage polled feeds.
    Feeds {
        #[command(subcommand)]
        command: FeedsCommand,
    },
    /// Manage webhooks: URLs that receive every message of matching channels, signed.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Load-test a hub running on this machine (loopback only): prints one JSON report to
    /// stdout and a summary line to stderr; exits non-zero if work is missing at --timeout.
    Bench {
        #[command(subcommand)]
        scenario: tidings::bench::Scenario,
    },
}

#[derive(Subcommand, Debug)]
enum FeedsCommand {
    /// Start polling a feed (persisted; publishes each new entry once to its channel).
    Add {
        name: String,
        url: String,
        /// Poll interval, e.g. 30s, 5m (default 30s, at least 1s).
        #[arg(long)]
        every: Option<String>,
        /// Channel to publish to (default feeds:NAME).
        #[arg(long)]
        channel: Option<String>,
    },
    /// List feeds with their poll state.
    List,
    /// Stop polling a feed added at run time (its history is kept).
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum WebhooksCommand {
    /// Register a URL for channel patterns; prints the webhook with its signing secret (shown
    /// only now: keep it to verify the `webhook-signature` header).
    Add {
        url: String,
        /// A channel name or prefix pattern such as `accounts:*` (repeatable, at least one).
        #[arg(long = "channel", required = true)]
        channels: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// First replay every matching channel's history after this seq (0 = all of it).
        #[arg(long)]
        since: Option<u64>,
    },
    /// List webhooks with their state, pending and failed deliveries.
    List,
    /// Delete a webhook (its pending deliveries are dropped).
    Rm { id: String },
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received; shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidings: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let client = Client::new(&cli.server, cli.key.clone());
    match cli.command {
        Command::Serve {
            config,
            listen,
            data,
            engine,
            insecure,
            check,
        } => {
            let overrides = Overrides {
                listen,
                data,
                engine,
                insecure,
            };
            let config = Config::load(config.as_deref(), &overrides)?;
            tidings::app::check_exposure(&config)?;
            if check {
                println!("configuration is valid");
                return Ok(());
            }
            // Signals are handled before anyone can learn the address, so a SIGTERM sent as
            // soon as the listening line appears still shuts down gracefully.
            let shutdown = CancellationToken::new();
            cancel_on_signals(shutdown.clone())?;
            let listener = tidings::app::bind(&config).await?;
            let addr = listener.local_addr().context("no local address")?;
            println!("tidings listening on http://{addr}");
            tidings::app::run(config, listener, shutdown).await?;
        }
        Command::Publish {
            channel,
            data,
            event,
            id,
        } => {
            let data = cli::message_data(data.as_deref())?;
            let result = cli::publish(&client, &channel, data, event, id).await?;
            println!("{result}");
        }
        Command::Tail { channel, since } => {
            let mut stdout = std::io::stdout();
            cli::tail(&client, &channel, since, &mut stdout).await?;
        }
        Command::Run {
            job,
            params,
            follow,
        } => {
            let run = cli::start_run(&client, &job, &params).await?;
            if !follow {
                println!("{run}");
                return Ok(());
            }
            let channel = run["channel"].as_str().unwrap_or_default().to_owned();
            eprintln!(
                "tidings: run {} of {job} started",
                run["id"].as_str().unwrap_or("?")
            );
            let code = cli::follow_run(
                &client,
                &channel,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
            .await?;
            std::process::exit(code);
        }
        Command::Feeds { command } => {
            let result = match command {
                FeedsCommand::Add {
                    name,
                    url,
                    every,
                    channel,
                } => {
                    let mut body = serde_json::json!({"name": name, "url": url});
                    if let Some(e) = every {
                        body["every"] = e.into();
                    }
                    if let Some(c) = channel {
                        body["channel"] = c.into();
                    }
                    cli::call(&client, reqwest::Method::POST, "/api/feeds", Some(body)).await?
                }
                FeedsCommand::List => {
                    cli::call(&client, reqwest::Method::GET, "/api/feeds", None).await?
                }
                FeedsCommand::Rm { name } => {
                    let path = format!("/api/feeds/{}", cli::encode_segment(&name));
                    cli::call(&client, reqwest::Method::DELETE, &path, None).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Webhooks { command } => {
            let result = match command {
                WebhooksCommand::Add {
                    url,
                    channels,
                    description,
                    since,
                } => {
                    let mut body = serde_json::json!({"url": url, "channels": channels});
                    if let Some(d) = description {
                        body["description"] = d.into();
                    }
                    if let Some(s) = since {
                        body["since"] = s.into();
                    }
                    cli::call(&client, reqwest::Method::POST, "/api/webhooks", Some(body)).await?
                }
                WebhooksCommand::List => {
                    cli::call(&client, reqwest::Method::GET, "/api/webhooks", None).await?
                }
                WebhooksCommand::Rm { id } => {
                    let path = format!("/api/webhooks/{}", cli::encode_segment(&id));
                    cli::call(&client, reqwest::Method::DELETE, &path, None).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Bench { scenario } => {
            tidings::bench::run(&client.server, client.key.clone(), scenario).await?;
        }
    }
    Ok(())
}
