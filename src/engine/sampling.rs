//! Generation settings: the checkpoint's `generation_config.json` defaults, the caller's
//! overrides, and the logits pipeline (repetition penalty → temperature → top-k → top-p → draw)
//! built on candle-transformers' `LogitsProcessor`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Deserialize;

use super::error::{EngineError, Result};

/// `generation_config.json`, with the reference's defaults for absent fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    #[serde(default = "fifty")]
    pub top_k: usize,
    #[serde(default = "one_f32")]
    pub repetition_penalty: f32,
    #[serde(default, deserialize_with = "ids")]
    pub eos_token_id: Vec<u32>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

fn one() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn fifty() -> usize {
    50
}

fn ids<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
        OneOrMany::Null(()) => Vec::new(),
    })
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 50,
            repetition_penalty: 1.0,
            eos_token_id: Vec::new(),
            max_new_tokens: None,
        }
    }
}

impl GenerationConfig {
    /// Reads the file if the model folder has one; the reference's defaults otherwise.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| EngineError::BadFile {
            path,
            message: e.to_string(),
        })
    }
}

/// What the caller wants from one generation; `None` fields fall back to the checkpoint.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// `Some(true)`: argmax; `Some(false)`: sample; `None`: as `generation_config.json` says.
    pub greedy: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: u64,
    /// Generation stops when the text contains one of these; the text ends before it.
    pub stop_strings: Vec<String>,
    /// How many of the largest first-position logits to report.
    pub top_logits: usize,
    /// Keep going past end-of-sequence tokens (benchmarks measure a fixed number of tokens).
    pub ignore_eos: bool,
    /// Reuse the KV cache of the previous call for a prompt that starts the same way.
    pub reuse_cache: bool,
    /// Set from another thread to stop generating (a client went away, a task was cancelled);
    /// checked before every new token.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl GenerationOptions {
    /// Whether [`Self::cancel`] has been set.
    pub fn is_cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 512,
            greedy: None,
            temperature: None,
            top_p: None,
            top_k: None,
            repetition_penalty: None,
            seed: 0,
            stop_strings: Vec::new(),
            top_logits: 0,
            ignore_eos: false,
            reuse_cache: true,
            cancel: None,
        }
    }
}

/// The resolved per-token pipeline.
pub struct TokenSampler {
    processor: LogitsProcessor,
    repetition_penalty: f32,
    /// Argmax: on a GPU it runs on the device.
    greedy: bool,
}

impl TokenSampler {
    pub fn new(options: &GenerationOptions, defaults: &GenerationConfig) -> Result<Self> {
        let do_sample = match options.greedy {
            Some(greedy) => !greedy,
            None => defaults.do_sample,
        };
        let temperature = options.temperature.unwrap_or(defaults.temperature);
        let top_p = options.top_p.unwrap_or(defaults.top_p);
        let top_k = options.top_k.unwrap_or(defaults.top_k);
        let repetition_penalty = options
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty);
        let valid = temperature.is_finite()
            && temperature >= 0.0
            && (0.0..=1.0).contains(&top_p)
            && repetition_penalty.is_finite()
            && repetition_penalty > 0.0;
        if !valid {
            return Err(EngineError::Option(format!(
                "temperature {temperature} must be >= 0, top_p {top_p} in [0, 1], repetition_penalty {repetition_penalty} > 0"
            )));
        }
        let greedy = !do_sample || temperature == 0.0 || top_k == 1;
        let sampling = if greedy {
            Sampling::ArgMax
        } else {
            match (top_k, top_p < 1.0) {
                (0, false) => Sampling::All { temperature },
                (0, true) => Sampling::TopP {
                    p: top_p,
                    temperature,
                },
                (k, false) => Sampling::TopK { k, temperature },
                (k, true) => Sampling::TopKThenTopP {
                    k,
                    p: top_p,
                    temperature,
                },
            }
        };
        Ok(Self {
            processor: LogitsProcessor::from_sampling(options.seed, sampling),
            repetition_penalty,
            greedy,
        })
    }

    /// Whether a pick depends on the logits alone (greedy, no repetition penalty), so the step
    /// after it can be queued before the token is known.
    pub fn context_free(&self) -> bool {
        self.greedy && self.repetition_penalty == 1.0
    }

    /// Picks the next token from `logits` `(vocab,)` given every token so far (prompt included,
    /// as the reference's repetition penalty does).
    pub fn next(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        #[cfg(feature = "cuda")]
        if self.context_free() && logits.device().is_cuda() {
            // on the device: 8 bytes back instead of the whole vocabulary
            return Ok(super::cuda_fused::argmax(logits)?);
        }
        let logits = if self.repetition_penalty != 1.0 {
            candle_transformers::utils::apply_repeat_penalty(
                logits,
                self.repetition_penalty,
                context,
            )?
        } else {
            logits.clone()
        };
        Ok(self.processor.sample(&logits)?)
    }
}

