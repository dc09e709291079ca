//! `tptt generate` and `tptt chat`: streaming generation on the engine's [`Session`], with
//! state snapshots.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;
use tptt_engine::session::{CancelToken, Event, GenerateOptions, Session, SessionOptions};
use tptt_engine::snapshot;
use tptt_engine::template::Message;
use tptt_engine::SamplingParams;
use tptt_engine::{ChatFiles, ChatModel, ChatTranscript};

use crate::{load_model, variant_files, GenArgs, ModelArgs};

/// The variant loaded for chatting ([`ChatModel`]), named by its repository's folder in
/// snapshots.
pub(crate) fn ready(args: &ModelArgs) -> Result<ChatModel> {
    // The tokenizer first: it fails fast, and the weights reuse what its parse freed.
    let files = variant_files(args)?;
    let parts = ChatFiles::read(&files)?;
    let model = load_model(args, &files)?;
    let root = files.dir.parent().unwrap_or(&files.dir);
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    Ok(ChatModel::from_parts(
        model,
        parts,
        &files,
        root.display().to_string(),
    )?)
}

fn options(gen: &GenArgs, ready: &ChatModel) -> Result<GenerateOptions> {
    let mut p = if gen.greedy {
        SamplingParams::greedy()
    } else {
        SamplingParams::default()
    };
    if let Some(t) = gen.temperature {
        p.temperature = t;
    }
    if let Some(k) = gen.top_k {
        p.top_k = k;
    }
    if let Some(x) = gen.top_p {
        p.top_p = x;
    }
    if let Some(x) = gen.min_p {
        p.min_p = x;
    }
    if let Some(x) = gen.repeat_penalty {
        p.repeat_penalty = x;
    }
    if let Some(x) = gen.repeat_last_n {
        p.repeat_last_n = x;
    }
    p.seed = gen.seed.or(p.seed);
    p.max_new_tokens = gen.max_new_tokens;
    p.validate()?;
    let mut stop_strings = gen.stop.clone();
    if gen.chat {
        // The Alpaca format's section headers end a response; Jinja formats have none.
        stop_strings.extend(ready.format.stop_strings().iter().map(|s| s.to_string()));
    }
    Ok(GenerateOptions {
        params: p,
        eos_ids: ready.eos_ids.clone(),
        ignore_eos: gen.ignore_eos,
        stop_strings,
        skip_special_tokens: true,
    })
}

fn new_session(ready: &ChatModel, gen: &GenArgs, load_state: Option<&Path>) -> Result<Session> {
    let kv = ready.model.kv_format(gen.kv).context("--kv")?;
    match load_state {
        Some(p) => {
            let mut s = snapshot::load(ready.model.clone(), &ready.identity, p)?;
            // The snapshot's cache keeps its own format: stored from now on as asked.
            s.state.set_kv_format(kv)?;
            if let Some(w) = gen.window {
                if s.state.window != Some(w) {
                    eprintln!(
                        "note: the saved state keeps its softmax window {:?}; --window {w} ignored",
                        s.state.window
                    );
                }
            }
            Ok(s)
        }
        None => Ok(Session::new(
            ready.model.clone(),
            SessionOptions {
                window: gen.window,
                kv_format: kv,
                ..Default::default()
            },
        )),
    }
}

