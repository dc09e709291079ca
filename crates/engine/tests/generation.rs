//! The generation API on a tiny fixture model: `Session::generate` (token counts, EOS, cancel,
//! stop strings, parameter and prompt errors, streamed text = returned text) and the
//! `worker::Engine` thread.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{token_ids, Fixture};
use tokenizers::Tokenizer;
use tptt_engine::{
    CancelToken, Engine, Error, Event, FinishReason, GenerateOptions, Job, Outcome, SamplingParams,
    Session, SessionOptions,
};

fn fixture() -> Fixture {
    Fixture::load("tptt-llama", "delta_product")
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    let params = SamplingParams {
        max_new_tokens,
        ..SamplingParams::greedy()
    };
    GenerateOptions {
        params,
        eos_ids: vec![2],
        ignore_eos: true,
        ..Default::default()
    }
}

fn prompt() -> Vec<u32> {
    token_ids(11, 300, 42)
}

/// Run `generate`, returning the outcome and the streamed pieces.
fn run(
    session: &mut Session,
    prompt: &[u32],
    opts: &GenerateOptions,
    tok: &Tokenizer,
    cancel: &CancelToken,
) -> (tptt_engine::Result<Outcome>, Vec<String>) {
    let mut pieces = Vec::new();
    let r = session.generate(prompt, opts, tok, cancel, &mut |e| {
        let Event::Token { text, .. } = e else {
            return;
        };
        pieces.push(text);
    });
    (r, pieces)
}

#[test]
fn greedy_with_ignore_eos_yields_exactly_max_new_tokens() {
    let fx = fixture();
    let tok = fx.tokenizer();
    for n in [1, 5, 32] {
        let mut opts = greedy(n);
        // Every id is an EOS id: only ignore_eos lets the generation run to its limit.
        opts.eos_ids = (0..300).collect();
        let mut s = Session::new(fx.arc(), SessionOptions::default());
        let (r, pieces) = run(&mut s, &prompt(), &opts, &tok, &CancelToken::new());
        let out = r.expect("generate");
        assert_eq!(out.ids.len(), n, "max_new_tokens {n}");
        assert_eq!(out.finish, FinishReason::MaxTokens);
        assert_eq!(out.stats.generated_tokens, n);
        assert_eq!(out.stats.prompt_tokens, prompt().len());
        assert_eq!(pieces.concat(), out.text, "streamed pieces = returned text");
        // The session read the prompt and every generated token.
        assert_eq!(s.tokens, [prompt(), out.ids.clone()].concat());
    }
}

#[test]
fn greedy_is_deterministic_and_stops_at_eos_without_ignore_eos() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let first = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(12),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    let again = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(12),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    assert_eq!(first.ids, again.ids, "greedy decoding is deterministic");

    // Make the 4th greedy token an EOS id: generation ends there, EOS included in the ids.
    let eos = first.ids[3];
    let stop_at = first.ids.iter().position(|&i| i == eos).expect("present");
    let opts = GenerateOptions {
        eos_ids: vec![eos],
        ignore_eos: false,
        ..greedy(12)
    };
    let out = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &opts,
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    assert_eq!(out.finish, FinishReason::Eos);
    assert_eq!(out.ids, first.ids[..=stop_at]);
}

#[test]
fn cancelled_before_start_returns_no_tokens() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let cancel = CancelToken::new();
    cancel.cancel();
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let (r, pieces) = run(&mut s, &prompt(), &greedy(8), &tok, &cancel);
    let out = r.expect("a cancelled generation is not an error");
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert!(
        out.ids.is_empty() && out.text.is_empty() && pieces.is_empty(),
        "{out:?}"
    );
    assert_eq!(out.stats.generated_tokens, 0);
}

#[test]
fn cancelled_from_the_sink_keeps_the_partial_text() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let max = 40;
    let full = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(max),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");

    let cancel = CancelToken::new();
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let mut pieces: Vec<(String, u32)> = Vec::new();
    let trigger = cancel.clone();
    let out = s
        .generate(&prompt(), &greedy(max), &tok, &cancel, &mut |e| {
            let Event::Token { text, id, .. } = e else {
                return;
            };
            pieces.push((text, id));
            if pieces.len() == 3 {
                trigger.cancel();
            }
        })
        .expect("generate");
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert!(pieces.len() >= 3, "{pieces:?}");
    let third_id = pieces[2].1;
    // Stopped right after the token that completed the third piece.
    assert_eq!(out.ids.last(), Some(&third_id), "{out:?}");
    assert!(
        out.ids.len() >= 3 && out.ids.len() < max,
        "{} ids",
        out.ids.len()
    );
    assert_eq!(out.ids, full.ids[..out.ids.len()], "same greedy prefix");
    let streamed: String = pieces.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        out.text, streamed,
        "partial text = concatenation of the streamed pieces"
    );
    assert!(!out.text.is_empty());
    assert!(
        full.text.starts_with(&out.text),
        "{:?} is not a prefix of {:?}",
        out.text,
        full.text
    );
    // The session holds everything generated before the stop.
    assert_eq!(s.tokens, [prompt(), out.ids.clone()].concat());
}

