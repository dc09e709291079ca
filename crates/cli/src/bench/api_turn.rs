//! `api_turn_ttft_s`: the time to first token of the last turn of a long conversation sent
//! through the OpenAI-compatible API (`tptt_api`, in this process, on loopback), and the same
//! conversation sent to llama.cpp's `llama-server` on the GGUF when it is installed.
//!
//! The conversation is what a chat client sends: every request carries the whole history (the
//! previous user messages and each server's own answers) plus one new user message of about
//! [`MESSAGE_CHARS`] characters of the eval text, streamed, greedy, at most [`ANSWER_TOKENS`]
//! tokens. TTFT runs from sending the request to the first chunk with answer text (or the
//! finish, for an empty answer), measured by the client like any user would see it. Our
//! server continues a conversation it has seen from its saved recurrent state and reads only
//! the new message; llama-server reuses its KV cache for the common prefix (`cache_prompt`)
//! and attends over the whole history.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};

use tptt_api::{Api, ApiConfig, LoadingHost, Serving};
use tptt_engine::{ChatModel, Engine};

use super::*;

/// Turns of the conversation (the TTFT of the last one is the figure).
pub(super) const TURNS: usize = 20;
/// Turns with `--quick`.
pub(super) const QUICK_TURNS: usize = 5;
/// Characters of eval text per user message (~500 tokens).
pub(super) const MESSAGE_CHARS: usize = 2000;
/// Most tokens per answer.
pub(super) const ANSWER_TOKENS: u32 = 32;
/// How long one request may take before the run is called broken.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// One turn as the client saw it.
#[derive(Debug, Clone)]
pub(super) struct Turn {
    ttft_s: f64,
    total_s: f64,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    answer_chars: usize,
}

impl Turn {
    fn to_json(&self) -> Value {
        json!({
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "answer_chars": self.answer_chars,
        })
    }
}

/// The user messages: consecutive pieces of `text` (from the start again when it runs out).
pub(super) fn messages(text: &str, turns: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return (0..turns).map(|i| format!("Message {i}.")).collect();
    }
    (0..turns)
        .map(|i| {
            let piece: String = (0..MESSAGE_CHARS)
                .map(|k| chars[(i * MESSAGE_CHARS + k) % chars.len()])
                .collect();
            format!(
                "Here is part {} of a document. Say in one sentence what it is about.\n\n{piece}",
                i + 1
            )
        })
        .collect()
}

/// Sends the conversation to `url` (an OpenAI-compatible `/v1`), one turn after the other:
/// the turns served, and why the next one was not when one failed (a server whose context is
/// full refuses the rest of the conversation).
pub(super) fn converse(url: &str, model: &str, user: &[String]) -> (Vec<Turn>, Option<String>) {
    let mut turns = Vec::new();
    match converse_into(url, model, user, &mut turns) {
        Ok(()) => (turns, None),
        Err(e) => (turns, Some(format!("{e:#}"))),
    }
}

