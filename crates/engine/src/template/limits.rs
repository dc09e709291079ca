//! Bounded rendering.
//!
//! A chat template is code from a stranger's repository, run on every turn. Each render is
//! bounded ([`RenderLimits::for_messages`]), so a hostile or broken template (nested
//! `range()` loops, a recursive macro, `'x' * 10**10`, a huge `tojson(indent=…)`) ends with
//! [`Error::TemplateLimit`] naming the template's origin (the `tokenizer_config.json` or
//! `chat_template.jinja` path, [`ChatTemplate::origin`]) and the limit, instead of hanging or
//! exhausting memory:
//! - fuel (minijinja's budget: one per instruction, one per 64 bytes of data created, checked
//!   before large values are made): [`FUEL_BASE`] + [`FUEL_PER_MESSAGE`] per message + one per
//!   [`CONTENT_BYTES_PER_FUEL`] bytes of content, at most [`MAX_FUEL`]; real templates use
//!   hundreds of times less on short conversations and 4-5 times less on huge pastes
//!   (measured). A hostile template on a short conversation stops in about 0.1 s, on the
//!   largest budget in about 4 s;
//! - output: [`OUTPUT_BASE_BYTES`] + [`OUTPUT_PER_CONTENT_BYTE`] per content byte +
//!   [`OUTPUT_PER_MESSAGE`] per message;
//! - nesting of calls: [`RECURSION_LIMIT`];
//! - the stack: a render runs on a thread of its own whose stack is sized to its fuel
//!   ([`render_stack_bytes`]), so values nested as deep as the fuel allows are dropped and
//!   printed without overflowing it.
//!
//! Not covered: minijinja 3.1 lets a template put a namespace inside itself
//! (`{% set ns.me = ns %}`), and printing or comparing such a cyclic value recurses without end
//! (a stack overflow aborts the process). Templates cannot be checked for this without
//! minijinja's parser internals; no real template does it.

use std::fmt;

use super::Message;

/// The bounds of one render of a chat template (module doc, "Bounded rendering"): a fuel
/// budget (minijinja's count of instructions executed and data created, one fuel per
/// instruction and per 64 bytes), the most bytes the template may write, and the nesting depth
/// of calls. [`RenderLimits::for_messages`] scales the first two with the conversation, so a
/// real template renders any conversation the app accepts while a hostile one (nested
/// `range()` loops, a recursive macro, a string multiplied a billion times) ends with
/// [`Error::TemplateLimit`] in well under a second on a short conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    /// Fuel for the whole render.
    pub fuel: u64,
    /// Most bytes of output.
    pub max_output_bytes: usize,
}

/// Fuel every render gets, whatever the conversation: the fixed part of a real template (a
/// long default system prompt, a date, tool-handling branches) costs hundreds of fuel; 2 M is
/// thousands of times that, and under 0.1 s of rendering here for a hostile template.
pub const FUEL_BASE: u64 = 2_000_000;
/// Fuel per message. Measured: SmolLM2's template spends 26 fuel on a short message, a
/// DeepSeek-R1 one 57, a Mistral-Small-3.1 one (alternation checks, a filtered copy of the
/// list) 59; this leaves a margin of 300, which also pays for templates that rebuild a list of
/// the messages in a loop (quadratic: they run out only past ~50 000 messages).
pub const FUEL_PER_MESSAGE: u64 = 20_000;
/// Bytes of message content one fuel pays for. Measured: the same templates spend 1/16 to 1/21
/// fuel per byte (each copy of a byte costs 1/64: concatenations, `split('</think>')`); one fuel
/// per 4 bytes leaves a margin of 4 to 5.
pub const CONTENT_BYTES_PER_FUEL: u64 = 4;
/// The most fuel any render gets: at 1/4 fuel per byte, conversations of up to ~55 MiB of
/// text; about 4 s of a hostile template's work. It bounds the render thread's stack
/// ([`render_stack_bytes`]).
pub const MAX_FUEL: u64 = 16_000_000;
/// Output every render may write, whatever the conversation (a default system prompt, headers).
pub const OUTPUT_BASE_BYTES: usize = 1 << 20;
/// Output allowed per byte of message content: a real template writes each message once.
pub const OUTPUT_PER_CONTENT_BYTE: usize = 4;
/// Output allowed per message beyond its content: role headers and separators (tens of bytes
/// in real templates).
pub const OUTPUT_PER_MESSAGE: usize = 4 << 10;
/// Deepest nesting of calls (macros, `loop()`, nested blocks) a render may reach, in
/// minijinja's units (a macro call counts several): minijinja's own ceiling without its
/// `stacker` feature, enough for any real template; a recursive macro ends there with
/// [`Error::TemplateLimit`].
pub const RECURSION_LIMIT: usize = 500;