#[test]
fn stop_strings_end_generation_and_are_not_in_the_text() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let full = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(40),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 12, "need some text to cut: {:?}", full.text);
    // A two-character stop string taken from the middle of the greedy text.
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).expect("taken from the text");
    let opts = GenerateOptions {
        stop_strings: vec!["never appears \u{1F600}".into(), stop.clone()],
        ..greedy(40)
    };
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let (r, pieces) = run(&mut s, &prompt(), &opts, &tok, &CancelToken::new());
    let out = r.expect("generate");
    assert_eq!(out.finish, FinishReason::Stop(stop.clone()));
    assert_eq!(
        out.text,
        full.text[..cut],
        "text up to the stop string, stop {stop:?}"
    );
    assert!(!out.text.contains(&stop));
    assert_eq!(pieces.concat(), out.text);
    assert!(out.ids.len() < full.ids.len());
    assert_eq!(out.ids, full.ids[..out.ids.len()]);
}

#[test]
fn invalid_sampling_values_and_empty_prompts_are_errors() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let cases = [
        (
            "temperature",
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::default()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: 1.0,
                ..SamplingParams::default()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::default()
            },
        ),
        (
            "max_new_tokens",
            SamplingParams {
                max_new_tokens: 0,
                ..SamplingParams::default()
            },
        ),
    ];
    for (field, params) in cases {
        let mut s = Session::new(fx.arc(), SessionOptions::default());
        let opts = GenerateOptions {
            params,
            ..Default::default()
        };
        match run(&mut s, &prompt(), &opts, &tok, &CancelToken::new()).0 {
            Err(Error::InvalidSamplingParam { name, .. }) => assert_eq!(name, field),
            other => panic!("{field}: expected InvalidSamplingParam, got {other:?}"),
        }
        assert!(
            s.tokens.is_empty(),
            "{field}: nothing is fed when the parameters are refused"
        );
    }

    let mut fresh = Session::new(fx.arc(), SessionOptions::default());
    match run(&mut fresh, &[], &greedy(4), &tok, &CancelToken::new()).0 {
        Err(e @ Error::Generate(_)) => assert!(e.to_string().contains("empty prompt"), "{e}"),
        other => panic!("empty prompt on a fresh session: expected Error::Generate, got {other:?}"),
    }
    // An out-of-vocabulary prompt id is a model error, not a panic.
    match run(&mut fresh, &[300], &greedy(4), &tok, &CancelToken::new()).0 {
        Err(Error::Model(e)) if matches!(*e, tptt::Error::Input(_)) => {
            assert!(e.to_string().contains("300"), "{e}")
        }
        other => panic!("bad token id: expected a model input error, got {other:?}"),
    }

    // An empty prompt continues a session that has read something.
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let a = run(&mut s, &prompt(), &greedy(3), &tok, &CancelToken::new())
        .0
        .expect("generate");
    let b = run(&mut s, &[], &greedy(3), &tok, &CancelToken::new())
        .0
        .expect("continue with an empty prompt");
    let whole = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(6),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    assert_eq!(
        [a.ids, b.ids].concat(),
        whole.ids,
        "3 + 3 continued = 6 in one go"
    );
}

/// A sink that forwards events over a channel (the worker needs a `Send` sink).
fn channel_sink() -> (Box<dyn FnMut(Event) + Send>, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    (Box::new(move |e| drop(tx.send(e))), rx)
}

