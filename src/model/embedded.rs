//! The embedded backend: the candle Qwen2-VL engine in this process.

use serde_json::json;

use super::{Completion, GenerationOptions, Model, Prompt, Result, StopReason};
use crate::engine::{FinishReason, Generation, LoadOptions, Qwen2Vl};

/// A loaded engine behind the [`Model`] trait.
pub struct EmbeddedModel {
    engine: Qwen2Vl,
    name: String,
}

impl EmbeddedModel {
    /// Loads a model folder or hub id (default [`super::DEFAULT_MODEL`]).
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self> {
        let engine = Qwen2Vl::load(spec, options)?;
        Ok(Self {
            engine,
            name: format!("embedded:{spec}"),
        })
    }

    /// Wraps an engine that is already loaded.
    pub fn from_engine(engine: Qwen2Vl, name: impl Into<String>) -> Self {
        Self {
            engine,
            name: name.into(),
        }
    }

    pub fn engine(&self) -> &Qwen2Vl {
        &self.engine
    }
}

/// The agent's view of one engine generation: text, why it stopped, token count and timings.
pub(crate) fn completion_of(generation: Generation) -> Completion {
    let stop = match generation.finish_reason {
        FinishReason::Eos(_) => StopReason::EndOfTurn,
        FinishReason::StopString(s) => StopReason::StopString(s),
        FinishReason::MaxTokens => StopReason::Length,
        FinishReason::Cancelled => StopReason::Cancelled,
    };
    let t = &generation.timings;
    Completion {
        text: generation.text,
        stop,
        tokens: Some(generation.token_ids.len()),
        timings: json!({
            "preprocess_s": t.preprocess_s,
            "vision_s": t.vision_s,
            "prefill_s": t.prefill_s,
            "decode_tokens_per_s": t.decode_tokens_per_s,
            "prompt_tokens": generation.prompt_token_ids.len(),
            "reused_prompt_tokens": generation.reused_prompt_tokens,
            "reused_media": generation.reused_media,
        }),
    }
}

impl Model for EmbeddedModel {
    fn generate(&mut self, prompt: &Prompt, options: &GenerationOptions) -> Result<Completion> {
        let generation = self.engine.generate(prompt, options, |text| {
            tracing::trace!(target: "vlad::model", "{text}");
        })?;
        Ok(completion_of(generation))
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn model_image_size(&self, (width, height): (u32, u32)) -> Option<(u32, u32)> {
        let c = self.engine.processor().image_config();
        crate::engine::image::smart_resize(height, width, c.factor(), c.min_pixels, c.max_pixels)
            .ok()
            .map(|(h, w)| (w, h))
    }
}
