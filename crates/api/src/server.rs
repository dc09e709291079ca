//! The HTTP server: routes, the key check, the queue in front of the one model, and a request's
//! generation on a blocking thread (streamed as server-sent events, or answered at the end).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::to_bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tptt_engine::session::{
    CancelToken, Event, FinishReason, GenerateOptions, Outcome, SessionOptions,
};
use tptt_engine::worker::Job;
use tptt_engine::{ChatModel, ChatTranscript, SamplingParams, Session};

use crate::error::ApiError;
use crate::host::{Host, Serving};
use crate::sessions::SessionCache;
use crate::wire::{self, Request};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The key clients must send as `Authorization: Bearer <key>` (`None`: no key).
    pub api_key: Option<String>,
    /// Requests that may wait for the model while one runs; more get 503.
    pub max_waiting: usize,
    /// Conversation states kept for resuming (see [`crate::sessions`]), and their bytes.
    pub max_sessions: usize,
    /// Bytes the kept states may hold together.
    pub max_session_bytes: usize,
    /// Tokens generated when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// Most tokens a request's prompt may hold (what the model reads for it).
    pub max_prompt_tokens: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            max_waiting: 16,
            max_sessions: 8,
            max_session_bytes: 2 << 30,
            default_max_tokens: 1024,
            max_prompt_tokens: 1 << 20,
            max_body_bytes: 8 << 20,
        }
    }
}

/// The server's state: where its model comes from, the queue, the kept conversations.
pub struct Api {
    host: Arc<dyn Host>,
    cfg: ApiConfig,
    sessions: Mutex<SessionCache>,
    gate: Arc<Semaphore>,
    waiting: AtomicUsize,
    serial: AtomicU64,
    cancelled: AtomicU64,
    /// Stopped ([`Api::stop`]): every request is refused, running ones are cancelled.
    stopped: CancelToken,
    /// The generations running or waiting, cancelled by [`Api::stop`].
    running: Mutex<Vec<CancelToken>>,
}

impl Api {
    /// A server of the model `host` serves, with `cfg`.
    pub fn new(host: Arc<dyn Host>, cfg: ApiConfig) -> Arc<Self> {
        Arc::new(Self {
            sessions: Mutex::new(SessionCache::new(cfg.max_sessions, cfg.max_session_bytes)),
            host,
            cfg,
            gate: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            serial: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            stopped: CancelToken::new(),
            running: Mutex::new(Vec::new()),
        })
    }

    /// Stops serving: requests from now on get a 503, running generations are cancelled (a
    /// server being shut down, whose open connections may outlive its listener).
    pub fn stop(&self) {
        self.stopped.cancel();
        if let Ok(mut r) = self.running.lock() {
            for c in r.drain(..) {
                c.cancel();
            }
        }
    }

    /// Requests given to the model so far.
    pub fn requests(&self) -> u64 {
        self.serial.load(Ordering::SeqCst)
    }

