//! [`ChatTemplate`]: a model's Hugging Face chat template, compiled once with minijinja configured
//! the way `transformers` configures Jinja2 (`apply_chat_template`): `trim_blocks` and
//! `lstrip_blocks` on, loop controls, Python string/dict methods (`minijinja-contrib`'s pycompat),
//! maps that keep their insertion order as Python dicts do (minijinja's `preserve_order`), and the
//! same extras: `raise_exception(msg)`, `strftime_now(fmt)` ([`super::strftime`]) and a `tojson`
//! filter that writes Python's `json.dumps` ([`super::pyjson`]); `{% generation %}` blocks render
//! their body unchanged. Each render runs within [`RenderLimits`] on a thread of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};

use super::files::SpecialTokens;
use super::limits::{
    render_stack_bytes, CappedOutput, OutputCapReached, RenderLimits, RECURSION_LIMIT,
};
use super::{pyjson, strftime, Message};
use crate::error::{panic_message, Error, Result};

/// Name of the compiled template inside its minijinja environment (shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled Hugging Face chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    source: Arc<str>,
    origin: Arc<str>,
    special: SpecialTokens,
    env: Arc<Environment<'static>>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

/// What [`ChatTemplate::origin`] says of a template made with [`ChatTemplate::new`] alone.
pub const INLINE_ORIGIN: &str = "a template given as text";

impl ChatTemplate {
    /// Compiles `source`; `special` fills `bos_token` and friends when rendering.
    pub fn new(source: impl Into<String>, special: SpecialTokens) -> Result<Self> {
        let source: String = source.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(syntax_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", pyjson::py_tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime::strftime_now);
        env.set_recursion_limit(RECURSION_LIMIT);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(syntax_error)?;
        Ok(Self {
            source: source.into(),
            origin: INLINE_ORIGIN.into(),
            special,
            env: Arc::new(env),
        })
    }

    /// The same template, saying it came from `origin` (a file path, "tokenizer_config.json of
    /// X") in its errors.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into().into();
        self
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from ([`INLINE_ORIGIN`] unless [`ChatTemplate::with_origin`]
    /// said).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The special tokens it is rendered with.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the opening of an
    /// assistant turn. Bounded by [`RenderLimits::for_messages`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_limits(
            messages,
            add_generation_prompt,
            RenderLimits::for_messages(messages),
        )
    }

    /// [`ChatTemplate::render`] within `limits`: past one, [`Error::TemplateLimit`] naming the
    /// template's origin and the limit. Runs on a thread of its own whose stack is sized to
    /// the fuel ([`render_stack_bytes`]); the caller's thread waits.
    pub fn render_with_limits(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        limits: RenderLimits,
    ) -> Result<String> {
        let stack = render_stack_bytes(limits.fuel);
        std::thread::scope(|scope| {
            let render = std::thread::Builder::new()
                .name("tptt-template".into())
                .stack_size(stack)
                .spawn_scoped(scope, || {
                    self.render_here(messages, add_generation_prompt, limits)
                })
                .map_err(|e| {
                    Error::Generate(format!(
                        "cannot start the template thread ({stack} bytes of stack): {e}"
                    ))
                })?;
            render.join().unwrap_or_else(|payload| {
                Err(Error::Panicked {
                    message: panic_message(payload.as_ref()),
                })
            })
        })
    }

    fn render_here(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        limits: RenderLimits,
    ) -> Result<String> {
        // Fuel is a setting of the environment: a clone (its templates are shared, not
        // recompiled) carries this render's budget.
        let mut env = Environment::clone(&self.env);
        env.set_fuel(Some(limits.fuel));
        let template = env.get_template(TEMPLATE_NAME).map_err(render_error)?;
        let count = messages.len();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                // In this order, as `transformers` writes them (`message|tojson`,
                // `message.items()`): maps keep their insertion order (`preserve_order`).
                minijinja::context! { role => m.role.as_str(), content => m.content.as_str() }
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let special = [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("unk_token", &self.special.unk),
            ("pad_token", &self.special.pad),
        ];
        for (name, token) in special {
            if let Some(token) = token {
                ctx.insert(name, Value::from(token.as_str()));
            }
        }
        let mut output = CappedOutput {
            out: Vec::new(),
            cap: limits.max_output_bytes,
        };
        let rendered = template.render_captured_to(Value::from(ctx), &mut output);
        if let Err(e) = rendered {
            return Err(self
                .limit_error(&e, &limits, count)
                .unwrap_or_else(|| render_error(e)));
        }
        // minijinja writes whole `str`s: the bytes are UTF-8.
        String::from_utf8(output.out).map_err(|e| {
            render_error(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("the output is not UTF-8: {e}"),
            ))
        })
    }

    /// [`Error::TemplateLimit`] when `e` is a render limit being hit.
    fn limit_error(
        &self,
        e: &minijinja::Error,
        limits: &RenderLimits,
        messages: usize,
    ) -> Option<Error> {
        let limit = if e.kind() == ErrorKind::OutOfFuel {
            format!(
                "work budget ({} fuel for this conversation: one per instruction and per 64 bytes of data)",
                limits.fuel
            )
        } else if e.kind() == ErrorKind::InvalidOperation
            && e.detail() == Some("recursion limit exceeded")
        {
            format!("recursion limit ({RECURSION_LIMIT} levels of nested calls)")
        } else {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
            let mut capped = false;
            while let Some(err) = cause {
                if err.downcast_ref::<OutputCapReached>().is_some() {
                    capped = true;
                    break;
                }
                // An io::Error hides its payload from `source()`: look inside it.
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    if io
                        .get_ref()
                        .is_some_and(|inner| inner.downcast_ref::<OutputCapReached>().is_some())
                    {
                        capped = true;
                        break;
                    }
                }
                cause = err.source();
            }
            if !capped {
                return None;
            }
            format!(
                "output size limit ({} bytes for this conversation)",
                limits.max_output_bytes
            )
        };
        Some(Error::TemplateLimit {
            template: self.origin.to_string(),
            limit,
            messages,
        })
    }
}