impl RenderLimits {
    /// The limits for rendering `messages` (module doc, "Bounded rendering").
    pub fn for_messages(messages: &[Message]) -> Self {
        let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        let n = messages.len();
        Self {
            fuel: FUEL_BASE
                .saturating_add(FUEL_PER_MESSAGE.saturating_mul(n as u64))
                .saturating_add(bytes as u64 / CONTENT_BYTES_PER_FUEL)
                .min(MAX_FUEL),
            max_output_bytes: OUTPUT_BASE_BYTES
                .saturating_add(OUTPUT_PER_CONTENT_BYTE.saturating_mul(bytes))
                .saturating_add(OUTPUT_PER_MESSAGE.saturating_mul(n)),
        }
    }
}

/// The stack of the thread a render with `fuel` runs on. A template can nest values (a list in
/// a list in a namespace attribute, once per loop turn) as deep as its fuel allows, about one
/// level per 8.5 fuel, and minijinja drops and prints them recursively (about 100 bytes of
/// stack a level, measured): 32 bytes per fuel keeps that within the stack, so deep nesting
/// ends on the fuel, never in a stack overflow (tested at [`MAX_FUEL`]). The stack is address
/// space reserved (at most ~540 MiB), not memory used.
pub fn render_stack_bytes(fuel: u64) -> usize {
    const BASE: usize = 32 << 20;
    const PER_FUEL: u64 = 32;
    BASE.saturating_add(
        usize::try_from(fuel.min(MAX_FUEL).saturating_mul(PER_FUEL)).unwrap_or(usize::MAX),
    )
}

/// The output of a render, refusing to grow past `cap` bytes.
pub(super) struct CappedOutput {
    pub(super) out: Vec<u8>,
    pub(super) cap: usize,
}

/// The I/O error [`CappedOutput`] returns past its cap (found again in the error's sources).
#[derive(Debug)]
pub(super) struct OutputCapReached(usize);

impl fmt::Display for OutputCapReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the output passed {} bytes", self.0)
    }
}

impl std::error::Error for OutputCapReached {}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > self.cap {
            return Err(std::io::Error::other(OutputCapReached(self.cap)));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::super::fixtures::{jinja, SMOLLM2_CONFIG};
    use super::super::{Message, PromptFormat};
    use super::*;
    use crate::error::{Error, Result};

