//! The embedded Qwen2-VL engine on candle. It owns everything between a [`Prompt`] and generated
//! text: loading a checkpoint, the processor (images, videos, chat template, tokens), the vision
//! tower, the Qwen2 decoder with M-RoPE, and generation. It knows nothing about agents.
//!
//! Entry point: [`Qwen2Vl`].

mod amx;
mod attention;
pub mod bench;
pub mod chat;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_attention;
#[cfg(feature = "cuda")]
mod cuda_flash;
#[cfg(feature = "cuda")]
mod cuda_fused;
#[cfg(feature = "cuda")]
mod cuda_graph;
pub mod device_memory;
pub mod error;
mod fused_attention;
mod gemm;
pub mod image;
mod layer_norm;
pub mod linear;
mod matvec;
pub mod prefix;
pub mod processor;
pub mod profile;
pub mod prompt;
pub mod random;
mod rms_norm;
pub mod rope_index;
pub mod sampling;
mod split_rope;
pub mod text;
mod vector_math;
pub mod vision;
mod vision_cache;
mod weight_buffer;
pub mod weights;

use std::borrow::Borrow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

pub use config::ModelConfig;
pub use error::{EngineError, Result};
pub use gemm::describe as cpu_kernels;
pub use linear::Quantization;
pub use processor::{PreparedPrompt, Processor};
pub use prompt::{Content, Message, Part, Prompt};
pub use rope_index::{GridThw, RopePositions};
pub use sampling::{GenerationConfig, GenerationOptions};
pub use weights::DEFAULT_MODEL;

use self::image::PatchedMedia;
use sampling::{PendingToken, TokenSampler};
use text::TextModel;
use vision::VisionTower;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Overrides of the checkpoint's image pixel budget.
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Store the language model's linear layers in this format (the vision tower stays dense).
    pub quantize: Option<Quantization>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            min_pixels: None,
            max_pixels: None,
            quantize: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum FinishReason {
    /// An end-of-sequence token (its id).
    Eos(u32),
    /// A stop string (which one); the text ends before it.
    StopString(String),
    MaxTokens,
    /// [`GenerationOptions::cancel`] was set; the text is what was generated until then.
    Cancelled,
}

/// Seconds spent in each phase of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// The host's share before the model: chat template, tokens, image resizing and patches,
    /// content hashes.
    pub preprocess_s: f64,
    /// From the patch values on the host to the vision features (upload included).
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_tokens_per_s: f64,
}

/// A decode step captured as a CUDA graph, where graphs are in use (`VLAD_CUDA_GRAPHS=1`, greedy
/// tokens on the device, not profiling).
struct ReplayState {
    #[cfg(feature = "cuda")]
    graph: Option<cuda_graph::DecodeGraph>,
    /// Graphs whose caches ran out of room: a token they picked may still be read from their
    /// buffers, so they are dropped with the reply.
    #[cfg(feature = "cuda")]
    retired: Vec<cuda_graph::DecodeGraph>,
    /// Whether to use (and capture) graphs: off where they do not apply or a capture failed.
    #[cfg(feature = "cuda")]
    wanted: bool,
}

impl ReplayState {
    #[cfg(feature = "cuda")]
    const POSITIONS_PER_CAPTURE: usize = 512;

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn new(tokens_on_device: bool) -> Self {
        Self {
            #[cfg(feature = "cuda")]
            graph: None,
            #[cfg(feature = "cuda")]
            retired: Vec::new(),
            #[cfg(feature = "cuda")]
            wanted: tokens_on_device && cuda_graph::enabled() && !profile::is_enabled(),
        }
    }
}

/// The outcome of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, including a final end-of-sequence token when there was one.
    pub token_ids: Vec<u32>,
    /// Generated text without the end-of-sequence token and without a matched stop string.
    pub text: String,
    pub image_grid_thw: Vec<GridThw>,
    pub video_grid_thw: Vec<GridThw>,
    /// The largest logits at the first generated position, descending.
    pub top_logits: Vec<(u32, f32)>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    /// Prompt tokens whose keys and values were reused from the previous call.
    pub reused_prompt_tokens: usize,
    /// Images and videos after the reused prefix whose vision outputs came from the cache of
    /// recently seen media instead of the vision tower.
    pub reused_media: usize,
}

