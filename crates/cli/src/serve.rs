//! `tptt serve`: the OpenAI-compatible API (`tptt_api`) on one loaded variant.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};

use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Anything but loopback needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The key clients must send (`Authorization: Bearer <key>`); also read from TPTT_API_KEY.
    #[arg(long, env = "TPTT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients name (default: the repository folder's name and the variant).
    #[arg(long)]
    model_id: Option<String>,
    /// Softmax window of new conversations (default: the variant's).
    #[arg(long)]
    window: Option<usize>,
    /// Conversation states kept for resuming.
    #[arg(long, default_value_t = 8)]
    max_sessions: usize,
    /// Requests that may wait while one runs (more get 503).
    #[arg(long, default_value_t = 16)]
    max_waiting: usize,
    /// Tokens generated when a request gives no max_tokens.
    #[arg(long, default_value_t = 1024)]
    default_max_tokens: usize,
}

pub(crate) fn run(args: &ServeArgs) -> Result<()> {
    let ip: IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host {:?} is not an IP address", args.host))?;
    if !ip.is_loopback() && args.api_key.as_deref().is_none_or(str::is_empty) {
        bail!(
            "--host {ip} is reachable from other machines: give an --api-key (or TPTT_API_KEY) to serve there"
        );
    }
    if let Some(w) = args.window {
        tptt::state::validate_window("--window", w).map_err(anyhow::Error::msg)?;
    }
    let chat = crate::chat::ready(&args.model)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let repo = args
            .model
            .repo
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tptt".into());
        format!("{repo}/{}", chat.identity.variant)
    });
    let mut cfg = tptt_api::ApiConfig::new(model_id.clone());
    cfg.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    cfg.window = args.window;
    cfg.max_sessions = args.max_sessions;
    cfg.max_waiting = args.max_waiting;
    cfg.default_max_tokens = args.default_max_tokens.max(1);
    let api = tptt_api::Api::new(chat, cfg);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .context("starting the server's runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, args.port))
            .await
            .with_context(|| format!("cannot listen on {ip}:{}", args.port))?;
        let at = listener.local_addr().context("the listening address")?;
        eprintln!(
            "tptt serve: model {model_id} on http://{at}/v1 (OpenAI-compatible; Ctrl-C stops)"
        );
        tptt_api::serve(listener, api)
            .await
            .context("the server stopped")
    })
}
