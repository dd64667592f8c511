//! The pipeline as the generation thread sees it: messages go into its head (stage 0) and
//! sampled tokens come out of its tail (the last stage), whatever lies in between.
//!
//! * [`LocalPipeline`] — every layer in this process (no workers): the one stage runs inside
//!   `send`, on the generation thread, with no copies and no threads in between.
//! * The cluster's pipeline (`cluster::ClusterPipeline`) — stage 0 here or on a worker, the
//!   rest on workers, activations flowing stage to stage over QUIC, the last stage's sampled
//!   tokens coming back to us.
//!
//! Both run the same [`StageRunner`], so a sequence samples exactly the same tokens on one
//! machine and on many.

use std::collections::VecDeque;
use std::time::Duration;

use potluck_protocol::{Message, SampledTokens};
use potluck_node::stage::{StageCounters, StageRunner};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    /// The step failed on a stage or in transit; the step's sequences fail, the service goes on.
    #[error("{0}")]
    Step(String),
    /// The pipeline cannot carry anything any more (a stage left); a new one is needed.
    #[error("the cluster pipeline is broken: {0}")]
    Broken(String),
    #[error("no answer from the pipeline within {0:?}")]
    Timeout(Duration),
}

/// The head and tail of a pipeline.
pub trait Pipeline: Send {
    /// Puts a message into stage 0: [`Message::SequenceStart`], [`Message::StepTokens`] or
    /// [`Message::ReleaseSequence`], in the order the stages must see them.
    fn send(&mut self, message: Message) -> Result<(), PipelineError>;
    /// The next step's sampled tokens, in the order the steps were sent.
    fn recv(&mut self, timeout: Duration) -> Result<SampledTokens, PipelineError>;
    /// One line for logs: the stages and their layers.
    fn describe(&self) -> String;
    /// Steps worth keeping in flight at once: one per stage, so every stage has work while
    /// the others work on theirs (1 where `send` computes the whole step itself).
    fn depth(&self) -> usize {
        1
    }
    /// The stage this process runs, if any: its counters, and the round trip of its link
    /// to the next stage (for `/metrics` and the dashboard).
    fn local_stage(&self) -> Option<LocalStage> {
        None
    }
}

/// What the coordinator's own stage has done.
#[derive(Debug, Clone, Copy)]
pub struct LocalStage {
    pub counters: StageCounters,
    pub next_hop_rtt: Option<Duration>,
}

/// Every layer on this machine.
pub struct LocalPipeline {
    runner: StageRunner,
    sampled: VecDeque<Result<SampledTokens, PipelineError>>,
}

impl LocalPipeline {
    pub fn new(runner: StageRunner) -> Self {
        assert!(
            runner.model().is_first() && runner.model().is_last(),
            "a local pipeline runs the whole model"
        );
        Self { runner, sampled: VecDeque::new() }
    }
}

impl Pipeline for LocalPipeline {
    fn send(&mut self, message: Message) -> Result<(), PipelineError> {
        let is_step = matches!(message, Message::StepTokens(_));
        match self.runner.handle(message) {
            Ok(Some(Message::SampledTokens(sampled))) => self.sampled.push_back(Ok(sampled)),
            Ok(_) => {}
            // A failed step still answers (with its error), so steps and answers stay paired.
            Err(e) if is_step => self.sampled.push_back(Err(PipelineError::Step(e.to_string()))),
            Err(e) => return Err(PipelineError::Step(e.to_string())),
        }
        Ok(())
    }

    fn recv(&mut self, _timeout: Duration) -> Result<SampledTokens, PipelineError> {
        self.sampled
            .pop_front()
            .unwrap_or_else(|| Err(PipelineError::Step("no step in flight".into())))
    }

    fn describe(&self) -> String {
        let layers = self.runner.model().layers();
        format!("this machine: layers {}..{}", layers.start, layers.end)
    }

    fn local_stage(&self) -> Option<LocalStage> {
        Some(LocalStage { counters: self.runner.counters(), next_hop_rtt: None })
    }
}

/// No model to run: every request fails with `reason` (the cluster lost the nodes it needs
/// and waits for them), rather than hanging.
pub struct UnavailablePipeline {
    reason: String,
}

impl UnavailablePipeline {
    pub fn new(reason: String) -> Self {
        Self { reason }
    }
}

impl Pipeline for UnavailablePipeline {
    fn send(&mut self, message: Message) -> Result<(), PipelineError> {
        match message {
            Message::ReleaseSequence(_) => Ok(()),
            _ => Err(PipelineError::Step(self.reason.clone())),
        }
    }

    fn recv(&mut self, _timeout: Duration) -> Result<SampledTokens, PipelineError> {
        Err(PipelineError::Step(self.reason.clone()))
    }

    fn describe(&self) -> String {
        format!("unavailable: {}", self.reason)
    }
}
