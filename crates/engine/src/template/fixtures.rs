//! What the template tests share: SmolLM2's real `tokenizer_config.json`, a compiled template
//! with `<s>`/`</s>` special tokens, and the conversation of TGI's chat-template tests.

use super::{ChatTemplate, Message, SpecialTokens};

/// `tokenizer_config.json` of HuggingFaceTB/SmolLM2-135M-Instruct (the fields used here;
/// the template verbatim, JSON-escaped as in the file).
pub(crate) const SMOLLM2_CONFIG: &str = r#"{
  "add_prefix_space": false,
  "bos_token": "<|im_start|>",
  "chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
  "clean_up_tokenization_spaces": false,
  "eos_token": "<|im_end|>",
  "model_max_length": 8192,
  "pad_token": "<|im_end|>",
  "tokenizer_class": "GPT2Tokenizer",
  "unk_token": "<|endoftext|>",
  "vocab_size": 49152
}"#;

/// `source` compiled with `<s>` and `</s>` as BOS and EOS.
pub(crate) fn jinja(source: &str) -> ChatTemplate {
    ChatTemplate::new(
        source,
        SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            ..SpecialTokens::default()
        },
    )
    .expect("template compiles")
}

/// Renders `source` on `messages` (with the generation prompt) and compares.
pub(crate) fn check(source: &str, messages: &[Message], expected: &str) {
    let got = jinja(source).render(messages, true).expect("renders");
    assert_eq!(got, expected);
}

/// The conversation of text-generation-inference's chat template tests. Every expected
/// string below was checked against Python Jinja2 3.1 configured as `transformers` does
/// (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
/// extensions=[loopcontrols])` with its `tojson` and `raise_exception`).
pub(crate) fn example_chat() -> Vec<Message> {
    vec![
        Message::user("Hello, how are you?"),
        Message::assistant("I'm doing great. How can I help you today?"),
        Message::user("I'd like to show off how chat templating works!"),
    ]
}