/// A loaded Qwen2-VL model with its tokenizer and processor.
pub struct Qwen2Vl {
    config: ModelConfig,
    vision: VisionTower,
    text: TextModel,
    processor: Processor,
    generation_config: GenerationConfig,
    eos_ids: Vec<u32>,
    device: Device,
    dtype: DType,
    dir: PathBuf,
    /// What the decoder's KV cache holds, for reuse by the next call.
    cached: prefix::CachedPrefix,
    /// Vision outputs of recent media by content hash.
    vision_cache: vision_cache::VisionCache,
    /// Cache hits of the current call (reported in [`Generation::reused_media`]).
    reused_media: usize,
    /// See [`Self::set_decode_pipelining`].
    decode_pipelining: Option<bool>,
}

impl Qwen2Vl {
    /// Loads a model folder or hub id (see [`weights::resolve_model`]).
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self> {
        let dir = weights::resolve_model(model)?;
        Self::load_dir(&dir, options)
    }

    /// Loads a local model folder.
    pub fn load_dir(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                file: "config.json".into(),
                hint: "pass the folder of a Hugging Face Qwen2-VL checkpoint".into(),
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let processor = Processor::from_model_dir(dir, options.min_pixels, options.max_pixels)?;
        let special = processor.special_tokens();
        for (name, from_config, from_tokenizer) in [
            ("image_token_id", config.image_token_id, special.image_pad.1),
            ("video_token_id", config.video_token_id, special.video_pad.1),
        ] {
            if let Some(id) = from_config
                && id != from_tokenizer
            {
                return Err(EngineError::BadFile {
                    path: config_path.clone(),
                    message: format!(
                        "{name} is {id} but tokenizer.json gives {from_tokenizer}; config and tokenizer are from different models"
                    ),
                });
            }
        }
        if processor.image_config().merge_size != config.vision.spatial_merge_size {
            return Err(EngineError::BadFile {
                path: dir.join("preprocessor_config.json"),
                message: format!(
                    "merge_size {} differs from config.json's spatial_merge_size {}",
                    processor.image_config().merge_size,
                    config.vision.spatial_merge_size
                ),
            });
        }
        let generation_config = GenerationConfig::from_model_dir(dir)?;
        let weights = weights::Weights::open(dir)?;
        let vb = weights.var_builder(options.dtype, &options.device)?;
        Self::from_parts(
            config,
            processor,
            generation_config,
            vb,
            &weights.layout,
            options,
            dir,
        )
    }

    /// Builds a model with the real shapes of `config` and random weights (benchmarks, memory
    /// checks); the processor files come from `processor_dir` (a tokenizer folder suffices).
    pub fn with_random_weights(
        config: ModelConfig,
        processor_dir: &Path,
        options: &LoadOptions,
    ) -> Result<Self> {
        let processor =
            Processor::from_model_dir(processor_dir, options.min_pixels, options.max_pixels)?;
        let generation_config = GenerationConfig::from_model_dir(processor_dir)?;
        let vb = random::RandomWeights::var_builder(options.dtype, &options.device);
        let layout = weights::NameLayout {
            vision: "visual",
            text: "model",
        };
        Self::from_parts(
            config,
            processor,
            generation_config,
            vb,
            &layout,
            options,
            processor_dir,
        )
    }

