//! The generation thread: an [`Engine`] owns an OS thread that runs [`Job`]s one at a time, so
//! callers (a UI command, the CLI) return at once and receive tokens through their sink.
//! A job moves its [`Session`] in and gets it back in the [`JobResult`] — unless the job
//! panicked.
//!
//! # Panics
//! A job that panics (a kernel bug, a value no check caught, a sink that panics) does not take
//! the thread down: the unwind is caught at the job boundary, the job ends with
//! [`Error::Panicked`], and the thread goes on with the next job. The job's session may then be
//! half-updated (a state whose layers read a token that `tokens` does not list, say), so it is
//! dropped, never handed back: [`JobResult::session`] is `None` and the caller rebuilds the
//! conversation's memory (from a snapshot, or from the text). Only a panic that escapes this
//! net (in the thread's own loop) or an abort ends the thread; then [`Engine::submit`] fails,
//! or the result channel disconnects, and the caller should start a new [`Engine`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokenizers::Tokenizer;

use crate::error::{panic_message, Error, Result};
use crate::session::{CancelToken, Event, GenerateOptions, Outcome, Session};

/// One generation request.
pub struct Job {
    /// The conversation (moved in, returned in the result unless the job panicked).
    pub session: Session,
    /// Tokens to feed before generating (may be empty when continuing).
    pub prompt: Vec<u32>,
    /// Sampling and stop settings.
    pub options: GenerateOptions,
    /// Receives text as it is generated.
    pub sink: Box<dyn FnMut(Event) + Send>,
    /// Stops the job at the next token.
    pub cancel: CancelToken,
}

/// What a job hands back: the session (unless the job panicked) and the outcome or the error.
pub struct JobResult {
    /// The session after the job, holding everything fed, even on error — or `None` when the
    /// job panicked ([`Error::Panicked`]): the session may then be half-updated and was
    /// dropped; do not try to recover it, rebuild the memory instead (module doc).
    pub session: Option<Session>,
    /// The outcome, or why it failed.
    pub outcome: Result<Outcome>,
}

enum Msg {
    Run(Box<Job>, mpsc::Sender<JobResult>),
}

/// Owns the generation thread.
pub struct Engine {
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Start the thread. The tokenizer is shared by all jobs.
    pub fn spawn(tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("tptt-engine".into())
            .spawn(move || {
                for Msg::Run(job, reply) in rx {
                    let result = run_job(*job, &tokenizer);
                    // The caller may have gone away; nothing to do then.
                    let _ = reply.send(result);
                }
            })
            .map_err(|e| Error::Generate(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queue a job; the returned receiver yields its result when it ends.
    pub fn submit(&self, job: Job) -> Result<mpsc::Receiver<JobResult>> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or_else(|| Error::Generate("engine is shut down".into()))?
            .send(Msg::Run(Box::new(job), reply))
            .map_err(|_| Error::Generate("the engine thread has stopped".into()))?;
        Ok(rx)
    }
}

/// Runs one job, catching a panic at its boundary (module doc).
fn run_job(job: Job, tokenizer: &Tokenizer) -> JobResult {
    let Job {
        mut session,
        prompt,
        options,
        mut sink,
        cancel,
    } = job;
    // Unwind safety: everything the closure touches mutably (the session, the sink) is
    // dropped after a panic, never used again.
    let caught = catch_unwind(AssertUnwindSafe(|| {
        session.generate(&prompt, &options, tokenizer, &cancel, &mut *sink)
    }));
    match caught {
        Ok(outcome) => JobResult {
            session: Some(session),
            outcome,
        },
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            tracing::error!(%message, "a generation job panicked; its session is dropped");
            JobResult {
                session: None,
                outcome: Err(Error::Panicked { message }),
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