    /// Renders `source` on one short message within the default limits, checking it ends
    /// (in seconds: a hang detector, not a speed target).
    fn render_hostile(source: &str) -> Result<String> {
        let template = jinja(source).with_origin("/models/x/tokenizer_config.json");
        let started = std::time::Instant::now();
        let r = template.render(&[Message::user("hi")], true);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{source}: {:?}",
            started.elapsed()
        );
        r
    }

    fn assert_limit(r: Result<String>, which: &str) {
        match r {
            Err(Error::TemplateLimit {
                template, limit, ..
            }) => {
                assert_eq!(template, "/models/x/tokenizer_config.json");
                assert!(limit.contains(which), "{limit}");
            }
            other => panic!("expected the {which} limit, got {other:?}"),
        }
    }

    #[test]
    fn nested_ranges_run_out_of_fuel() {
        let r = render_hostile(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        );
        let shown = r.as_ref().map(|_| ()).expect_err("limit").to_string();
        assert!(
            shown.contains("/models/x/tokenizer_config.json") && shown.contains("work budget"),
            "{shown}"
        );
        assert_limit(r, "work budget");
        // Loops that write nothing cost fuel too.
        assert_limit(
            render_hostile(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            ),
            "work budget",
        );
        // A huge value is refused before it is made.
        assert_limit(render_hostile("{{ 'x' * 10000000000 }}"), "work budget");
    }

    #[test]
    fn a_template_writing_too_much_hits_the_output_cap() {
        // 100 MB of output is within the fuel (1 per 64 bytes) but past the output cap.
        let r = render_hostile("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}");
        assert_limit(r, "output size");
        let limits = RenderLimits::for_messages(&[Message::user("hi")]);
        let capped = jinja("{% for i in range(100) %}{{ 'x' * 1000 }}{% endfor %}")
            .render_with_limits(
                &[Message::user("hi")],
                true,
                RenderLimits {
                    max_output_bytes: 99_999,
                    ..limits
                },
            );
        assert!(
            matches!(capped, Err(Error::TemplateLimit { .. })),
            "{capped:?}"
        );
    }

    #[test]
    fn recursion_ends_in_an_error_not_a_stack_overflow() {
        assert_limit(
            render_hostile("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
            "recursion",
        );
        assert_limit(
            render_hostile(
                "{% macro f(n) %}{% for i in [1, 2] %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(0) }}",
            ),
            "recursion",
        );
    }

    #[test]
    fn values_nested_as_deep_as_the_fuel_allows_do_not_overflow_the_stack() {
        // One level of nesting per loop turn until the fuel runs out: dropping and printing
        // such a value recurses once per level. At the largest budget (the render thread's
        // stack is sized for it).
        let source = "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}\
                      {% for j in range(100000) %}{% set ns.x = {'a': ns.x} %}{% endfor %}\
                      {{ ns.x|length }}{% endfor %}";
        let r = jinja(source).render_with_limits(
            &[Message::user("hi")],
            true,
            RenderLimits {
                fuel: MAX_FUEL,
                max_output_bytes: OUTPUT_BASE_BYTES,
            },
        );
        assert!(matches!(r, Err(Error::TemplateLimit { .. })), "{r:?}");
        assert_limit(
            render_hostile(
                "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}\
                 {% for j in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x }}",
            ),
            "work budget",
        );
    }

    #[test]
    fn tojson_cannot_allocate_past_the_fuel() {
        for source in [
            "{{ messages | tojson(indent=1000000000000) }}",
            "{{ messages | tojson(indent=10000000) }}",
            "{% set ns = namespace(x=[]) %}{% for i in range(600) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | tojson }}",
        ] {
            let r = render_hostile(source);
            assert!(r.is_err(), "{source}: no error");
        }
        // Ordinary use is unaffected.
        assert_eq!(
            render_hostile("{{ messages[0] | tojson(indent=2) }}").expect("renders"),
            "{\n  \"role\": \"user\",\n  \"content\": \"hi\"\n}"
        );
    }

    #[test]
    fn real_templates_render_long_conversations_within_the_limits() {
        let format = PromptFormat::from_tokenizer_config_json(SMOLLM2_CONFIG).expect("loads");
        // 4000 short messages, then two of 4 MiB (the largest message the app accepts).
        let many: Vec<Message> = (0..4000)
            .map(|i| {
                if i % 2 == 0 {
                    Message::user(format!("question {i}"))
                } else {
                    Message::assistant(format!("answer {i}"))
                }
            })
            .collect();
        let out = format
            .render(&many, true)
            .expect("a long conversation renders");
        assert!(out.ends_with("<|im_start|>assistant\n"));
        let big = [
            Message::user("u".repeat(4 << 20)),
            Message::assistant("a".repeat(4 << 20)),
        ];
        let out = format.render(&big, true).expect("huge messages render");
        assert!(out.len() > 8 << 20);
        // A template that filters and checks every message (as Mistral's and DeepSeek's do)
        // on a long conversation.
        let heavy = jinja(
            "{%- set ns = namespace(sys='', kept=[]) -%}{%- for m in messages -%}\
             {%- if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% endif -%}\
             {%- if m['role'] not in ['tool'] and not m.get('tool_calls') %}{% set ns.kept = ns.kept + [m] %}{% endif -%}\
             {%- endfor -%}{{ bos_token }}{{ ns.sys }}\
             {%- for m in ns.kept -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
             {{ raise_exception('roles must alternate') }}{%- endif -%}\
             {%- set c = m['content'] -%}{%- if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif -%}\
             {{ '[' + m['role'] + ']' + c.strip() + eos_token }}{%- endfor -%}",
        );
        heavy
            .render(&many, true)
            .expect("a heavy template on 4000 messages");
        heavy.render(&big, true).expect("a heavy template on 8 MiB");
    }
}