    fn from_parts(
        config: ModelConfig,
        processor: Processor,
        generation_config: GenerationConfig,
        vb: candle_nn::VarBuilder<'static>,
        layout: &weights::NameLayout,
        options: &LoadOptions,
        dir: &Path,
    ) -> Result<Self> {
        let mut eos_ids = generation_config.eos_token_id.clone();
        for id in &config.eos_token_ids {
            if !eos_ids.contains(id) {
                eos_ids.push(*id);
            }
        }
        let tensor_error = |e: candle_core::Error| EngineError::Weights {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        if config.vision.hidden_size != config.text.hidden_size {
            return Err(EngineError::BadFile {
                path: dir.join("config.json"),
                message: format!(
                    "vision_config.hidden_size {} differs from the language model's hidden_size {}",
                    config.vision.hidden_size, config.text.hidden_size
                ),
            });
        }
        keep_freed_memory();
        device_memory::keep_freed_memory(&options.device);
        device_memory::skip_buffer_events(&options.device);
        let vision =
            VisionTower::load(&config.vision, vb.pp(layout.vision)).map_err(tensor_error)?;
        let text = TextModel::load(
            &config.text,
            vb.pp(layout.text),
            vb.clone(),
            options.quantize,
        )
        .map_err(tensor_error)?;
        Ok(Self {
            config,
            vision,
            text,
            processor,
            generation_config,
            eos_ids,
            device: options.device.clone(),
            dtype: options.dtype,
            dir: dir.to_path_buf(),
            cached: prefix::CachedPrefix::default(),
            vision_cache: vision_cache::VisionCache::default(),
            reused_media: 0,
            decode_pipelining: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the weights live and the work runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn processor(&self) -> &Processor {
        &self.processor
    }
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_config
    }

    /// Renders, preprocesses and tokenizes `prompt` as the reference processor does.
    pub fn prepare(&self, prompt: &Prompt) -> Result<PreparedPrompt> {
        self.processor.prepare(prompt)
    }

    /// Runs the vision tower over media items; returns the merged embeddings `(tokens, hidden)`.
    pub fn encode_media<M: Borrow<PatchedMedia>>(&self, media: &[M]) -> Result<Option<Tensor>> {
        if media.is_empty() {
            return Ok(None);
        }
        let values: Vec<&[f32]> = media.iter().map(|m| m.borrow().values.as_slice()).collect();
        let pixels = self.vision.input(&values, &self.device)?;
        let grids: Vec<GridThw> = media.iter().map(|m| m.borrow().grid_thw).collect();
        Ok(Some(self.vision.forward(&pixels, &grids)?))
    }

    /// Like [`Self::encode_media`], taking what it can from the vision cache (`hashes` are the
    /// media's content hashes) and encoding the rest in one pass.
    fn encode_media_cached(
        &mut self,
        media: &[&PatchedMedia],
        hashes: &[u64],
    ) -> Result<Option<Tensor>> {
        if media.is_empty() {
            return Ok(None);
        }
        let mut found: Vec<Option<Tensor>> =
            hashes.iter().map(|h| self.vision_cache.get(*h)).collect();
        self.reused_media += found.iter().filter(|hit| hit.is_some()).count();
        let missing: Vec<&PatchedMedia> = media
            .iter()
            .zip(&found)
            .filter(|(_, hit)| hit.is_none())
            .map(|(m, _)| *m)
            .collect();
        if let Some(fresh) = self.encode_media(&missing)? {
            let merge = self.config.vision.spatial_merge_size.pow(2);
            let mut row = 0;
            let slots = found
                .iter_mut()
                .zip(hashes)
                .filter(|(hit, _)| hit.is_none());
            for ((slot, hash), m) in slots.zip(&missing) {
                let tokens = m.rows / merge;
                let embeds = fresh.narrow(0, row, tokens)?;
                row += tokens;
                self.vision_cache.insert(*hash, embeds.clone());
                *slot = Some(embeds);
            }
        }
        let pieces: Vec<Tensor> = found.into_iter().flatten().collect();
        Ok(Some(Tensor::cat(&pieces, 0)?))
    }

    /// Input embeddings `(1, len, hidden)` with the vision rows spliced in at the pad positions.
    fn input_embeddings(
        &self,
        ids: &[u32],
        image_embeds: Option<&Tensor>,
        video_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let ids_t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let text = self.text.embed(&ids_t)?.squeeze(0)?;
        if image_embeds.is_none() && video_embeds.is_none() {
            return Ok(text.unsqueeze(0)?);
        }
        let special = self.processor.special_tokens();
        let (image_id, video_id) = (special.image_pad.1, special.video_pad.1);
        // Pads of a kind with no media given stay ordinary tokens, as in the reference.
        let is_media = |id: u32| {
            (id == image_id && image_embeds.is_some()) || (id == video_id && video_embeds.is_some())
        };
        let mut pieces = Vec::new();
        let (mut image_row, mut video_row) = (0usize, 0usize);
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            if !is_media(id) {
                let end = (i..ids.len())
                    .find(|&j| is_media(ids[j]))
                    .unwrap_or(ids.len());
                pieces.push(text.narrow(0, i, end - i)?);
                i = end;
                continue;
            }
            let run = ids[i..].iter().take_while(|&&x| x == id).count();
            let (embeds, row) = match (id == image_id, image_embeds, video_embeds) {
                (true, Some(e), _) => (e, &mut image_row),
                (false, _, Some(e)) => (e, &mut video_row),
                _ => unreachable!("is_media checked that the embeddings exist"),
            };
            let available = embeds.dim(0)?.saturating_sub(*row);
            if run > available {
                return Err(EngineError::Prompt(format!(
                    "the prompt has more media pad tokens than the media produce ({run} > {available})"
                )));
            }
            pieces.push(embeds.narrow(0, *row, run)?.to_dtype(text.dtype())?);
            *row += run;
            i += run;
        }
        Ok(Tensor::cat(&pieces, 0)?.unsqueeze(0)?)
    }

    /// Bytes of language-model weights one decode step reads.
    pub fn decode_weight_bytes(&mut self) -> usize {
        self.text.decode_weight_bytes()
    }

    /// Generates a completion of `prompt`. `on_text` receives the text as it is produced (never a
    /// partial UTF-8 character, never the beginning of a stop string that may still complete).
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        options: &GenerationOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        if options.max_new_tokens == 0 {
            return Err(EngineError::Option(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let preprocess_start = Instant::now();
        let prepared = self.prepare(prompt)?;
        let mut sampler = TokenSampler::new(options, &self.generation_config)?;
        let ids = &prepared.input_ids;

        // Reuse what the KV cache holds of this prompt's beginning (same tokens, same pixels).
        let special = self.processor.special_tokens();
        let image_hashes: Vec<u64> = prepared.images.iter().map(prefix::media_hash).collect();
        let video_hashes: Vec<u64> = prepared.videos.iter().map(prefix::media_hash).collect();
        let preprocess_s = preprocess_start.elapsed().as_secs_f64();
        let spans = prefix::media_spans(
            ids,
            special.image_pad.1,
            special.video_pad.1,
            &image_hashes,
            &video_hashes,
        );
        let reused = if options.reuse_cache {
            self.cached.reusable(ids, &spans)
        } else {
            0
        };
        self.cached = prefix::CachedPrefix::default();
        self.text.truncate_cache(reused);

        // Only media after the reused prefix go through the vision tower.
        self.reused_media = 0;
        let vision_start = Instant::now();
        let starts_of = |pad: u32| -> Vec<usize> {
            spans
                .iter()
                .filter(|s| ids[s.start] == pad)
                .map(|s| s.start)
                .collect()
        };
        fn after_prefix<'a>(
            media: &'a [PatchedMedia],
            hashes: &[u64],
            starts: Vec<usize>,
            reused: usize,
        ) -> (Vec<&'a PatchedMedia>, Vec<u64>) {
            media
                .iter()
                .zip(hashes)
                .zip(starts)
                .filter(|(_, start)| *start >= reused)
                .map(|((m, h), _)| (m, *h))
                .unzip()
        }
        let (new_images, new_image_hashes) = after_prefix(
            &prepared.images,
            &image_hashes,
            starts_of(special.image_pad.1),
            reused,
        );
        let (new_videos, new_video_hashes) = after_prefix(
            &prepared.videos,
            &video_hashes,
            starts_of(special.video_pad.1),
            reused,
        );
        let (image_embeds, video_embeds) = if options.reuse_cache {
            (
                self.encode_media_cached(&new_images, &new_image_hashes)?,
                self.encode_media_cached(&new_videos, &new_video_hashes)?,
            )
        } else {
            (
                self.encode_media(&new_images)?,
                self.encode_media(&new_videos)?,
            )
        };
        // GPU work is queued: wait for it, so each phase is charged its own time
        self.device.synchronize()?;
        let vision_s = vision_start.elapsed().as_secs_f64();

        let prefill_start = Instant::now();
        let tail = &ids[reused..];
        let embeds = profile::phase("embeddings", &self.device, || {
            self.input_embeddings(tail, image_embeds.as_ref(), video_embeds.as_ref())
        })?;
        let rows = &prepared.positions.rows;
        let rope = profile::phase("rope_tables", &self.device, || {
            text::mrope_tables(
                &self.config.text,
                [&rows[0][reused..], &rows[1][reused..], &rows[2][reused..]],
                self.dtype,
                &self.device,
            )
        })?;
        let mut logits = self.text.forward(&embeds, &rope)?;
        self.device.synchronize()?;
        let prefill_s = prefill_start.elapsed().as_secs_f64();
        let mut fed: Vec<u32> = ids.clone();

        let top_logits = sampling::top_k_logits(&logits, options.top_logits)?;
        let mut context = ids.clone();
        let mut generated: Vec<u32> = Vec::new();
        let mut stream = TextStream::new(&options.stop_strings);
        let mut finish = FinishReason::MaxTokens;
        // Pipelined (greedy on a GPU, opt-in for now): each token is fed to the next step while
        // it is still on its way back, so the host queues step N+1 before it reads token N and
        // the device never waits for the host's per-token work. A token that ends the reply has
        // then been fed for nothing; the cache forgets it below.
        let pipelined = self.decode_pipelined() && sampler.context_free();
        let on_device = pipelined && self.device_embeddings();
        let mut picks = sampling::Picks::default();
        let mut decode_rope = text::DecodeRope::new(
            self.text.cached_len() as i64 + prepared.positions.delta,
            self.dtype,
            &self.device,
        );
        let mut queued: Option<PendingToken> = None;
        let mut replay = ReplayState::new(on_device);
        let decode_start = Instant::now();
        for step in 0..options.max_new_tokens {
            if options.is_cancelled() {
                finish = FinishReason::Cancelled;
                break;
            }
            let last = step + 1 == options.max_new_tokens;
            let pending = match queued.take() {
                Some(pending) => pending,
                None => profile::phase("sampling", &self.device, || {
                    picks.start(&mut sampler, &logits, &context, on_device)
                })?,
            };
            if pipelined && !last {
                let feeds_left = options.max_new_tokens - 1 - step;
                let replayed = self.replayed_step(
                    &mut replay,
                    &pending,
                    &mut decode_rope,
                    step,
                    feeds_left,
                    &mut picks,
                )?;
                queued = Some(match replayed {
                    Some(next) => next,
                    None => {
                        logits = self.decode_step(&pending, &mut decode_rope, step)?;
                        profile::phase("sampling", &self.device, || {
                            picks.start(&mut sampler, &logits, &[], on_device)
                        })?
                    }
                });
            }
            let token = picks.wait(pending)?;
            generated.push(token);
            context.push(token);
            if !options.ignore_eos && self.eos_ids.contains(&token) {
                finish = FinishReason::Eos(token);
                break;
            }
            let text = self.reply_text(&generated)?;
            if let Some(stop) = stream.update(&text, &mut on_text) {
                finish = FinishReason::StopString(stop);
                break;
            }
            if last {
                break;
            }
            if !pipelined {
                logits = self.decode_step(&PendingToken::Ready(token), &mut decode_rope, step)?;
            }
            fed.push(token);
        }
        // the cache holds exactly the fed tokens (a token fed ahead of the end is dropped)
        if self.text.cached_len() > fed.len() {
            self.text.truncate_cache(fed.len());
        }
        self.cached = prefix::CachedPrefix {
            ids: fed,
            media: spans,
        };
        let decode_s = decode_start.elapsed().as_secs_f64();
        let full_text = self.reply_text(&generated)?;
        let text = stream.finish(&full_text, &mut on_text);
        Ok(Generation {
            prompt_token_ids: prepared.input_ids.clone(),
            image_grid_thw: prepared.image_grids(),
            video_grid_thw: prepared.video_grids(),
            token_ids: generated.clone(),
            text,
            top_logits,
            finish_reason: finish,
            timings: Timings {
                preprocess_s,
                vision_s,
                prefill_s,
                decode_tokens_per_s: if decode_s > 0.0 {
                    generated.len() as f64 / decode_s
                } else {
                    0.0
                },
            },
            reused_prompt_tokens: reused,
            reused_media: self.reused_media,
        })
    }

    /// One decode step: `token` at the cache's next position through the decoder; returns the
    /// logits after it.
    fn decode_step(
        &mut self,
        token: &PendingToken,
        rope: &mut text::DecodeRope,
        step: usize,
    ) -> Result<Tensor> {
        let rope = profile::phase("rope_tables", &self.device, || {
            rope.at(&self.config.text, step)
        })?;
        let embed = profile::phase("embeddings", &self.device, || match token {
            PendingToken::Ready(token) => self
                .text
                .embed(&Tensor::new(&[*token], &self.device)?.unsqueeze(0)?),
            #[cfg(feature = "cuda")]
            PendingToken::Device(token) => token.embedding(
                self.text
                    .embedding_table()
                    .expect("tokens stay on the device only where its embedding matrix is"),
            ),
        })?;
        Ok(self.text.forward(&embed, &rope)?)
    }

    /// Feeds `token` through a captured decode step where CUDA graphs are in use (capturing it
    /// first; `feeds_left` tokens are still to be fed, this one included), returning the next
    /// pick; `None` where the step is to run eagerly.
    #[cfg(feature = "cuda")]
    fn replayed_step(
        &mut self,
        replay: &mut ReplayState,
        token: &PendingToken,
        rope: &mut text::DecodeRope,
        step: usize,
        feeds_left: usize,
        picks: &mut sampling::Picks,
    ) -> Result<Option<PendingToken>> {
        // the first step runs eagerly: every kernel module is loaded before a capture
        let PendingToken::Device(token) = token else {
            return Ok(None);
        };
        if !replay.wanted || step == 0 {
            return Ok(None);
        }
        let rows = rope.at(&self.config.text, step)?;
        if replay
            .graph
            .as_ref()
            .is_some_and(|g| !g.has_room(&self.text))
        {
            // kept until the reply ends: the token fed next lives in its key buffer
            replay.retired.extend(replay.graph.take());
        }
        if replay.graph.is_none() {
            // room for a few hundred positions at a time (captured anew after them)
            let steps = feeds_left.min(ReplayState::POSITIONS_PER_CAPTURE);
            let Some(table) = self.text.embedding_table().cloned() else {
                return Ok(None);
            };
            match cuda_graph::DecodeGraph::capture(&mut self.text, &table, &rows, steps) {
                Ok(graph) => replay.graph = Some(graph),
                Err(e) => {
                    tracing::warn!("decode steps run one kernel at a time: capture failed: {e}");
                    replay.wanted = false;
                    return Ok(None);
                }
            }
        }
        let Some(graph) = replay.graph.as_mut() else {
            return Ok(None);
        };
        let slot = picks.slot(&self.device)?;
        let next = graph.step(&mut self.text, token, &rows, slot)?;
        Ok(Some(PendingToken::Device(next)))
    }

    /// Without CUDA every step runs eagerly.
    #[cfg(not(feature = "cuda"))]
    fn replayed_step(
        &mut self,
        _replay: &mut ReplayState,
        _token: &PendingToken,
        _rope: &mut text::DecodeRope,
        _step: usize,
        _feeds_left: usize,
        _picks: &mut sampling::Picks,
    ) -> Result<Option<PendingToken>> {
        Ok(None)
    }

    /// Whether greedy decoding feeds each token ahead (see [`Self::set_decode_pipelining`]).
    fn decode_pipelined(&self) -> bool {
        match self.decode_pipelining {
            Some(on) => on,
            // opt-in until measured on a GPU, and only where the token can stay on the device
            // (CUDA, bf16): elsewhere nothing is gained
            None => {
                self.device_embeddings()
                    && std::env::var("VLAD_CUDA_PIPELINE").as_deref() == Ok("1")
            }
        }
    }

    /// Whether a greedy token can stay on the device for the next step's embedding.
    fn device_embeddings(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.text.embedding_table().is_some_and(cuda_fused::enabled) {
            return true;
        }
        false
    }

    /// Greedy decoding, pipelined or not: `None` (the default) pipelines on a CUDA device in
    /// bf16 (where the token can stay on the device) with `VLAD_CUDA_PIPELINE=1`. Pipelined, the host queues the next step before it has read the
    /// token it feeds, which hides its per-token work; the step after the reply's last token is
    /// then computed for nothing, which costs a GPU little and a CPU a whole step. The tokens are
    /// the same either way.
    pub fn set_decode_pipelining(&mut self, on: Option<bool>) {
        self.decode_pipelining = on;
    }

    /// The text of generated tokens without end-of-sequence tokens and media placeholders: the
    /// processor places those for the media it is given, so one in a reply (a model can emit any
    /// token) would make the conversation unrenderable on the next turn.
    fn reply_text(&self, ids: &[u32]) -> Result<String> {
        let special = self.processor.special_tokens();
        let media_pads = [special.image_pad.1, special.video_pad.1];
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !self.eos_ids.contains(id) && !media_pads.contains(id))
            .collect();
        self.decode(&kept)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.processor.decode(ids)
    }
}

/// Streams decoded text while holding back what might still become a stop string or is an
/// incomplete UTF-8 sequence.
struct TextStream<'a> {
    stops: &'a [String],
    emitted: usize,
    stopped_at: Option<usize>,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            emitted: 0,
            stopped_at: None,
        }
    }

    /// Takes the whole text so far; emits what is safe; returns the stop string once one appears.
    fn update(&mut self, text: &str, on_text: &mut impl FnMut(&str)) -> Option<String> {
        if let Some((pos, stop)) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|(p, _)| *p)
        {
            self.emit_until(text, pos, on_text);
            self.stopped_at = Some(pos);
            return Some(stop.clone());
        }
        // A trailing U+FFFD is a multi-byte character still being generated.
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        for stop in self.stops {
            for k in (1..stop.len()).rev() {
                if stop.is_char_boundary(k) && text[..safe].ends_with(&stop[..k]) {
                    safe -= k;
                    break;
                }
            }
        }
        self.emit_until(text, safe, on_text);
        None
    }

    fn emit_until(&mut self, text: &str, end: usize, on_text: &mut impl FnMut(&str)) {
        if end > self.emitted && text.is_char_boundary(end) && text.is_char_boundary(self.emitted) {
            on_text(&text[self.emitted..end]);
            self.emitted = end;
        }
    }

    /// The final text (cut at the stop string), emitting whatever was held back.
    fn finish(&mut self, text: &str, on_text: &mut impl FnMut(&str)) -> String {
        let end = self.stopped_at.unwrap_or(text.len()).min(text.len());
        let mut end = end;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.emit_until(text, end, on_text);
        text[..end].to_string()
    }
}

