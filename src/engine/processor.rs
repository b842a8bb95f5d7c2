//! The processor: from a [`Prompt`] to model inputs, as `Qwen2VLProcessor` does — render the chat
//! template, preprocess images and videos, expand each pad to its token count, tokenize, and
//! compute the M-RoPE positions. Needs only the tokenizer/template/preprocessor files of a model
//! folder, not the weights.

use std::path::Path;

use tokenizers::Tokenizer;

use super::chat::{self, ChatTemplate, SpecialTokens};
use super::error::{EngineError, Result};
use super::image::{self, PatchedMedia, ProcessorConfig, VideoConfig};
use super::prompt::{Part, Prompt};
use super::rope_index::{self, GridThw, MediaTokens, RopePositions};

/// A prompt turned into model inputs.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// The rendered chat template (one pad per media item, before expansion).
    pub text: String,
    pub input_ids: Vec<u32>,
    pub images: Vec<PatchedMedia>,
    pub videos: Vec<PatchedMedia>,
    pub positions: RopePositions,
}

impl PreparedPrompt {
    pub fn image_grids(&self) -> Vec<GridThw> {
        self.images.iter().map(|m| m.grid_thw).collect()
    }
    pub fn video_grids(&self) -> Vec<GridThw> {
        self.videos.iter().map(|m| m.grid_thw).collect()
    }
}

/// Tokenizer, chat template and media preprocessing of one model.
pub struct Processor {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    special: SpecialTokens,
    image_config: ProcessorConfig,
    video_config: VideoConfig,
}

impl Processor {
    /// Reads `tokenizer.json`, the chat template and the preprocessor configs of `dir`, with
    /// optional overrides of the image pixel budget.
    pub fn from_model_dir(
        dir: &Path,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
    ) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                file: "tokenizer.json".into(),
                hint: "copy tokenizer.json from the original checkpoint".into(),
            });
        }
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| EngineError::BadFile {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        let special = SpecialTokens::from_tokenizer(&tokenizer)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let preprocessor = dir.join("preprocessor_config.json");
        let image_config = if preprocessor.is_file() {
            ProcessorConfig::from_file(&preprocessor)?
        } else {
            ProcessorConfig::default()
        }
        .with_pixels(min_pixels, max_pixels)?;
        let video_config = VideoConfig::from_dir(dir)?;
        Ok(Self {
            tokenizer,
            template,
            special,
            image_config,
            video_config,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }
    pub fn image_config(&self) -> &ProcessorConfig {
        &self.image_config
    }
    pub fn video_config(&self) -> &VideoConfig {
        &self.video_config
    }

    /// Renders, preprocesses and tokenizes `prompt`.
    pub fn prepare(&self, prompt: &Prompt) -> Result<PreparedPrompt> {
        let text = self.template.render(prompt)?;
        let mut images = Vec::new();
        let mut videos = Vec::new();
        for message in &prompt.messages {
            for part in message.media() {
                match part {
                    Part::Image(img) => {
                        images.push(image::preprocess_image(img, &self.image_config)?)
                    }
                    Part::Video(frames) => {
                        videos.push(image::preprocess_video(frames, &self.video_config)?)
                    }
                    Part::Text(_) => {}
                }
            }
        }
        let merge = self.image_config.merge_size;
        let tokens_of = |m: &PatchedMedia| m.grid_thw.iter().product::<usize>() / (merge * merge);
        let expanded = chat::expand_pads(
            &text,
            &self.special.image_pad.0,
            &images.iter().map(tokens_of).collect::<Vec<_>>(),
            "image",
        )?;
        let expanded = chat::expand_pads(
            &expanded,
            &self.special.video_pad.0,
            &videos.iter().map(tokens_of).collect::<Vec<_>>(),
            "video",
        )?;
        let input_ids = self.encode(&expanded)?;
        let positions = rope_index::rope_positions(
            &input_ids,
            MediaTokens {
                image: self.special.image_pad.1,
                video: self.special.video_pad.1,
            },
            &images.iter().map(|m| m.grid_thw).collect::<Vec<_>>(),
            &videos.iter().map(|m| m.grid_thw).collect::<Vec<_>>(),
            merge,
        )
        .map_err(|e| EngineError::Prompt(e.to_string()))?;
        Ok(PreparedPrompt {
            text,
            input_ids,
            images,
            videos,
            positions,
        })
    }

    /// Token ids of `text` (special tokens written in the text are recognised, as the reference does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included; ids the tokenizer does not know are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
}
