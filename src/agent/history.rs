//! The conversation of one run and its history policy: a system turn, the user's task with the
//! first screenshot, and one assistant turn that grows step by step (reply, `*RESULT*: <new
//! screenshot>`, `*RETURN*:`). Only the last K screenshots go to the model as images; older ones
//! become a short text placeholder, and all text is kept.

use std::sync::Arc;

use image::RgbImage;
use minijinja::context;

use super::AgentError;
use super::texts::Texts;
use super::trajectory::PromptSummary;
use crate::engine::{Content, Message, Part, Prompt};
use crate::protocol::MarkerStyle;
use crate::protocol::render::{ResultPart, Segment, result_segments};

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    /// Screenshot number (0 is the first one, in the user turn).
    Image(usize),
}

/// The conversation so far.
#[derive(Debug, Clone)]
pub struct Conversation {
    system: String,
    task: String,
    images: Vec<Arc<RgbImage>>,
    assistant: Vec<Piece>,
    started: bool,
}

impl Conversation {
    /// `task` is the rendered user text; `first` the first screenshot.
    pub fn new(system: String, task: String, first: RgbImage) -> Self {
        Self {
            system,
            task,
            images: vec![Arc::new(first)],
            assistant: Vec::new(),
            started: false,
        }
    }

    /// The assistant text so far (images left out).
    pub fn assistant_text(&self) -> String {
        self.assistant
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                Piece::Image(_) => None,
            })
            .collect()
    }

    /// Appends the kept part of a reply to the assistant turn.
    pub fn push_reply(&mut self, reply: &str) {
        self.started = true;
        self.assistant.push(Piece::Text(reply.to_string()));
    }

    /// Appends `*RESULT*: <text> <screenshot>\n*RETURN*:`; `text` may be empty.
    pub fn push_result(&mut self, text: &str, screenshot: RgbImage, style: MarkerStyle) {
        self.started = true;
        let mut parts = Vec::new();
        if !text.is_empty() {
            parts.push(ResultPart::Text(text.to_string()));
        }
        parts.push(ResultPart::Image);
        let segments = result_segments(&self.assistant_text(), style, &parts);
        for segment in segments {
            match segment {
                Segment::Text(t) => self.assistant.push(Piece::Text(t)),
                Segment::Image => {
                    self.images.push(Arc::new(screenshot.clone()));
                    self.assistant.push(Piece::Image(self.images.len() - 1));
                }
            }
        }
    }

    /// Screenshots so far.
    pub fn screenshots(&self) -> usize {
        self.images.len()
    }

    /// The prompt for the next step, keeping the last `keep_images` screenshots as images.
    pub fn prompt(
        &self,
        keep_images: usize,
        texts: &Texts,
    ) -> Result<(Prompt, PromptSummary), AgentError> {
        let first_kept = self.images.len().saturating_sub(keep_images);
        let mut summary = PromptSummary {
            continued: self.started,
            ..Default::default()
        };
        let mut render = |index: usize, out: &mut Vec<Part>| -> Result<(), AgentError> {
            if index >= first_kept {
                summary.images += 1;
                if let Some(img) = self.images.get(index) {
                    out.push(Part::Image(img.clone()));
                }
            } else {
                summary.placeholders += 1;
                let text = texts.render("placeholder", context! { step => index + 1 })?;
                push_text(out, &text);
            }
            Ok(())
        };
        let mut user = Vec::new();
        push_text(&mut user, &self.task);
        render(0, &mut user)?;
        let mut messages = vec![
            Message::text("system", self.system.clone()),
            Message::parts("user", user),
        ];
        if self.started {
            let mut parts = Vec::new();
            for piece in &self.assistant {
                match piece {
                    Piece::Text(t) => push_text(&mut parts, t),
                    Piece::Image(i) => render(*i, &mut parts)?,
                }
            }
            messages.push(Message::parts("assistant", parts));
        }
        summary.messages = messages.len();
        summary.text_chars = messages
            .iter()
            .map(|m| match &m.content {
                Content::Text(t) => t.chars().count(),
                Content::Parts(parts) => parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => t.chars().count(),
                        _ => 0,
                    })
                    .sum(),
            })
            .sum();
        let prompt = Prompt {
            messages,
            continue_final_message: self.started,
        };
        Ok((prompt, summary))
    }
}

/// Appends text, merged into a text part right before it.
fn push_text(parts: &mut Vec<Part>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Part::Text(last)) = parts.last_mut() {
        last.push_str(text);
    } else {
        parts.push(Part::Text(text.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_screenshots_become_placeholders() -> Result<(), AgentError> {
        let texts = Texts::builtin()?;
        let img = RgbImage::new(4, 4);
        let mut c = Conversation::new("sys".into(), "task ".into(), img.clone());
        let (p, s) = c.prompt(2, &texts)?;
        assert_eq!((s.images, s.placeholders, p.messages.len()), (1, 0, 2));
        assert!(!p.continue_final_message);
        for _ in 0..3 {
            c.push_reply("*FUNCTION*: Wait *ARGS*: {}");
            c.push_result("", img.clone(), MarkerStyle::Asterisk);
        }
        let (p, s) = c.prompt(2, &texts)?;
        assert_eq!((s.images, s.placeholders), (2, 2));
        assert!(p.continue_final_message);
        let Content::Parts(parts) = &p.messages[2].content else {
            panic!("assistant turn should have parts");
        };
        assert!(matches!(parts.last(), Some(Part::Text(t)) if t.ends_with("*RETURN*:")));
        Ok(())
    }
}
