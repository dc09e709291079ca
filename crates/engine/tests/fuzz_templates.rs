//! Structured fuzzing of chat templates and tokenizer configs (issue 11): generated Jinja
//! (loops over huge ranges, recursion, filters and methods, huge literals, loop controls),
//! mutated real templates, and generated or mutated `tokenizer_config.json` bodies go through
//! `ChatTemplate::new` / `PromptFormat::from_tokenizer_config_json` and a render. Each must end
//! in `Ok` or an `Err` within seconds: never a panic (a panic on the render thread comes back
//! as `Error::Panicked`, checked too), never a hang, never an unbounded allocation.
//!
//! The cases are a fixed number with a fixed seed, so CI runs the same ones each time (set
//! `PROPTEST_RNG_SEED`/`PROPTEST_CASES` to explore more locally). Not generated: a namespace
//! assigned into itself (`{% set ns.me = ns %}`), which minijinja cannot print without
//! recursing forever (documented in `template/limits.rs`); namespace attributes here only ever
//! receive values built from other values.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tptt_engine::template::{ChatTemplate, PromptFormat, SpecialTokens};
use tptt_engine::{Error, Message};

/// A render must end within this (a hang detector: the fuel bounds a hostile template on
/// these short conversations to well under a second).
const HANG: Duration = Duration::from_secs(10);

fn config(cases: u32) -> Config {
    let defaults = Config::default();
    let explore = |var: &str| std::env::var_os(var).is_some();
    Config {
        cases: if explore("PROPTEST_CASES") {
            defaults.cases
        } else {
            cases
        },
        rng_seed: if explore("PROPTEST_RNG_SEED") {
            defaults.rng_seed
        } else {
            RngSeed::Fixed(0x7e11_11a5)
        },
        failure_persistence: None,
        max_shrink_iters: 256,
        ..defaults
    }
}

fn conversation() -> Vec<Message> {
    vec![
        Message::system("Be brief."),
        Message::user("Hello </think> there"),
        Message::assistant("<think>hm</think>Hi!"),
        Message::user("x".repeat(3000)),
    ]
}

/// Renders with `template`, checking the render ends in time and did not panic.
fn check_render(template: &ChatTemplate, source: &str) -> Result<(), TestCaseError> {
    for add_generation_prompt in [true, false] {
        let started = Instant::now();
        let r = template.render(&conversation(), add_generation_prompt);
        let took = started.elapsed();
        prop_assert!(took < HANG, "{source:?} took {took:?}");
        if let Err(Error::Panicked { message }) = &r {
            return Err(TestCaseError::fail(format!(
                "{source:?} panicked: {message}"
            )));
        }
    }
    Ok(())
}

fn special() -> SpecialTokens {
    SpecialTokens {
        bos: Some("<s>".into()),
        eos: Some("</s>".into()),
        ..SpecialTokens::default()
    }
}

/// Sizes that matter: small, around buffer sizes, and far past any limit.
fn size() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..20).prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "-1",
            "255",
            "100000",
            "1000000",
            "10000000000",
            "9223372036854775807",
            "-9223372036854775808",
            "1e308",
            "0.5",
        ])
        .prop_map(str::to_string),
    ]
}

fn string_literal() -> impl Strategy<Value = String> {
    "[a-z <>|{}%#\\\\\n'\"é😀]{0,10}".prop_map(|s| {
        format!(
            "'{}'",
            s.replace('\\', "\\\\")
                .replace('\'', "\\'")
                .replace('\n', "\\n")
        )
    })
}

fn leaf_expr() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => size(),
        2 => string_literal(),
        6 => prop::sample::select(vec![
            "messages",
            "messages[0]",
            "messages[0]['content']",
            "messages[-1].content",
            "messages[1:]",
            "bos_token",
            "eos_token",
            "add_generation_prompt",
            "tools",
            "none",
            "true",
            "ns.v",
            "x",
            "i",
            "range(10)",
            "range(100000)",
            "'x' * 1000000",
            "'ab' * 100000",
            "[1, 2, 3]",
            "{'role': 'user', 'content': 'c'}",
        ])
        .prop_map(str::to_string),
        1 => prop::sample::select(vec!["loop", "undefined_name", "documents", "caller"])
            .prop_map(str::to_string),
    ]
}