    /// Generations cancelled so far (their client went away).
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Conversation states kept now.
    pub fn kept_sessions(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    /// Drops every kept conversation state (the host's model changed: they hold its weights).
    pub fn forget_sessions(&self) {
        if let Ok(mut s) = self.sessions.lock() {
            s.clear();
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.cfg.api_key else {
            return Ok(());
        };
        let sent = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match sent {
            Some(s) if same_key(s.as_bytes(), key.as_bytes()) => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// Whether `sent` is `key`, in a time that does not depend on where they first differ (a
/// client timing its refusals learns nothing of the key but, at most, its length).
fn same_key(sent: &[u8], key: &[u8]) -> bool {
    sent.len() == key.len() && sent.iter().zip(key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`; anything
/// else is a 404 error object.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(unknown)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(api)
}

/// Serves `api` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, api: Arc<Api>) -> std::io::Result<()> {
    axum::serve(listener, router(api)).await
}

/// Serves `api` on `listener` until `stop` completes: then it accepts no more connections and
/// returns once those open have ended.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api))
        .with_graceful_shutdown(stop)
        .await
}

async fn unknown(uri: Uri) -> ApiError {
    ApiError::unknown_path(uri.path())
}

async fn wrong_method(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{method} is not allowed on {}: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.",
            uri.path()
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
}

async fn models(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(e) = api.authorized(&headers) {
        return e.into_response();
    }
    let data: Vec<Value> = api
        .host
        .model_id()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "tptt-chat"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The body, at most the configured size (413 beyond), once the key is checked.
async fn body_of(api: &Api, req: HttpRequest) -> Result<axum::body::Bytes, ApiError> {
    api.authorized(req.headers())?;
    let limit = api.cfg.max_body_bytes;
    to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than {limit} bytes (or was cut off)."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        })
}

async fn chat_completions(State(api): State<Arc<Api>>, req: HttpRequest) -> Response {
    let result = match body_of(&api, req).await {
        Ok(b) => match wire::chat_request(&b) {
            Ok(r) => run(api, r).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(api): State<Arc<Api>>, req: HttpRequest) -> Response {
    let result = match body_of(&api, req).await {
        Ok(b) => match wire::completion_request(&b) {
            Ok(r) => run(api, r).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A request counted among those waiting for the model until dropped.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// How many were waiting before it.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let ahead = count.fetch_add(1, Ordering::SeqCst);
        Self { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets its token when dropped: a client gone before its answer cancels the generation.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What a finished generation reports.
struct Done {
    text: String,
    finish: &'static str,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

impl Done {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// One request: queued behind the model, generated on a blocking thread.
async fn run(api: Arc<Api>, req: Request) -> Result<Response, ApiError> {
    match api.host.model_id() {
        Some(id) if id == req.model => {}
        Some(id) => return Err(ApiError::model_not_found(&req.model, &id)),
        // None chosen: the host says why.
        None => {
            return Err(api
                .host
                .serving()
                .err()
                .unwrap_or_else(|| ApiError::unavailable("No model is chosen.")))
        }
    }
    if api.stopped.is_cancelled() {
        return Err(ApiError::unavailable("The server is stopping."));
    }
    let cancel = CancelToken::new();
    let guard = CancelOnDrop(cancel.clone());
    if let Ok(mut r) = api.running.lock() {
        r.retain(|c| !c.is_cancelled());
        r.push(cancel.clone());
    }
    let permit = match api.gate.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            // Counted while it waits (a client gone while waiting leaves the count too).
            let waiting = Waiting::enter(&api.waiting);
            if waiting.ahead >= api.cfg.max_waiting {
                return Err(ApiError::busy(waiting.ahead));
            }
            let p = api.gate.clone().acquire_owned().await;
            drop(waiting);
            p.map_err(|_| ApiError::internal("the server is shutting down"))?
        }
    };
    // Asked once the request's turn has come: the host's model may have changed meanwhile.
    let serving = api.host.serving()?;
    if serving.model_id != req.model {
        return Err(ApiError::model_not_found(&req.model, &serving.model_id));
    }
    let serial = api.serial.fetch_add(1, Ordering::Relaxed);
    let chat = req.messages.is_some();
    let id = format!("{}-{serial}", if chat { "chatcmpl" } else { "cmpl" });
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let head = Head {
        id,
        created,
        model: serving.model_id.clone(),
        chat,
    };
    if req.stream {
        let (tx, rx) = mpsc::channel::<SseEvent>(64);
        let include_usage = req.include_usage;
        let stream_head = head.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let send = |e: SseEvent| tx.blocking_send(e).is_ok();
            if chat {
                send(stream_head.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            let mut on_text = |text: &str| {
                if !send(stream_head.chunk(stream_head.delta(text), None)) {
                    cancel.cancel();
                }
            };
            match generate(&api, &serving, &req, &cancel, &mut on_text) {
                Ok(done) => {
                    send(stream_head.chunk(stream_head.delta_end(), Some(done.finish)));
                    if include_usage {
                        let mut usage = stream_head.chunk_base();
                        usage["choices"] = json!([]);
                        usage["usage"] = done.usage();
                        send(SseEvent::default().data(usage.to_string()));
                    }
                    send(SseEvent::default().data("[DONE]"));
                }
                Err(e) => {
                    send(SseEvent::default().data(e.body().to_string()));
                }
            }
        });
        // The guard goes with the stream: a client that disconnects drops it.
        let stream = futures_util::stream::unfold((rx, guard), |(mut rx, g)| async move {
            rx.recv().await.map(|e| (Ok::<_, Infallible>(e), (rx, g)))
        });
        return Ok(Sse::new(stream).into_response());
    }
    let job = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        generate(&api, &serving, &req, &cancel, &mut |_| {})
    });
    let done = job
        .await
        .map_err(|e| ApiError::internal(format!("the generation failed: {e}")))??;
    drop(guard);
    let mut body = head.base();
    body["choices"] = if chat {
        json!([{"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": null, "finish_reason": done.finish}])
    } else {
        json!([{"index": 0, "text": done.text, "logprobs": null, "finish_reason": done.finish}])
    };
    body["usage"] = done.usage();
    Ok(Json(body).into_response())
}

/// The fields every response and chunk of one request shares.
#[derive(Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    chat: bool,
}

impl Head {
    fn base(&self) -> Value {
        let object = match self.chat {
            true => "chat.completion",
            false => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model})
    }

    /// [`Head::base`] of a streamed chunk.
    fn chunk_base(&self) -> Value {
        let mut v = self.base();
        if self.chat {
            v["object"] = json!("chat.completion.chunk");
        }
        v
    }

    fn delta(&self, text: &str) -> Value {
        json!({"content": text})
    }

    fn delta_end(&self) -> Value {
        json!({})
    }

    /// One streamed chunk: a chat delta, or a completion's text.
    fn chunk(&self, delta: Value, finish: Option<&str>) -> SseEvent {
        let mut v = self.chunk_base();
        let choice = if self.chat {
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        v["choices"] = json!([choice]);
        SseEvent::default().data(v.to_string())
    }
}

/// The sampling of a request: OpenAI's defaults (temperature 1, top-p 1, no other filter).
fn options(api: &Api, chat: &ChatModel, req: &Request) -> Result<GenerateOptions, ApiError> {
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: req.top_p.unwrap_or(1.0),
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: req.seed,
        max_new_tokens: req.max_tokens.unwrap_or(api.cfg.default_max_tokens),
    };
    params
        .validate()
        .map_err(|e| ApiError::bad_request(None, e.to_string()))?;
    let mut stop_strings = req.stop.clone();
    if req.messages.is_some() {
        stop_strings.extend(chat.format.stop_strings().iter().map(|s| s.to_string()));
    }
    Ok(GenerateOptions {
        params,
        eos_ids: chat.eos_ids.clone(),
        ignore_eos: false,
        stop_strings,
        skip_special_tokens: true,
    })
}

/// Generates the answer to `req` on `serving`'s runner (waiting for it on the calling,
/// blocking thread): a kept conversation state whose text the request's conversation starts
/// with is continued (only the rest is read), else a fresh one; `on_text` gets the answer's
/// text as it comes.
fn generate(
    api: &Api,
    serving: &Serving,
    req: &Request,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str),
) -> Result<Done, ApiError> {
    let chat = &serving.chat;
    let opts = options(api, chat, req)?;
    let fresh = || {
        Session::new(
            chat.model.clone(),
            SessionOptions {
                window: serving.window,
                kv_format: serving.kv_format,
                ..Default::default()
            },
        )
    };
    let mut taken = None;
    let (session, transcript, turn) = match &req.messages {
        Some(messages) => {
            let full = chat
                .format
                .render(messages, true)
                .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
            let kept = api
                .sessions
                .lock()
                .ok()
                .and_then(|mut s| s.take(&full, &chat.model));
            let (session, transcript) = match kept {
                Some((mark, session)) => {
                    taken = Some(mark);
                    (session, ChatTranscript::from_mark(Some(mark)))
                }
                None => (fresh(), ChatTranscript::fresh()),
            };
            let turn = transcript
                .turn(&chat.format, messages, 1)
                .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
            (session, Some(transcript), TurnText::Chat(turn))
        }
        None => (fresh(), None, TurnText::Plain(req.prompt.clone())),
    };
    let cached_tokens = session.tokens.len();
    let add_special =
        session.tokens.is_empty() && (req.messages.is_none() || chat.format.add_special_tokens());
    let text = turn.text();
    let ids = chat
        .tokenizer
        .encode(text, add_special)
        .map_err(|e| ApiError::bad_request(None, format!("the prompt cannot be tokenized: {e}")))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        return Err(ApiError::bad_request(
            Some("prompt"),
            "The prompt is empty.",
        ));
    }
    if cached_tokens + ids.len() > api.cfg.max_prompt_tokens {
        // Refused before anything was read: the kept state goes back, unchanged.
        if let (Some(mark), Ok(mut kept)) = (taken, api.sessions.lock()) {
            kept.put(mark, session);
        }
        return Err(ApiError::bad_request(
            Some(if req.messages.is_some() {
                "messages"
            } else {
                "prompt"
            }),
            format!(
                "The prompt holds {} tokens; this server reads at most {}.",
                cached_tokens + ids.len(),
                api.cfg.max_prompt_tokens
            ),
        ));
    }
    let (session, outcome) = run_job(serving, session, ids, opts, cancel, on_text)?;
    if let (Some(mut transcript), TurnText::Chat(turn)) = (transcript, turn) {
        // The answer as the state read it (special tokens included); an answer that cannot be
        // decoded leaves the state's text unknown, and an unknown state is not kept (a wrong
        // mark would make a later request skip text the state never read, or read it twice).
        match chat.tokenizer.decode(&outcome.ids, false) {
            Ok(raw) => transcript.record(&turn, &raw, &outcome.finish),
            Err(e) => {
                tracing::warn!(error = %e, "the answer cannot be decoded: its state is not kept");
                transcript.forget();
            }
        }
        if let Some(mark) = transcript.mark() {
            if let Ok(mut kept) = api.sessions.lock() {
                kept.put(mark, session);
            }
        }
    }
    if outcome.finish == FinishReason::Cancelled {
        api.cancelled.fetch_add(1, Ordering::SeqCst);
        tracing::info!("a generation was cancelled: its client went away");
    }
    let finish = match outcome.finish {
        FinishReason::MaxTokens => "length",
        FinishReason::Eos | FinishReason::Stop(_) | FinishReason::Cancelled => "stop",
    };
    Ok(Done {
        text: outcome.text,
        finish,
        prompt_tokens: cached_tokens + outcome.stats.prompt_tokens,
        cached_tokens,
        completion_tokens: outcome.stats.generated_tokens,
    })
}

/// Runs one generation on `serving`'s runner, passing its text to `on_text` as it comes: the
/// session after it and the outcome. A job that failed or panicked loses its session (it may
/// hold half of what it read): the error is the request's.
fn run_job(
    serving: &Serving,
    session: Session,
    prompt: Vec<u32>,
    options: GenerateOptions,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str),
) -> Result<(Session, Outcome), ApiError> {
    let (text_tx, text_rx) = std::sync::mpsc::channel::<String>();
    let job = Job {
        session,
        prompt,
        options,
        sink: Box::new(move |e: Event| {
            if let Event::Token { text, .. } = e {
                if !text.is_empty() {
                    // The receiver lives until the job ends (below).
                    let _ = text_tx.send(text);
                }
            }
        }),
        cancel: cancel.clone(),
    };
    let done = serving
        .runner
        .submit(job)
        .map_err(|e| ApiError::internal(format!("the generation thread is gone: {e}")))?;
    // The text ends when the job drops its sink, as it ends.
    for text in text_rx {
        on_text(&text);
    }
    let result = done
        .recv()
        .map_err(|_| ApiError::internal("the generation thread stopped during the request"))?;
    let outcome = result
        .outcome
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let session = result
        .session
        .ok_or_else(|| ApiError::internal("the generation failed and lost its state"))?;
    Ok((session, outcome))
}

/// What a request's model reads: a chat turn (recorded afterwards), or a plain prompt.
enum TurnText {
    Chat(tptt_engine::ChatTurn),
    Plain(String),
}

impl TurnText {
    fn text(&self) -> &str {
        match self {
            TurnText::Chat(t) => &t.text,
            TurnText::Plain(p) => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_key;

    #[test]
    fn keys_match_only_when_equal() {
        assert!(same_key(b"sk-local", b"sk-local"));
        assert!(!same_key(b"sk-locaX", b"sk-local"));
        assert!(!same_key(b"sk-loca", b"sk-local"));
        assert!(!same_key(b"", b"sk-local"));
        assert!(same_key(b"", b""));
    }
}
