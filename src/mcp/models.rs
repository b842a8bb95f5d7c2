//! Where the MCP tools that need a model (`ground`, `run_task`) get one: [`ModelSource`] hands
//! out a model for one call. `vlad mcp` opens its model on first use and shares it
//! ([`LazyModel`]); the daemon hands out handles on its loaded engine; [`NoModel`] answers every
//! request with the reason there is none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::{GenerationOptions, Prompt};
use crate::model::{Completion, Model, ModelError, StopReason};

/// A source of models for tool calls.
pub trait ModelSource: Send + Sync {
    /// A model for one call (a `ground`, or a whole `run_task`). Once `cancel` is set,
    /// generation should stop. `Err` is the reason there is no model, for the caller to read.
    fn acquire(&self, cancel: Arc<AtomicBool>) -> Result<Box<dyn Model>, String>;
}

impl<F> ModelSource for F
where
    F: Fn(Arc<AtomicBool>) -> Result<Box<dyn Model>, String> + Send + Sync,
{
    fn acquire(&self, cancel: Arc<AtomicBool>) -> Result<Box<dyn Model>, String> {
        self(cancel)
    }
}

/// No model: every request is answered with `reason`.
#[derive(Debug, Clone)]
pub struct NoModel {
    reason: String,
}

impl NoModel {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl ModelSource for NoModel {
    fn acquire(&self, _cancel: Arc<AtomicBool>) -> Result<Box<dyn Model>, String> {
        Err(self.reason.clone())
    }
}

type Opener = Box<dyn Fn() -> Result<Box<dyn Model>, String> + Send + Sync>;
/// A model shared by several callers.
type Shared = Arc<Mutex<Box<dyn Model>>>;

/// One model, opened by the first call that needs it (a failed open is tried again next time)
/// and shared by all later calls, one generation at a time.
pub struct LazyModel {
    open: Opener,
    slot: Mutex<Option<Shared>>,
}

impl LazyModel {
    pub fn new(open: impl Fn() -> Result<Box<dyn Model>, String> + Send + Sync + 'static) -> Self {
        Self {
            open: Box::new(open),
            slot: Mutex::new(None),
        }
    }
}

impl ModelSource for LazyModel {
    fn acquire(&self, cancel: Arc<AtomicBool>) -> Result<Box<dyn Model>, String> {
        // Held while opening, so two first calls do not load the model twice.
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let shared = match slot.as_ref() {
            Some(shared) => shared.clone(),
            None => {
                let shared = Arc::new(Mutex::new((self.open)()?));
                *slot = Some(shared.clone());
                shared
            }
        };
        Ok(Box::new(SharedHandle { shared, cancel }))
    }
}

/// One caller's handle on a shared model: it locks the model per generation.
struct SharedHandle {
    shared: Shared,
    cancel: Arc<AtomicBool>,
}

impl Model for SharedHandle {
    fn generate(
        &mut self,
        prompt: &Prompt,
        options: &GenerationOptions,
    ) -> crate::model::Result<Completion> {
        let cancelled = || Completion {
            text: String::new(),
            stop: StopReason::Cancelled,
            tokens: Some(0),
            timings: serde_json::Value::Null,
        };
        if self.cancel.load(Ordering::SeqCst) {
            return Ok(cancelled());
        }
        let mut model = self.shared.lock().map_err(|_| {
            ModelError::Option(
                "an earlier generation crashed and left the model unusable; restart the MCP server"
                    .into(),
            )
        })?;
        if self.cancel.load(Ordering::SeqCst) {
            return Ok(cancelled());
        }
        let options = GenerationOptions {
            cancel: options.cancel.clone().or_else(|| Some(self.cancel.clone())),
            ..options.clone()
        };
        model.generate(prompt, &options)
    }

    fn name(&self) -> String {
        match self.shared.lock() {
            Ok(model) => model.name(),
            Err(_) => "unusable model".to_string(),
        }
    }

    fn model_image_size(&self, screenshot: (u32, u32)) -> Option<(u32, u32)> {
        self.shared.lock().ok()?.model_image_size(screenshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReplayModel;

    #[test]
    fn a_lazy_model_opens_once_and_is_shared() {
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = opened.clone();
        let source = LazyModel::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(ReplayModel::from_replies(
                "r.jsonl",
                vec!["one".into(), "two".into()],
            )) as Box<dyn Model>)
        });
        let options = GenerationOptions::default();
        let prompt = Prompt::default();
        let flag = Arc::new(AtomicBool::new(false));
        let first = source
            .acquire(flag.clone())
            .and_then(|mut m| m.generate(&prompt, &options).map_err(|e| e.to_string()));
        let second = source
            .acquire(flag.clone())
            .and_then(|mut m| m.generate(&prompt, &options).map_err(|e| e.to_string()));
        assert_eq!(first.map(|c| c.text), Ok("one".to_string()));
        assert_eq!(second.map(|c| c.text), Ok("two".to_string()));
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        // A cancelled handle does not consume a reply.
        flag.store(true, Ordering::SeqCst);
        let cancelled = source
            .acquire(flag)
            .and_then(|mut m| m.generate(&prompt, &options).map_err(|e| e.to_string()));
        assert_eq!(cancelled.map(|c| c.stop), Ok(StopReason::Cancelled));
    }

    #[test]
    fn no_model_says_why() {
        let source = NoModel::new("start with --model");
        let got = source.acquire(Arc::new(AtomicBool::new(false)));
        assert_eq!(got.err(), Some("start with --model".to_string()));
    }
}