/// Rewrites `transformers`' `{% generation %}` / `{% endgeneration %}` block (its
/// `AssistantTracker` extension, which marks assistant text for training masks and renders its
/// body unchanged) into the equivalent `{% if true %}` / `{% endif %}`, keeping any `-`
/// whitespace control, so templates that use it compile here.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        // The tag closes after its opening `{%` (in `{%}`, the `%}` overlaps it and does not).
        let Some(close) = tag[2..].find("%}").map(|c| c + 2) else {
            // Unclosed tag: left as is for the parser to report.
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (dash_l, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner),
        };
        let (body, dash_r) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{dash_l} {r} {dash_r}%}}")),
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// The error `raise_exception` attaches as source, so a render failure can be told apart from
/// the template deliberately rejecting the conversation.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn syntax_error(source: minijinja::Error) -> Error {
    Error::TemplateSyntax {
        message: source.to_string(),
        source,
    }
}

fn render_error(source: minijinja::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(err) = cause {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return Error::TemplateException(raised.0.clone());
        }
        cause = err.source();
    }
    Error::TemplateRender {
        message: source.to_string(),
        source,
    }
}

/// `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: Value) -> std::result::Result<Value, minijinja::Error> {
    let message = message.to_string();
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedException(message)),
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{check, example_chat, jinja};
    use super::super::{PromptFormat, TokenizerConfig};
    use super::*;

    #[test]
    fn known_templates_render_like_transformers() {
        let cases: [(&str, &str, &str); 4] = [
            (
                // mistralai/Mistral-7B-Instruct-v0.1
                "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
                "<s>[INST] Hello, how are you? [/INST]I'm doing great. How can I help you today?</s> [INST] I'd like to show off how chat templating works! [/INST]",
                "mistral",
            ),
            (
                // Deci/DeciLM-7B-instruct: exercises trim_blocks + lstrip_blocks.
                "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '### User:\\n' + message['content'] }}\n{% elif message['role'] == 'system' %}\n{{ '### System:\\n' + message['content'] }}\n{% elif message['role'] == 'assistant' %}\n{{ '### Assistant:\\n'  + message['content'] }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '### Assistant:' }}\n{% endif %}\n{% endfor %}",
                "### User:\nHello, how are you?\n### Assistant:\nI'm doing great. How can I help you today?\n### User:\nI'd like to show off how chat templating works!\n",
                "decilm",
            ),
            (
                // Qwen/Qwen1.5-72B-Chat
                "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
                "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!",
                "qwen1.5",
            ),
            (
                // TheBloke/deepseek-coder-33B-instruct-AWQ: `-` whitespace control, set in loops.
                "{%- set found_item = false -%}\n{%- for message in messages -%}\n    {%- if message['role'] == 'system' -%}\n        {%- set found_item = true -%}\n    {%- endif -%}\n{%- endfor -%}\n{%- if not found_item -%}\n{{'You are an AI programming assistant.\\n'}}\n{%- endif %}\n{%- for message in messages %}\n    {%- if message['role'] == 'system' %}\n{{ message['content'] }}\n    {%- else %}\n        {%- if message['role'] == 'user' %}\n{{'### Instruction:\\n' + message['content'] + '\\n'}}\n        {%- else %}\n{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{{'### Response:\\n'}}\n",
                "You are an AI programming assistant.\n### Instruction:\nHello, how are you?\n### Response:\nI'm doing great. How can I help you today?\n<|EOT|>\n### Instruction:\nI'd like to show off how chat templating works!\n### Response:\n",
                "deepseek-coder",
            ),
        ];
        for (source, expected, name) in cases {
            let got = jinja(source)
                .render(&example_chat(), false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}\
                      {%- generation -%} [{{ m.content }}] {%- endgeneration -%}\
                      {% else %}{{ m.content }}{% endif %}{% endfor %}{% generation %}.{% endgeneration %}";
        check(
            source,
            &[Message::user("q"), Message::assistant("a")],
            "q[a].",
        );
        assert_eq!(
            rewrite_generation_tags("{% if x %}a{%- endif %}"),
            "{% if x %}a{%- endif %}"
        );
        assert_eq!(rewrite_generation_tags("a {% unclosed"), "a {% unclosed");
        // Found by the fuzz tests: `{%}` used to slice [2..1] and panic.
        assert_eq!(rewrite_generation_tags("{%}"), "{%}");
        assert_eq!(rewrite_generation_tags("{%}x%}{%-%}"), "{%}x%}{%-%}");
        assert!(ChatTemplate::new("{%}", SpecialTokens::default()).is_err());
    }

    #[test]
    fn tools_and_documents_are_none() {
        check(
            "{% if tools is none and documents is none and tools is defined %}ok{% endif %}\
             {% if not tools %}!{% endif %}",
            &[Message::user("x")],
            "ok!",
        );
    }

    #[test]
    fn template_sees_bos_and_eos() {
        check(
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
            &[Message::user("a"), Message::assistant("b")],
            "<s>a</s>b</s>",
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        check(
            source,
            &[Message::user("x"), Message::user("y")],
            "[x]\n[y]\n",
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let source = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                      {{ m.content.strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}\
                      {% endfor %}{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}";
        check(
            source,
            &[
                Message::user(" ab "),
                Message::user("c"),
                Message::user("d"),
            ],
            "AB!Crole=user;content= ab ;",
        );
    }

    #[test]
    fn broken_template_is_a_syntax_error() {
        for source in [
            "{% for m in messages %}{{ m.content }}",
            "{{ 'unclosed ",
            "{% endif %}",
        ] {
            let err =
                ChatTemplate::new(source, SpecialTokens::default()).expect_err("must not compile");
            assert!(matches!(err, Error::TemplateSyntax { .. }), "{err}");
            assert!(!err.to_string().is_empty());
        }
        let err = PromptFormat::from_tokenizer_config_json(r#"{"chat_template": "{% if %}"}"#)
            .expect_err("must not compile");
        assert!(matches!(err, Error::TemplateSyntax { .. }), "{err}");
    }

    #[test]
    fn render_failure_is_an_error() {
        let t = jinja("{{ messages[0].content | no_such_filter }}");
        let err = t
            .render(&[Message::user("x")], true)
            .expect_err("unknown filter");
        assert!(matches!(err, Error::TemplateRender { .. }), "{err}");
        let t = jinja("{{ messages[0].content + 1 }}");
        let err = t
            .render(&[Message::user("x")], true)
            .expect_err("type error");
        assert!(matches!(err, Error::TemplateRender { .. }), "{err}");
    }

    #[test]
    fn raise_exception_carries_the_message() {
        // The check Llama-2 / Mistral templates make.
        let source = "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                      {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
                      {% endif %}{{ message['content'] }}{% endfor %}";
        let t = jinja(source);
        assert_eq!(
            t.render(&[Message::user("a"), Message::assistant("b")], false)
                .expect("alternating roles render"),
            "ab"
        );
        let err = t
            .render(&[Message::user("a"), Message::user("b")], false)
            .expect_err("must raise");
        match err {
            Error::TemplateException(msg) => assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("expected TemplateException, got {other}"),
        }
    }

    #[test]
    fn the_template_names_where_it_came_from() {
        let dir = std::env::temp_dir().join(format!("tptt-engine-origin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tokenizer_config.json");
        std::fs::write(
            &path,
            r#"{"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"}"#,
        )
        .expect("write");
        let format = PromptFormat::from_tokenizer_config_file(&path).expect("compiles");
        let err = format
            .render(&[Message::user("hi")], true)
            .expect_err("runs out");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(dir.join("chat_template.jinja"), "{{ 'y' * 10000000000 }}").expect("write");
        let config = TokenizerConfig::from_model_dir(&dir).expect("loads");
        let err = PromptFormat::from_tokenizer_config(&config)
            .expect("compiles")
            .render(&[Message::user("hi")], true)
            .expect_err("runs out");
        assert!(err.to_string().contains("chat_template.jinja"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