#[test]
fn engine_thread_runs_jobs_streams_events_and_returns_the_session() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let direct = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(10),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    let continued_direct = {
        let mut s = Session::new(fx.arc(), SessionOptions::default());
        run(&mut s, &prompt(), &greedy(10), &tok, &CancelToken::new())
            .0
            .expect("generate");
        run(&mut s, &[5, 6, 7], &greedy(6), &tok, &CancelToken::new())
            .0
            .expect("continue")
    };

    let engine = Engine::spawn(Arc::new(tok)).expect("spawn the engine thread");
    let caller = std::thread::current().id();
    let ran_on = Arc::new(Mutex::new(None));
    let seen = ran_on.clone();
    let (tx, events) = mpsc::channel();
    let sink: Box<dyn FnMut(Event) + Send> = Box::new(move |e| {
        *seen.lock().expect("lock") = Some(std::thread::current().id());
        let _ = tx.send(e);
    });
    let job = Job {
        session: Session::new(fx.arc(), SessionOptions::default()),
        prompt: prompt(),
        options: greedy(10),
        sink,
        cancel: CancelToken::new(),
    };
    let result = engine
        .submit(job)
        .expect("submit")
        .recv_timeout(Duration::from_secs(60))
        .expect("job result");
    let out = result.outcome.expect("generation succeeded");
    assert_eq!(out.ids, direct.ids, "same tokens on the engine thread");
    assert_eq!(out.text, direct.text);
    let streamed: String = events
        .try_iter()
        .filter_map(|e| match e {
            Event::Token { text, .. } => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, out.text, "events streamed to the sink");
    assert_ne!(
        *ran_on.lock().expect("lock"),
        Some(caller),
        "the job ran on the engine's own thread"
    );
    let session = result.session.expect("the session comes back");
    assert_eq!(
        session.tokens,
        [prompt(), out.ids.clone()].concat(),
        "the session comes back with what it read"
    );

    // A second job continues the returned session.
    let (sink, events) = channel_sink();
    let job = Job {
        session,
        prompt: vec![5, 6, 7],
        options: greedy(6),
        sink,
        cancel: CancelToken::new(),
    };
    let result = engine
        .submit(job)
        .expect("submit")
        .recv_timeout(Duration::from_secs(60))
        .expect("job result");
    let out = result.outcome.expect("continuation");
    assert_eq!(out.ids, continued_direct.ids);
    assert_eq!(
        events
            .try_iter()
            .filter_map(|e| match e {
                Event::Token { text, .. } => Some(text),
                _ => None,
            })
            .collect::<String>(),
        out.text
    );

    // A cancelled job and a failing job both hand the session back.
    let cancel = CancelToken::new();
    cancel.cancel();
    let (sink, _events) = channel_sink();
    let session = result.session.expect("the session comes back");
    let before = session.tokens.len();
    let job = Job {
        session,
        prompt: vec![9],
        options: greedy(6),
        sink,
        cancel,
    };
    let result = engine
        .submit(job)
        .expect("submit")
        .recv_timeout(Duration::from_secs(60))
        .expect("job result");
    assert_eq!(
        result.outcome.expect("cancelled is not an error").finish,
        FinishReason::Cancelled
    );
    let session = result
        .session
        .expect("a cancelled job hands the session back");
    assert_eq!(session.tokens.len(), before);
    let (sink, _events) = channel_sink();
    let bad = GenerateOptions {
        params: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        },
        ..Default::default()
    };
    let job = Job {
        session,
        prompt: vec![9],
        options: bad,
        sink,
        cancel: CancelToken::new(),
    };
    let result = engine
        .submit(job)
        .expect("submit")
        .recv_timeout(Duration::from_secs(60))
        .expect("job result");
    assert!(matches!(
        result.outcome,
        Err(Error::InvalidSamplingParam { .. })
    ));
    assert_eq!(
        result
            .session
            .expect("a failed job hands the session back")
            .tokens
            .len(),
        before
    );

    // Cancelling a running job from another thread stops it.
    let cancel = CancelToken::new();
    let (tx, events) = mpsc::channel();
    let stopper = cancel.clone();
    let sink: Box<dyn FnMut(Event) + Send> = Box::new(move |e| {
        stopper.cancel();
        let _ = tx.send(e);
    });
    let job = Job {
        session: Session::new(fx.arc(), SessionOptions::default()),
        prompt: prompt(),
        options: greedy(200),
        sink,
        cancel,
    };
    let result = engine
        .submit(job)
        .expect("submit")
        .recv_timeout(Duration::from_secs(60))
        .expect("job result");
    let out = result.outcome.expect("cancelled");
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert!(out.ids.len() < 200);
    assert_eq!(
        events
            .try_iter()
            .filter_map(|e| match e {
                Event::Token { text, .. } => Some(text),
                _ => None,
            })
            .collect::<String>(),
        out.text
    );
    drop(engine); // joins the thread
}

