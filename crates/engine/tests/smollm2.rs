//! The real SmolLM2-135M-Instruct (`TPTT_SMOLLM2_DIR`, see `crates/tptt/tests/smollm2.rs`):
//! the engine's `PromptFormat`, built from the model's own `tokenizer_config.json`, renders
//! `tests/fixtures/smollm2/reference.json`'s conversations exactly as transformers'
//! `apply_chat_template` did, they tokenize to the recorded ids, and greedy generation through a
//! `Session` with the base model (TPTT switched off) answers with transformers' recorded text.
//!
//! Without `TPTT_SMOLLM2_DIR` the tests say so and pass (the model cannot be committed).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tokenizers::Tokenizer;
use tptt::config::TpttSettings;
use tptt::model::{LoadOptions, Model};
use tptt_engine::{
    CancelToken, FinishReason, GenerateOptions, GenerationConfig, Message, PromptFormat,
    SamplingParams, Session, SessionOptions, TokenizerConfig,
};

fn model_dir() -> Option<PathBuf> {
    match std::env::var_os("TPTT_SMOLLM2_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!("TPTT_SMOLLM2_DIR is not set: skipping the real-model test (run scripts/smollm2/fetch.sh)");
            None
        }
    }
}

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference.json is committed"))
        .expect("valid JSON")
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).expect("messages as {role, content}")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn chat_template_renders_and_tokenizes_as_transformers() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let format = PromptFormat::from_tokenizer_config_file(&dir.join("tokenizer_config.json"))
        .expect("SmolLM2 template");
    assert!(
        matches!(format, PromptFormat::Jinja(_)),
        "SmolLM2 has a Jinja chat template"
    );
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    for (msgs, rendered, want_ids) in [
        ("prompt_messages", "rendered_prompt", "ids"),
        (
            "conversation_messages",
            "rendered_conversation",
            "conversation_ids",
        ),
    ] {
        let text = format.render(&messages(&r[msgs]), true).expect("render");
        assert_eq!(text, r[rendered].as_str().expect("text"), "{msgs}");
        let enc = tok
            .encode(text.as_str(), format.add_special_tokens())
            .expect("encode");
        assert_eq!(enc.get_ids(), ids(&r[want_ids]), "{msgs}: token ids");
    }
}

#[test]
fn base_model_session_answers_like_transformers() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let settings =
        TpttSettings::injected("delta_rule", 0.0, &dir.display().to_string()).expect("settings");
    let model =
        Arc::new(Model::load_plain(&dir, settings, &LoadOptions::default()).expect("load SmolLM2"));
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let tcfg =
        TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).expect("tokenizer config");
    let gcfg = GenerationConfig::from_file(&dir.join("generation_config.json"))
        .expect("generation config");
    let eos_ids = tcfg.special.eos_token_ids(&tok, Some(&gcfg));
    assert!(
        eos_ids.contains(&(r["eos_token_id"].as_u64().expect("eos") as u32)),
        "{eos_ids:?}"
    );
    let params = SamplingParams {
        max_new_tokens: 16,
        ..SamplingParams::greedy()
    };
    let opts = GenerateOptions {
        params,
        eos_ids,
        skip_special_tokens: true,
        ..Default::default()
    };
    let mut session = Session::new(model, SessionOptions::default());
    let mut streamed = String::new();
    let out = session
        .generate(
            &ids(&r["ids"]),
            &opts,
            &tok,
            &CancelToken::new(),
            &mut |e| {
                if let tptt_engine::Event::Token { text, .. } = e {
                    streamed.push_str(&text)
                }
            },
        )
        .expect("generate");
    assert_eq!(out.finish, FinishReason::Eos);
    let want: Vec<u32> = ids(&r["answer_ids"])
        .into_iter()
        .chain([r["eos_token_id"].as_u64().expect("eos") as u32])
        .collect();
    assert_eq!(out.ids, want);
    assert_eq!(out.text, r["answer_text"].as_str().expect("answer"));
    assert_eq!(streamed, out.text);
}
