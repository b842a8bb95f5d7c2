//! Renders a [`Prompt`] with the checkpoint's own Jinja chat template (minijinja) and turns it into
//! token ids, expanding each image/video pad to the number of tokens its grid needs — what
//! `Qwen2VLProcessor.apply_chat_template` + `__call__` do in the reference.

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, context};
use serde_json::json;
use tokenizers::Tokenizer;

use super::error::{EngineError, Result};
use super::prompt::{Content, Part, Prompt};

/// The name the template is registered under.
const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source` (Hugging Face Jinja dialect).
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| EngineError::Template(format!("cannot compile the chat template: {e}")))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Finds the template of a model folder: `chat_template.json`, `chat_template.jinja`, or the
    /// `chat_template` field of `tokenizer_config.json` (a string or a list of named templates).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        let token_text = |key: &str| -> Option<String> {
            let v = tokenizer_config.as_ref()?.get(key)?;
            v.as_str().map(str::to_string).or_else(|| {
                v.get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
        };
        let (bos, eos) = (token_text("bos_token"), token_text("eos_token"));
        if let Some(v) = read_json(&dir.join("chat_template.json"))?
            && let Some(src) = v.get("chat_template").and_then(|t| t.as_str())
        {
            return Self::new(src, bos, eos);
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let src = std::fs::read_to_string(&jinja).map_err(|source| EngineError::Io {
                path: jinja.clone(),
                source,
            })?;
            return Self::new(&src, bos, eos);
        }
        match tokenizer_config.as_ref().and_then(|c| c.get("chat_template")) {
            Some(serde_json::Value::String(src)) => Self::new(src, bos, eos),
            Some(serde_json::Value::Array(list)) => {
                let default = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                let src = default
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| EngineError::BadFile {
                        path: dir.join("tokenizer_config.json"),
                        message: "chat_template list has no usable template".into(),
                    })?;
                Self::new(src, bos, eos)
            }
            _ => Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                file: "chat template".into(),
                hint: "add chat_template.json (or a chat_template field in tokenizer_config.json) from the original checkpoint".into(),
            }),
        }
    }

    /// Renders the conversation to text, with one `<|image_pad|>`/`<|video_pad|>` per media item
    /// (as the template writes them), and the generation prompt or a continued final message.
    pub fn render(&self, prompt: &Prompt) -> Result<String> {
        let messages: Vec<serde_json::Value> = prompt
            .messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    Content::Text(t) => json!(t),
                    Content::Parts(parts) => json!(
                        parts
                            .iter()
                            .map(|p| match p {
                                Part::Text(t) => json!({"type": "text", "text": t}),
                                Part::Image(_) => json!({"type": "image"}),
                                Part::Video(_) => json!({"type": "video"}),
                            })
                            .collect::<Vec<_>>()
                    ),
                };
                json!({"role": m.role, "content": content})
            })
            .collect();
        let continue_final = prompt.continue_final_message;
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let rendered = template
            .render(context! {
                messages => Value::from_serialize(&messages),
                add_generation_prompt => !continue_final,
                add_vision_id => false,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| EngineError::Template(format!("rendering failed: {e:#}")))?;
        if !continue_final {
            return Ok(rendered);
        }
        // As the reference does: cut everything after the final message's last text.
        let last = prompt.messages.last().ok_or_else(|| {
            EngineError::Prompt("continue_final_message needs at least one message".into())
        })?;
        let tail = match &last.content {
            Content::Text(t) => t.trim().to_string(),
            Content::Parts(parts) => match parts.last() {
                Some(Part::Text(t)) => t.trim().to_string(),
                _ => {
                    return Err(EngineError::Prompt(
                        "continue_final_message needs the final message to end with text".into(),
                    ));
                }
            },
        };
        match rendered.rfind(&tail) {
            Some(pos) if !tail.is_empty() => Ok(rendered[..pos + tail.len()].to_string()),
            _ => Err(EngineError::Prompt(
                "the final message's text does not appear in the rendered template, so it cannot be continued".into(),
            )),
        }
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::BadFile {
            path: path.to_path_buf(),
            message: format!("not JSON: {e}"),
        })
}

/// The special tokens the engine needs, read from the tokenizer.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub image_pad: (String, u32),
    pub video_pad: (String, u32),
}

impl SpecialTokens {
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let find = |text: &str| -> Result<(String, u32)> {
            tokenizer
                .token_to_id(text)
                .map(|id| (text.to_string(), id))
                .ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "the tokenizer has no {text} token; is this a Qwen2-VL tokenizer.json?"
                    ))
                })
        };
        Ok(Self {
            image_pad: find("<|image_pad|>")?,
            video_pad: find("<|video_pad|>")?,
        })
    }
}

/// Replaces the n-th pad token of each kind by `counts[n]` copies, like the reference processor.
/// Errors when the number of pads and the number of media items differ.
pub fn expand_pads(text: &str, pad: &str, counts: &[usize], kind: &str) -> Result<String> {
    if counts.is_empty() {
        // No media of this kind: a pad typed as text stays text, as in the reference.
        return Ok(text.to_string());
    }
    let found = text.matches(pad).count();
    if found != counts.len() {
        return Err(EngineError::Prompt(format!(
            "the rendered prompt has {found} {pad} tokens but {} {kind} inputs were given; \
             do not type {pad} in text, and give one {kind} per placeholder",
            counts.len()
        )));
    }
    let mut out = String::with_capacity(text.len() + counts.iter().sum::<usize>() * pad.len());
    let mut rest = text;
    for &n in counts {
        let Some(pos) = rest.find(pad) else { break };
        out.push_str(&rest[..pos]);
        for _ in 0..n {
            out.push_str(pad);
        }
        rest = &rest[pos + pad.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::prompt::Message;

    const QWEN2VL_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_default_system_turn_and_generation_prompt() {
        let t = ChatTemplate::new(QWEN2VL_TEMPLATE, None, None).unwrap();
        let img = std::sync::Arc::new(image::RgbImage::new(28, 28));
        let p = Prompt::new(vec![Message::parts(
            "user",
            vec![Part::Image(img), Part::Text("What is this?".into())],
        )]);
        assert_eq!(
            t.render(&p).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn continues_the_final_assistant_message() {
        let t = ChatTemplate::new(QWEN2VL_TEMPLATE, None, None).unwrap();
        let mut p = Prompt::new(vec![
            Message::text("user", "Open the map"),
            Message::text(
                "assistant",
                "*FUNCTION*: Home *ARGS*: {}\n*RESULT*: done\n*RETURN*:",
            ),
        ]);
        p.continue_final_message = true;
        let text = t.render(&p).unwrap();
        assert!(text.ends_with("*RETURN*:"), "{text}");
    }

    #[test]
    fn expands_pads_in_order_and_checks_counts() {
        let s = expand_pads("a<P>b<P>c", "<P>", &[2, 1], "image").unwrap();
        assert_eq!(s, "a<P><P>b<P>c");
        assert!(expand_pads("a<P>b", "<P>", &[1, 2], "image").is_err());
        assert_eq!(expand_pads("a<P>b", "<P>", &[], "image").unwrap(), "a<P>b");
    }

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('bad roles') }}", None, None).unwrap();
        let err = t.render(&Prompt::default()).unwrap_err();
        assert!(err.to_string().contains("bad roles"));
    }
}