fn encode(tok: &Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, add_special)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// `tptt generate`.
pub fn generate(
    args: &ModelArgs,
    prompt: &str,
    gen: &GenArgs,
    load_state: Option<&Path>,
    save_state: Option<&Path>,
    print_ids: bool,
) -> Result<()> {
    let ready = ready(args)?;
    let opts = options(gen, &ready)?;
    let mut session = new_session(&ready, gen, load_state)?;
    let fresh = session.tokens.is_empty();
    let ids = if gen.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &gen.system {
            msgs.push(Message::system(s.clone()));
        }
        msgs.push(Message::user(prompt.to_string()));
        let text = ready.format.render(&msgs, true)?;
        encode(
            &ready.tokenizer,
            &text,
            fresh && ready.format.add_special_tokens(),
        )?
    } else if prompt.is_empty() {
        Vec::new()
    } else {
        encode(&ready.tokenizer, prompt, fresh)?
    };
    if ids.is_empty() && session.last_logits.is_none() {
        bail!("the prompt is empty and there is no loaded state to continue from");
    }
    let cancel = CancelToken::new();
    let mut out = std::io::stdout();
    let mut sink = |e: Event| {
        let Event::Token { text, .. } = e else {
            return;
        };
        if !print_ids {
            let _ = write!(out, "{text}");
            let _ = out.flush();
        }
    };
    let outcome = session.generate(&ids, &opts, &ready.tokenizer, &cancel, &mut sink)?;
    if print_ids {
        let line: Vec<String> = outcome.ids.iter().map(u32::to_string).collect();
        println!("{}", line.join(","));
    } else {
        println!();
    }
    let s = &outcome.stats;
    eprintln!(
        "[{} prompt tokens, {} generated ({:?}); ttft {:.3}s, prefill {:.1} tok/s, decode {:.1} tok/s]",
        s.prompt_tokens,
        s.generated_tokens,
        outcome.finish,
        s.time_to_first_token.as_secs_f64(),
        s.prefill_tokens_per_s,
        s.decode_tokens_per_s
    );
    if let Some(p) = save_state {
        let bytes = snapshot::save(&session, &ready.identity, p)?;
        eprintln!(
            "[state saved to {} ({} tokens, {:.2} MB)]",
            p.display(),
            session.state.pos,
            bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// `tptt chat`.
pub fn chat(args: &ModelArgs, gen: &GenArgs, load_state: Option<&Path>) -> Result<()> {
    let ready = ready(args)?;
    let mut gen = gen.clone();
    gen.chat = true;
    let opts = options(&gen, &ready)?;
    let mut session = new_session(&ready, &gen, load_state)?;
    let mut messages: Vec<Message> = gen
        .system
        .iter()
        .map(|s| Message::system(s.clone()))
        .collect();
    // The rendered text the session has read, to feed only what each turn adds.
    let mut transcript = if session.tokens.is_empty() {
        ChatTranscript::fresh()
    } else {
        ChatTranscript::unknown()
    };
    let window = session
        .state
        .window
        .map(|w| w.to_string())
        .unwrap_or_else(|| "unbounded".into());
    eprintln!(
        "TPTT chat — {} [{}], softmax window {window}. /save FILE, /load FILE, /reset, /quit.",
        ready.identity.model, ready.identity.variant
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('/') {
            let (cmd, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            match cmd {
                "quit" | "exit" => break,
                "reset" => {
                    session = new_session(&ready, &gen, None)?;
                    messages.retain(|m| m.role == tptt_engine::Role::System);
                    transcript = ChatTranscript::fresh();
                    eprintln!("[new conversation]");
                }
                "save" if !arg.is_empty() => {
                    match snapshot::save(&session, &ready.identity, Path::new(arg)) {
                        Ok(b) => eprintln!(
                            "[saved {} tokens, {:.2} MB]",
                            session.state.pos,
                            b as f64 / 1e6
                        ),
                        Err(e) => eprintln!("error: {e}"),
                    }
                }
                "load" if !arg.is_empty() => {
                    match snapshot::load(ready.model.clone(), &ready.identity, Path::new(arg)) {
                        Ok(s) => {
                            eprintln!(
                                "[loaded {} tokens; earlier turns live in the model's memory]",
                                s.state.pos
                            );
                            session = s;
                            messages.retain(|m| m.role == tptt_engine::Role::System);
                            transcript = ChatTranscript::unknown();
                        }
                        Err(e) => eprintln!("error: {e}"),
                    }
                }
                _ => eprintln!("commands: /save FILE, /load FILE, /reset, /quit"),
            }
            continue;
        }
        messages.push(Message::user(line));
        // Feed only what this turn adds to the text already read, or else the new turn rendered
        // on its own (the state keeps the earlier turns): tptt_engine::chat.
        let turn = transcript.turn(&ready.format, &messages, 1)?;
        let ids = encode(
            &ready.tokenizer,
            &turn.text,
            session.tokens.is_empty() && ready.format.add_special_tokens(),
        )?;
        let cancel = CancelToken::new();
        let mut sink = |e: Event| {
            let Event::Token { text, .. } = e else {
                return;
            };
            let _ = write!(out, "{text}");
            let _ = out.flush();
        };
        match session.generate(&ids, &opts, &ready.tokenizer, &cancel, &mut sink) {
            Ok(o) => {
                println!();
                let raw = ready
                    .tokenizer
                    .decode(&o.ids, false)
                    .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
                messages.push(Message::assistant(o.text.clone()));
                transcript.record(&turn, &raw, &o.finish);
                let s = &o.stats;
                eprintln!(
                    "[{} tokens, {:.1} tok/s, ttft {:.2}s; memory: {} tokens read, {} in the softmax window]",
                    s.generated_tokens,
                    s.decode_tokens_per_s,
                    s.time_to_first_token.as_secs_f64(),
                    session.state.pos,
                    session.state.kv_len()
                );
            }
            Err(e) => {
                transcript.forget();
                eprintln!("\nerror: {e}")
            }
        }
    }
    Ok(())
}