fn converse_into(url: &str, model: &str, user: &[String], turns: &mut Vec<Turn>) -> Result<()> {
    let client = reqwest::blocking::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("an HTTP client")?;
    let mut history: Vec<Value> = Vec::new();
    for (i, message) in user.iter().enumerate() {
        history.push(json!({"role": "user", "content": message}));
        let body = json!({
            "model": model,
            "messages": history,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0,
            "max_tokens": ANSWER_TOKENS,
        });
        let sent = Instant::now();
        let resp = client
            .post(format!("{url}/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .with_context(|| format!("turn {}: the request", i + 1))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().unwrap_or_default();
            bail!("turn {}: HTTP {status}: {}", i + 1, tail(&text, 3));
        }
        let mut first = None;
        let mut answer = String::new();
        let mut usage = Value::Null;
        for line in BufReader::new(resp).lines() {
            let line = line.with_context(|| format!("turn {}: reading the stream", i + 1))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data.trim() == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data)
                .with_context(|| format!("turn {}: a chunk that is not JSON: {data}", i + 1))?;
            if let Some(e) = v.get("error") {
                bail!("turn {}: the server failed: {e}", i + 1);
            }
            let choice = &v["choices"][0];
            let text = choice["delta"]["content"].as_str().unwrap_or_default();
            if first.is_none() && (!text.is_empty() || !choice["finish_reason"].is_null()) {
                first = Some(sent.elapsed());
            }
            answer.push_str(text);
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
        let total = sent.elapsed();
        let ttft = first.unwrap_or(total);
        turns.push(Turn {
            ttft_s: ttft.as_secs_f64(),
            total_s: total.as_secs_f64(),
            prompt_tokens: usage["prompt_tokens"].as_u64(),
            cached_tokens: usage["prompt_tokens_details"]["cached_tokens"].as_u64(),
            answer_chars: answer.chars().count(),
        });
        progress(format!(
            "[api] turn {}: TTFT {:.3} s, prompt {} tokens ({} cached)",
            i + 1,
            ttft.as_secs_f64(),
            usage["prompt_tokens"],
            usage["prompt_tokens_details"]["cached_tokens"]
        ));
        history.push(json!({"role": "assistant", "content": answer}));
    }
    Ok(())
}

/// The conversation's report: every turn served, the last one's TTFT, and why the rest was
/// not served (if so).
fn report(turns: &[Turn], failed: Option<String>, extra: Value) -> Value {
    let mut v = json!({
        "turns": turns.iter().map(Turn::to_json).collect::<Vec<_>>(),
        "turns_served": turns.len(),
        "last_turn_ttft_s": turns.last().map(|t| t.ttft_s),
        "first_turn_ttft_s": turns.first().map(|t| t.ttft_s),
        "refused": failed,
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

/// Our server on the subject (its own engine thread), in this process.
pub(super) fn ours(
    subject: &Subject,
    window: Option<usize>,
    kv_format: tptt::state::KvFormat,
    user: &[String],
) -> Result<Value> {
    let model = subject.model.clone();
    let chat = match &subject.files {
        Some(files) => ChatModel::new(model, files, subject.identity.model.clone())?,
        None => ChatModel::from_folder(model, &subject.dir, subject.identity.clone())?,
    };
    let engine = Engine::spawn(chat.tokenizer.clone())?;
    let host = LoadingHost::new("bench");
    host.set(Ok(Serving {
        model_id: "bench".into(),
        chat,
        runner: Arc::new(engine),
        window,
        kv_format,
    }));
    let api = Api::new(host, ApiConfig::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .enable_time()
        .build()
        .context("the server's runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        ))))
        .context("a loopback port")?;
    let at = listener.local_addr().context("the server's address")?;
    runtime.spawn(tptt_api::serve(listener, api));
    progress(format!(
        "[api] {} turns through our server at {at}",
        user.len()
    ));
    let (turns, failed) = converse(&format!("http://{at}/v1"), "bench", user);
    runtime.shutdown_background();
    if let Some(why) = failed {
        bail!("turn {} failed: {why}", turns.len() + 1);
    }
    Ok(report(
        &turns,
        None,
        json!({"server": "tptt serve (in process)"}),
    ))
}

/// Kills the server when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// llama.cpp's `llama-server` on the GGUF, the same conversation.
pub(super) fn llama_server(subject: &Subject, threads: usize, user: &[String]) -> Baseline {
    let Some(bin) = std::env::var_os("LLAMA_SERVER")
        .map(PathBuf::from)
        .or_else(|| on_path("llama-server"))
    else {
        return Baseline::Missing(
            "llama-server is not on PATH (set LLAMA_SERVER to its path)".into(),
        );
    };
    let Some(gguf) = find_gguf(subject) else {
        return Baseline::Missing(
            "no GGUF found next to the model or in ../.cache (set TPTT_BENCH_GGUF)".into(),
        );
    };
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => return Baseline::Missing(format!("no free loopback port: {e}")),
    };
    progress(format!(
        "[api] {} turns through {} -m {}",
        user.len(),
        bin.display(),
        gguf.display()
    ));
    let child = Command::new(&bin)
        .arg("-m")
        .arg(&gguf)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-t",
            &threads.to_string(),
            "-c",
            "32768",
            "-np",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => Killed(c),
        Err(e) => return Baseline::Missing(format!("cannot run {} ({e})", bin.display())),
    };
    let url = format!("http://127.0.0.1:{port}");
    let client = match reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => return Baseline::Missing(format!("an HTTP client: {e}")),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client
            .get(format!("{url}/health"))
            .send()
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Baseline::Missing("llama-server did not become ready within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (turns, failed) = converse(&format!("{url}/v1"), "gguf", user);
    drop(child);
    if turns.is_empty() {
        return Baseline::Missing(format!(
            "llama-server answered no turn: {}",
            failed.unwrap_or_default()
        ));
    }
    if let Some(why) = &failed {
        progress(format!(
            "[api] llama-server stopped at turn {}: {why}",
            turns.len() + 1
        ));
    }
    Baseline::Measured(report(
        &turns,
        failed,
        json!({"server": "llama-server", "gguf": gguf.display().to_string()}),
    ))
}

/// TTFT of turn `n` (1-based) in a report.
pub(super) fn ttft_of(report: &Baseline, n: usize) -> Option<f64> {
    match report {
        Baseline::Measured(v) => v["turns"].get(n.checked_sub(1)?)?["ttft_s"].as_f64(),
        Baseline::Missing(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_consecutive_pieces_and_wrap_around() {
        let m = messages("abcdef", 3);
        assert_eq!(m.len(), 3);
        let piece = |s: &str| s.rsplit("\n\n").next().map(str::to_string);
        assert_eq!(piece(&m[0]).map(|p| p.chars().count()), Some(MESSAGE_CHARS));
        assert!(m[0].contains("part 1") && m[2].contains("part 3"));
        assert_ne!(m[0], m[1], "each turn its own message");
        assert_eq!(
            messages("", 2).len(),
            2,
            "an empty text still gives messages"
        );
    }
}