/// A picked token, possibly still on its way back from the device.
pub enum PendingToken {
    Ready(u32),
    #[cfg(feature = "cuda")]
    Device(super::cuda_fused::DeviceToken),
}

/// Starts picks and waits for them, keeping the pinned host memory that device picks come back
/// through for the next ones.
#[derive(Default)]
pub struct Picks {
    #[cfg(feature = "cuda")]
    spare_slots: Vec<super::cuda_fused::TokenSlot>,
}

impl Picks {
    /// The token of `logits`: on the device and not waited for where `on_device` (greedy with
    /// [`TokenSampler::context_free`], bf16 on a CUDA device), else picked here and now.
    pub fn start(
        &mut self,
        sampler: &mut TokenSampler,
        logits: &Tensor,
        context: &[u32],
        on_device: bool,
    ) -> Result<PendingToken> {
        #[cfg(feature = "cuda")]
        if on_device && sampler.context_free() && logits.device().is_cuda() {
            let slot = self.slot(logits.device())?;
            return Ok(PendingToken::Device(super::cuda_fused::argmax_start(
                logits, slot,
            )?));
        }
        let _ = on_device;
        Ok(PendingToken::Ready(sampler.next(logits, context)?))
    }

    /// Pinned host memory for the next device pick (a spare one, or new).
    #[cfg(feature = "cuda")]
    pub fn slot(&mut self, device: &candle_core::Device) -> Result<super::cuda_fused::TokenSlot> {
        match self.spare_slots.pop() {
            Some(slot) => Ok(slot),
            None => Ok(super::cuda_fused::TokenSlot::new(device)?),
        }
    }

    /// The token, once it is on the host.
    pub fn wait(&mut self, token: PendingToken) -> Result<u32> {
        match token {
            PendingToken::Ready(token) => Ok(token),
            #[cfg(feature = "cuda")]
            PendingToken::Device(token) => {
                let (token, slot) = token.wait()?;
                self.spare_slots.push(slot);
                Ok(token)
            }
        }
    }
}

/// The `k` largest entries of `logits` as `(token id, logit)`, descending.
pub fn top_k_logits(logits: &Tensor, k: usize) -> Result<Vec<(u32, f32)>> {
    if k == 0 {
        // (on a GPU: no copy of the whole vocabulary back to the host)
        return Ok(Vec::new());
    }
    let values: Vec<f32> = logits.to_vec1()?;
    let mut indexed: Vec<(u32, f32)> = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as u32, v))
        .collect();
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed.truncate(k);
    Ok(indexed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn released_instruct_config_is_effectively_greedy() {
        let cfg: GenerationConfig = serde_json::from_str(
            r#"{"bos_token_id":151643,"pad_token_id":151643,"do_sample":true,"eos_token_id":[151645,151643],
               "repetition_penalty":1.0,"temperature":0.01,"top_p":0.001,"top_k":1}"#,
        )
        .unwrap();
        assert_eq!(cfg.eos_token_id, vec![151645, 151643]);
        let mut s = TokenSampler::new(&GenerationOptions::default(), &cfg).unwrap();
        let logits = Tensor::new(&[0.1f32, 3.0, 2.9], &Device::Cpu).unwrap();
        for _ in 0..5 {
            assert_eq!(s.next(&logits, &[]).unwrap(), 1);
        }
    }

    #[test]
    fn repetition_penalty_follows_the_reference_rule() {
        let cfg = GenerationConfig::default();
        let opts = GenerationOptions {
            greedy: Some(true),
            repetition_penalty: Some(2.0),
            ..Default::default()
        };
        let mut s = TokenSampler::new(&opts, &cfg).unwrap();
        // token 1 (3.0) seen -> 1.5 < 2.9 of token 2
        let logits = Tensor::new(&[0.1f32, 3.0, 2.9], &Device::Cpu).unwrap();
        assert_eq!(s.next(&logits, &[1]).unwrap(), 2);
    }

    #[test]
    fn sampling_is_reproducible_with_a_seed() {
        let cfg = GenerationConfig::default();
        let opts = GenerationOptions {
            greedy: Some(false),
            temperature: Some(1.0),
            seed: 7,
            ..Default::default()
        };
        let logits = Tensor::new(&[1.0f32, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let draw = || {
            let mut s = TokenSampler::new(&opts, &cfg).unwrap();
            (0..16)
                .map(|_| s.next(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(
            a.iter().any(|&t| t != a[0]),
            "uniform logits should not always give one token"
        );
    }

    #[test]
    fn top_k_logits_are_descending() {
        let logits = Tensor::new(&[0.5f32, 2.0, -1.0, 1.0], &Device::Cpu).unwrap();
        assert_eq!(top_k_logits(&logits, 2).unwrap(), vec![(1, 2.0), (3, 1.0)]);
    }
}