#[test]
fn a_panicking_job_ends_in_an_error_and_the_engine_runs_the_next_job() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let expected = run(
        &mut Session::new(fx.arc(), SessionOptions::default()),
        &prompt(),
        &greedy(5),
        &tok,
        &CancelToken::new(),
    )
    .0
    .expect("generate");
    let engine = Engine::spawn(Arc::new(tok)).expect("spawn the engine thread");
    // A sink that panics on the first token (a bug in the caller's code, or anywhere in the
    // generation loop: the job boundary is the same).
    let sink: Box<dyn FnMut(Event) + Send> = Box::new(|e| {
        if let Event::Token { text, .. } = e {
            panic!("sink bug on {text:?}");
        }
    });
    let job = Job {
        session: Session::new(fx.arc(), SessionOptions::default()),
        prompt: prompt(),
        options: greedy(5),
        sink,
        cancel: CancelToken::new(),
    };
    let result = engine
        .submit(job)
        .expect("submit")
        .recv_timeout(Duration::from_secs(60))
        .expect("a result, not a dead thread");
    match &result.outcome {
        Err(Error::Panicked { message }) => {
            assert!(message.contains("sink bug on"), "{message}")
        }
        other => panic!("expected Error::Panicked, got {other:?}"),
    }
    let shown = result
        .outcome
        .as_ref()
        .map(|_| ())
        .expect_err("error")
        .to_string();
    assert!(
        shown.contains("sink bug on") && shown.contains("report"),
        "{shown}"
    );
    assert!(
        result.session.is_none(),
        "a session that may be half-updated is not handed back"
    );

    // The thread lives on: the next job on the same engine runs normally.
    let (sink, events) = channel_sink();
    let job = Job {
        session: Session::new(fx.arc(), SessionOptions::default()),
        prompt: prompt(),
        options: greedy(5),
        sink,
        cancel: CancelToken::new(),
    };
    let result = engine
        .submit(job)
        .expect("the engine still takes jobs")
        .recv_timeout(Duration::from_secs(60))
        .expect("job result");
    let out = result.outcome.expect("the next job succeeds");
    assert_eq!(out.ids, expected.ids);
    assert!(result.session.is_some());
    assert!(events.try_iter().any(|e| matches!(e, Event::Token { .. })));
}

#[test]
fn the_prompt_read_event_comes_once_before_the_first_token() {
    let fx = fixture();
    let tok = fx.tokenizer();
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let mut events = Vec::new();
    let prompt = token_ids(40, 300, 8);
    s.generate(&prompt, &greedy(4), &tok, &CancelToken::new(), &mut |e| {
        events.push(e)
    })
    .expect("generate");
    let Some(Event::PromptRead { surprise }) = events.first() else {
        panic!("first event: {:?}", events.first());
    };
    // A 40-token prompt is sampled every 8 positions; its record is the session's.
    assert_eq!(surprise.samples, 4);
    assert_eq!(*surprise, s.surprise, "generated tokens are not scored");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::PromptRead { .. }))
            .count(),
        1
    );
    // Continuing with an empty prompt reads nothing: no event.
    let mut again = Vec::new();
    s.generate(&[], &greedy(2), &tok, &CancelToken::new(), &mut |e| {
        again.push(e)
    })
    .expect("continue");
    assert!(again.iter().all(|e| matches!(e, Event::Token { .. })));
}

#[test]
fn a_long_prompt_reports_its_reading_block_by_block_and_a_stop_counts_what_was_read() {
    use tptt_engine::session::PREFILL_BLOCK;
    let fx = fixture();
    let tok = fx.tokenizer();
    let long = token_ids(2 * PREFILL_BLOCK + 100, 300, 5);
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let mut events = Vec::new();
    let out = s
        .generate(&long, &greedy(3), &tok, &CancelToken::new(), &mut |e| {
            events.push(e)
        })
        .expect("generate");
    // One event per block but the last, counting up to the prompt, then the prompt read.
    let reads: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Prefill { read, total, .. } => Some((*read, *total)),
            _ => None,
        })
        .collect();
    let total = long.len();
    assert_eq!(
        reads,
        vec![(PREFILL_BLOCK, total), (2 * PREFILL_BLOCK, total)]
    );
    let first_other = events
        .iter()
        .position(|e| !matches!(e, Event::Prefill { .. }))
        .expect("more events");
    assert_eq!(first_other, 2);
    assert!(matches!(events[2], Event::PromptRead { .. }));
    // Each token says how many were generated so far; the last says all of them.
    let generated: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { generated, .. } => Some(*generated),
            _ => None,
        })
        .collect();
    assert!(generated.windows(2).all(|w| w[0] <= w[1]), "{generated:?}");
    assert_eq!(generated.last(), Some(&out.ids.len()));
    assert_eq!(out.stats.prompt_tokens, total);

    // Stopped after the first block: the stats count what was read, the session holds it.
    let cancel = CancelToken::new();
    let trigger = cancel.clone();
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    let out = s
        .generate(&long, &greedy(3), &tok, &cancel, &mut |e| {
            if matches!(e, Event::Prefill { .. }) {
                trigger.cancel();
            }
        })
        .expect("a stop is not an error");
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert_eq!(out.stats.prompt_tokens, PREFILL_BLOCK);
    assert_eq!(s.tokens.len(), PREFILL_BLOCK);
    assert_eq!(s.state.pos, PREFILL_BLOCK);
    assert!(out.stats.prefill_tokens_per_s > 0.0);
}
