//! The daemon's one loaded engine as a [`Model`] for tasks: every `generate` locks the engine
//! mutex that chat completions use too, so tasks on different devices and API clients share one
//! copy of the weights and take turns per model call. A task's stop flag cancels its generation
//! between tokens and skips a call that was still waiting for the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::{EngineError, GenerationOptions, Prompt, Qwen2Vl};
use crate::model::{Completion, Model, ModelError, StopReason};

/// A handle on the daemon's engine for one task.
pub struct SharedModel {
    engine: Arc<Mutex<Qwen2Vl>>,
    name: String,
    cancel: Arc<AtomicBool>,
}

impl SharedModel {
    /// `cancel`: the task's stop flag; once set, generation ends at the next token.
    pub fn new(engine: Arc<Mutex<Qwen2Vl>>, name: String, cancel: Arc<AtomicBool>) -> Self {
        Self {
            engine,
            name,
            cancel,
        }
    }

    fn cancelled() -> Completion {
        Completion {
            text: String::new(),
            stop: StopReason::Cancelled,
            tokens: Some(0),
            timings: serde_json::Value::Null,
        }
    }
}

impl Model for SharedModel {
    fn generate(
        &mut self,
        prompt: &Prompt,
        options: &GenerationOptions,
    ) -> crate::model::Result<Completion> {
        if self.cancel.load(Ordering::SeqCst) {
            return Ok(Self::cancelled());
        }
        let mut engine = self.engine.lock().map_err(|_| {
            ModelError::Engine(EngineError::Device(
                "an earlier generation crashed and left the model in an unknown state; restart `vlad serve`"
                    .into(),
            ))
        })?;
        // The task may have been cancelled while another device or a chat client held the engine.
        if self.cancel.load(Ordering::SeqCst) {
            return Ok(Self::cancelled());
        }
        let options = GenerationOptions {
            cancel: Some(self.cancel.clone()),
            ..options.clone()
        };
        let generation = engine.generate(prompt, &options, |_| {})?;
        drop(engine);
        Ok(crate::model::embedded::completion_of(generation))
    }

    fn name(&self) -> String {
        format!("embedded:{}", self.name)
    }

    fn model_image_size(&self, (width, height): (u32, u32)) -> Option<(u32, u32)> {
        let engine = self.engine.lock().ok()?;
        let c = engine.processor().image_config();
        crate::engine::image::smart_resize(height, width, c.factor(), c.min_pixels, c.max_pixels)
            .ok()
            .map(|(h, w)| (w, h))
    }
}