/// Whether the engine's packed bf16 kernels run on this CPU (AVX512-BF16, or AVX2 + FMA, which
/// widen bf16 to f32 in registers); elsewhere bf16 goes through candle's widening path, slower
/// than f32.
pub fn cpu_has_fast_bf16() -> bool {
    gemm::Kernel::detect().is_some_and(gemm::Kernel::has_bf16)
}

/// glibc hands freed blocks between 128 KiB and 32 MiB straight back to the kernel (mmap and
/// munmap), so every activation tensor of a prompt costs freshly zeroed pages again: about a
/// fifth of the vision tower's time on a 2-core CPU (640×360, f32: 18.3 s → 14.9 s with them
/// kept). Keep such blocks in the heap for reuse; done once per process, on the first load.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes glibc's allocation thresholds; any value is valid.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_holds_back_partial_stop_strings() {
        let stops = vec!["*RESULT*".to_string()];
        let mut s = TextStream::new(&stops);
        let mut out = String::new();
        assert!(s.update("Click *RES", &mut |t| out.push_str(t)).is_none());
        assert_eq!(out, "Click ");
        assert_eq!(
            s.update("Click *RESULT*:", &mut |t| out.push_str(t)),
            Some("*RESULT*".into())
        );
        assert_eq!(out, "Click ");
        assert_eq!(
            s.finish("Click *RESULT*:", &mut |t| out.push_str(t)),
            "Click "
        );
    }

    #[test]
    fn stream_releases_false_alarms_and_waits_for_whole_characters() {
        let stops = vec!["*RESULT*".to_string()];
        let mut s = TextStream::new(&stops);
        let mut out = String::new();
        s.update("a *", &mut |t| out.push_str(t));
        assert_eq!(out, "a ");
        s.update("a *b \u{FFFD}", &mut |t| out.push_str(t));
        assert_eq!(out, "a *b ");
        s.update("a *b 好", &mut |t| out.push_str(t));
        assert_eq!(out, "a *b 好");
        assert_eq!(s.finish("a *b 好", &mut |t| out.push_str(t)), "a *b 好");
    }

    #[test]
    fn a_reply_with_a_media_placeholder_can_be_sent_back_as_history() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine/tiny-a");
        let model = Qwen2Vl::load_dir(&dir, &LoadOptions::default()).unwrap();
        let special = model.processor().special_tokens().clone();
        let words = model.processor().encode("Click the button").unwrap();
        let mut reply = words.clone();
        reply.insert(1, special.image_pad.1);
        reply.push(special.video_pad.1);
        reply.push(model.eos_ids[0]);
        let text = model.reply_text(&reply).unwrap();
        assert_eq!(text, model.decode(&words).unwrap());
        // the reply as the assistant's turn of the next prompt: still one placeholder per image
        let history = Prompt::new(vec![
            Message::text("user", "What next?"),
            Message::text("assistant", text),
            Message::text("user", "And now?"),
        ]);
        model.prepare(&history).unwrap();
    }
}
