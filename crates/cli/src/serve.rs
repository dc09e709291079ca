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
    /// How conversations store their softmax KV cache: auto (8-bit where the model's heads
    /// allow, else f16), q8_0, f16 or f32 (exact).
    #[arg(long, default_value = "auto", value_parser = crate::parse_kv)]
    kv: tptt::state::KvChoice,
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
    // The variant is resolved now (a wrong folder or variant fails at once); its weights load
    // in the background while the server already answers (503 `model_loading` meanwhile).
    let variant = tptt::repo::TpttRepo::open(&args.model.repo)?
        .variant(args.model.variant.as_deref(), args.model.base.as_deref())?
        .name;
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let repo =
            std::fs::canonicalize(&args.model.repo).unwrap_or_else(|_| args.model.repo.clone());
        let repo = repo
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tptt".into());
        format!("{repo}/{variant}")
    });
    let cfg = tptt_api::ApiConfig {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_sessions: args.max_sessions,
        max_waiting: args.max_waiting,
        default_max_tokens: args.default_max_tokens.max(1),
        ..Default::default()
    };
    let host = tptt_api::LoadingHost::new(model_id.clone());
    let api = tptt_api::Api::new(host.clone(), cfg);
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
            "tptt serve: model {model_id} on http://{at}/v1 (OpenAI-compatible; loading the model; Ctrl-C stops)"
        );
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let (model, window, kv) = (args.model.clone(), args.window, args.kv);
        let loader_id = model_id.clone();
        std::thread::Builder::new()
            .name("model-load".into())
            .spawn(move || match load(&model, &loader_id, window, kv) {
                Ok(serving) => {
                    host.set(Ok(serving));
                    eprintln!("tptt serve: model loaded, serving requests");
                }
                Err(e) => {
                    host.set(Err(format!("{e:#}")));
                    let _ = failed_tx.send(e);
                }
            })
            .context("starting the model's loader")?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            axum_serve(listener, api, stop_rx),
        );
        match failed_rx.await {
            // A model that cannot load stops the server: it could never answer.
            Ok(e) => {
                let _ = stop_tx.send(());
                let _ = server.await;
                Err(e.context("the model could not be loaded"))
            }
            // Loaded: serve until the process ends.
            Err(_) => {
                server
                    .await
                    .context("the server failed")?
                    .context("the server stopped")?;
                drop(stop_tx);
                Ok(())
            }
        }
    })
}

/// Serves `api` until `stop` fires (or is dropped without firing: never).
async fn axum_serve(
    listener: tokio::net::TcpListener,
    api: std::sync::Arc<tptt_api::Api>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    tptt_api::serve_until(listener, api, async move {
        if stop.await.is_err() {
            std::future::pending::<()>().await;
        }
    })
    .await
}

/// The model of `args` loaded, with its own engine thread.
fn load(
    args: &ModelArgs,
    model_id: &str,
    window: Option<usize>,
    kv: tptt::state::KvChoice,
) -> Result<tptt_api::Serving> {
    let chat = crate::chat::ready(args)?;
    let kv_format = chat.model.kv_format(kv).context("--kv")?;
    let engine = tptt_engine::Engine::spawn(chat.tokenizer.clone())?;
    Ok(tptt_api::Serving {
        model_id: model_id.to_string(),
        chat,
        runner: std::sync::Arc::new(engine),
        window,
        kv_format,
    })
}
