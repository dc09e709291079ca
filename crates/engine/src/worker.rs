//! The generation thread: an [`Engine`] owns an OS thread that runs [`Job`]s one at a time, so
//! callers (a UI command, the CLI) return at once and receive tokens through their sink.
//! A job moves its [`Session`] in and gets it back in the [`JobResult`], whatever happened.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::session::{CancelToken, Event, GenerateOptions, Outcome, Session};

/// One generation request.
pub struct Job {
    /// The conversation (moved in, returned in the result).
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

/// What a job hands back: the session (always) and the outcome or the error.
pub struct JobResult {
    /// The session after the job (holding everything fed, even on error).
    pub session: Session,
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
                    let Job {
                        mut session,
                        prompt,
                        options,
                        mut sink,
                        cancel,
                    } = *job;
                    let outcome =
                        session.generate(&prompt, &options, &tokenizer, &cancel, &mut *sink);
                    // The caller may have gone away; nothing to do then.
                    let _ = reply.send(JobResult { session, outcome });
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

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
