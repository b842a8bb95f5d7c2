//! A model that hands out recorded replies and keeps every prompt it was given, and the text of
//! a prompt for checking what the model was shown.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vlad::engine::{Content, GenerationOptions, Part, Prompt};
use vlad::model::{Completion, Model, ReplayModel};

pub struct Recording {
    inner: ReplayModel,
    prompts: Arc<Mutex<Vec<Prompt>>>,
    /// How long each reply takes.
    pub delay: Duration,
}

impl Recording {
    /// The model and the prompts it will be given.
    pub fn new(replies: &[&str]) -> (Self, Arc<Mutex<Vec<Prompt>>>) {
        let prompts = Arc::new(Mutex::new(Vec::new()));
        let model = Self {
            inner: ReplayModel::from_replies(
                "test.jsonl",
                replies.iter().map(|r| r.to_string()).collect(),
            ),
            prompts: prompts.clone(),
            delay: Duration::ZERO,
        };
        (model, prompts)
    }
}

impl Model for Recording {
    fn generate(
        &mut self,
        prompt: &Prompt,
        options: &GenerationOptions,
    ) -> vlad::model::Result<Completion> {
        if let Ok(mut p) = self.prompts.lock() {
            p.push(prompt.clone());
        }
        std::thread::sleep(self.delay);
        self.inner.generate(prompt, options)
    }
    fn name(&self) -> String {
        "recording".into()
    }
}

/// Each message's role and text, images as `<img>`.
pub fn flatten(prompt: &Prompt) -> Vec<(String, String)> {
    prompt
        .messages
        .iter()
        .map(|m| {
            let text = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => t.clone(),
                        Part::Image(_) => "<img>".to_string(),
                        Part::Video(_) => "<video>".to_string(),
                    })
                    .collect(),
            };
            (m.role.clone(), text)
        })
        .collect()
}

/// All text of a prompt, its messages joined by newlines, images as `<img>`.
pub fn all_text(prompt: &Prompt) -> String {
    flatten(prompt)
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join("\n")
}