fn filter() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "length",
            "upper",
            "lower",
            "trim",
            "string",
            "list",
            "reverse",
            "sort",
            "unique",
            "first",
            "last",
            "tojson",
            "items",
            "dictsort",
            "title",
            "capitalize",
            "safe",
            "e",
            "sum",
            "min",
            "max",
            "abs",
            "round",
            "int",
            "float",
            "wordcount",
            "pprint",
            "count",
            "batch(3)",
            "slice(2)",
            "map('upper')",
            "select",
            "reject",
            "join(', ')",
            "selectattr('role', 'equalto', 'user')",
            "groupby('role')",
            "default('d')",
            "replace('a', 'bbbbbbbbbbbbbbbb')",
            "format(1, 2)",
            "no_such_filter",
        ])
        .prop_map(str::to_string),
        size().prop_map(|n| format!("tojson(indent={n})")),
        size().prop_map(|n| format!("indent({n})")),
        size().prop_map(|n| format!("truncate({n})")),
        size().prop_map(|n| format!("center({n})")),
    ]
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "strip()",
            "lstrip('x')",
            "rstrip()",
            "split('a')",
            "split()",
            "splitlines()",
            "startswith('a')",
            "endswith('</s>')",
            "replace('x', 'yyyyyyyy')",
            "upper()",
            "lower()",
            "title()",
            "items()",
            "keys()",
            "values()",
            "get('role')",
            "get('content', 'd')",
            "format(1)",
            "count('a')",
            "find('x')",
            "join(['a', 'b'])",
            "no_such_method()",
        ])
        .prop_map(str::to_string),
        size().prop_map(|n| format!("replace('', 'x', {n})")),
    ]
}

fn expr() -> impl Strategy<Value = String> {
    leaf_expr().prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop::sample::select(vec![
                    "+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", ">", "and", "or",
                    "in", "not in",
                ]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (inner.clone(), filter()).prop_map(|(a, f)| format!("({a} | {f})")),
            (inner.clone(), method()).prop_map(|(a, m)| format!("({a}).{m}")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("[{a}, {b}]")),
            (inner.clone(), inner.clone()).prop_map(|(k, v)| format!("{{{k}: {v}}}")),
            (inner.clone(), inner.clone()).prop_map(|(a, i)| format!("{a}[{i}]")),
            (inner.clone(), inner.clone()).prop_map(|(a, i)| format!("{a}[{i}:]")),
            inner.clone().prop_map(|a| format!("not {a}")),
            inner.clone().prop_map(|a| format!("raise_exception({a})")),
            inner.clone().prop_map(|a| format!("strftime_now({a})")),
            inner.clone().prop_map(|a| format!("range({a})")),
            inner.clone().prop_map(|a| format!("f({a})")),
            inner.clone().prop_map(|a| format!("loop({a})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, c, b)| format!("({a} if {c} else {b})")),
            inner.prop_map(|a| format!("({a} is defined)")),
        ]
    })
}

fn statement() -> impl Strategy<Value = String> {
    let garbage = prop_oneof![
        Just("{% if %}".to_string()),
        Just("{{ x".to_string()),
        Just("{% break %}".to_string()),
        Just("{{ caller() }}".to_string()),
        "[{}%#]{1,4}".prop_map(|s| s.to_string()),
    ];
    let leaf = prop_oneof![
        2 => "[a-z <>\n]{0,8}".prop_map(|s| s.to_string()),
        4 => expr().prop_map(|e| format!("{{{{ {e} }}}}")),
        1 => expr().prop_map(|e| format!("{{{{- {e} -}}}}")),
        2 => expr().prop_map(|e| format!("{{% set x = {e} %}}")),
        2 => expr().prop_map(|e| format!("{{% set ns.v = {e} %}}")),
        1 => Just("{% generation %}g{% endgeneration %}".to_string()),
        1 => garbage,
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        let body = prop::collection::vec(inner, 0..4).prop_map(|v| v.concat());
        prop_oneof![
            2 => (expr(), body.clone()).prop_map(|(e, b)| format!("{{% for x in {e} %}}{b}{{% endfor %}}")),
            4 => (size(), body.clone(), prop::bool::ANY).prop_map(|(n, b, brk)| {
                let brk = if brk { "{% if i > 3 %}{% break %}{% endif %}" } else { "{% continue %}" };
                format!("{{% for i in range({n}) %}}{b}{brk}{{% endfor %}}")
            }),
            1 => (expr(), body.clone()).prop_map(|(e, b)| {
                format!("{{% for x in {e} recursive %}}{b}{{{{ loop(x) }}}}{{% endfor %}}")
            }),
            2 => (expr(), body.clone(), body.clone()).prop_map(|(e, a, b)| {
                format!("{{% if {e} %}}{a}{{% elif x %}}{{% else %}}{b}{{% endif %}}")
            }),
            1 => body.clone().prop_map(|b| format!(
                "{{% macro g(n=0) %}}{b}{{{{ g(n + 1) if n < 1000 }}}}{{% endmacro %}}{{{{ g(1) }}}}"
            )),
            1 => body.clone().prop_map(|b| format!(
                "{{% macro h() %}}{{{{ caller() }}}}{{% endmacro %}}{{% call h() %}}{b}{{% endcall %}}"
            )),
            1 => body.clone().prop_map(|b| format!("{{% filter upper %}}{b}{{% endfilter %}}")),
            1 => body.clone().prop_map(|b| format!("{{% set x %}}{b}{{% endset %}}{{{{ x }}}}")),
            1 => (expr(), body).prop_map(|(e, b)| format!("{{% with y = {e} %}}{b}{{% endwith %}}")),
        ]
    })
}

fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(statement(), 1..5).prop_map(|v| {
        format!(
            "{{% set ns = namespace(v=0) %}}{{% macro f(n=0) %}}{{{{ n }}}}{{% endmacro %}}{}",
            v.concat()
        )
    })
}

/// Real templates to mutate: SmolLM2's ChatML, Mistral's (alternation check), DeepSeek-style
/// (`split('</think>')`, namespaces).
const SEEDS: [&str; 3] = [
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    "{%- set ns = namespace(sys='', first=true) -%}{%- for m in messages -%}{%- if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% endif -%}{%- endfor -%}{{ bos_token }}{{ ns.sys }}{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ '<U>' + m['content'] }}{%- elif m['role'] == 'assistant' -%}{%- set c = m['content'] -%}{%- if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif -%}{{ '<A>' + c + eos_token }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt %}{{ '<A><think>\n' }}{% endif %}",
];

/// One edit of a source: where (a fraction of its length), what, and the text inserted.
fn edits() -> impl Strategy<Value = Vec<(f64, u8, String)>> {
    prop::collection::vec(
        (
            0.0f64..1.0,
            0u8..4,
            prop_oneof![
                "[{}%#()\\[\\]'\"|.,+*~ a-z0-9-]{1,6}".prop_map(|s| s.to_string()),
                prop::sample::select(vec![
                    "{% for i in range(100000) %}",
                    "{% endfor %}",
                    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
                    " * 1000000000",
                    "{% if %}",
                    "{% set ns.v = [ns.v] %}",
                    "| tojson(indent=1000000)",
                    "{% break %}",
                ])
                .prop_map(str::to_string),
            ],
        ),
        1..6,
    )
}

fn apply(source: &str, edits: &[(f64, u8, String)]) -> String {
    let mut s: Vec<char> = source.chars().collect();
    for (at, op, text) in edits {
        let i = ((*at * s.len() as f64) as usize).min(s.len());
        match op {
            0 => {
                s.splice(i..i, text.chars());
            }
            1 => {
                let end = (i + text.len()).min(s.len());
                s.drain(i..end);
            }
            2 => {
                let end = (i + text.chars().count()).min(s.len());
                s.splice(i..end, text.chars());
            }
            _ => {
                // Duplicate a span: repeated loops and blocks.
                let end = (i + 40).min(s.len());
                let span: Vec<char> = s[i..end].to_vec();
                s.splice(i..i, span);
            }
        }
    }
    s.into_iter().collect()
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z{}%<>|\n]{0,12}".prop_map(Value::from),
        template().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec!["name", "template", "content", "__type", "lstrip", "x",])
                    .prop_map(str::to_string),
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn tokenizer_config() -> impl Strategy<Value = String> {
    prop::collection::btree_map(
        prop::sample::select(vec![
            "chat_template",
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "model_max_length",
            "added_tokens_decoder",
        ]),
        json_value(),
        0..6,
    )
    .prop_map(|m| {
        let object: serde_json::Map<String, serde_json::Value> =
            m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        serde_json::Value::Object(object).to_string()
    })
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn generated_templates_end_in_ok_or_err(source in template()) {
        if let Ok(t) = ChatTemplate::new(source.as_str(), special()) {
            check_render(&t, &source)?;
        }
    }
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn mutated_real_templates_end_in_ok_or_err(
        seed in 0usize..SEEDS.len(),
        edits in edits(),
    ) {
        let source = apply(SEEDS[seed], &edits);
        if let Ok(t) = ChatTemplate::new(source.as_str(), special()) {
            check_render(&t, &source)?;
        }
    }
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn tokenizer_configs_end_in_ok_or_err(json in tokenizer_config()) {
        if let Ok(PromptFormat::Jinja(t)) = PromptFormat::from_tokenizer_config_json(&json) {
            check_render(&t, &json)?;
        }
    }

    #[test]
    fn mutated_tokenizer_configs_end_in_ok_or_err(edits in edits()) {
        let json = apply(SMOLLM2_CONFIG, &edits);
        match PromptFormat::from_tokenizer_config_json(&json) {
            Ok(PromptFormat::Jinja(t)) => check_render(&t, &json)?,
            Ok(PromptFormat::Alpaca) => {
                let r = PromptFormat::Alpaca.render(&conversation(), true);
                prop_assert!(r.is_ok());
            }
            Err(_) => {}
        }
    }
}

/// `tokenizer_config.json` of SmolLM2-135M-Instruct (the fields the engine reads).
const SMOLLM2_CONFIG: &str = r#"{
  "bos_token": "<|im_start|>",
  "chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
  "eos_token": "<|im_end|>",
  "pad_token": "<|im_end|>",
  "unk_token": "<|endoftext|>",
  "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": true}}
}"#;
