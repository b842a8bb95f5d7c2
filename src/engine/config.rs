//! `config.json` of a Qwen2-VL checkpoint: the language model, the vision tower and the special
//! token ids. Accepts both the flat layout of the original release and the nested `text_config`
//! layout written by newer transformers versions.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{EngineError, Result};

/// The Qwen2 language model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// How many of the head_dim/2 rotary frequencies come from the t, h and w position rows.
    pub mrope_section: [usize; 3],
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The vision transformer and its 2×2 patch merger.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::depth")]
    pub depth: usize,
    #[serde(default = "defaults::embed_dim")]
    pub embed_dim: usize,
    /// Output width of the merger (= the language model's hidden size).
    #[serde(default = "defaults::vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    /// Also read from `in_channels` (the name newer transformers write beside it).
    #[serde(default = "defaults::in_chans")]
    pub in_chans: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::merge_size")]
    pub spatial_merge_size: usize,
    #[serde(default = "defaults::temporal_patch_size")]
    pub temporal_patch_size: usize,
    #[serde(default = "defaults::vision_act")]
    pub hidden_act: String,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
    /// Length of one flattened patch row: channels × temporal × patch × patch.
    pub fn patch_row_len(&self) -> usize {
        self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

mod defaults {
    pub fn depth() -> usize {
        32
    }
    pub fn embed_dim() -> usize {
        1280
    }
    pub fn vision_hidden() -> usize {
        3584
    }
    pub fn mlp_ratio() -> f64 {
        4.0
    }
    pub fn num_heads() -> usize {
        16
    }
    pub fn in_chans() -> usize {
        3
    }
    pub fn patch_size() -> usize {
        14
    }
    pub fn merge_size() -> usize {
        2
    }
    pub fn temporal_patch_size() -> usize {
        2
    }
    pub fn vision_act() -> String {
        "quick_gelu".to_string()
    }
}

/// The released configurations, for random-weight benchmarks and checks.
pub const QWEN2_VL_2B_CONFIG: &str = include_str!("configs/qwen2-vl-2b.json");
pub const QWEN2_VL_7B_CONFIG: &str = include_str!("configs/qwen2-vl-7b.json");

/// The whole checkpoint configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: Option<u32>,
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: Option<u32>,
    pub vision_end_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| EngineError::BadFile {
            path: path.to_path_buf(),
            message,
        };
        let root: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let root = root
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let model_type = root
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if model_type != "qwen2_vl" {
            return Err(EngineError::UnsupportedModel {
                path: path.to_path_buf(),
                found: model_type.to_string(),
            });
        }
        // Newer transformers nest the language model under `text_config`; its values win.
        let mut merged: Map<String, Value> = root.clone();
        if let Some(Value::Object(text_cfg)) = root.get("text_config") {
            for (k, v) in text_cfg {
                merged.insert(k.clone(), v.clone());
            }
        }
        let get_usize = |key: &str| -> Result<usize> {
            merged
                .get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing or non-integer field {key:?}")))
        };
        let get_f64 = |key: &str, default: f64| -> Result<f64> {
            match merged.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| bad(format!("field {key:?} must be a number"))),
            }
        };
        let num_attention_heads = get_usize("num_attention_heads")?;
        let hidden_size = get_usize("hidden_size")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        let head_dim = hidden_size / num_attention_heads;
        let num_key_value_heads = merged
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let mrope_section =
            parse_mrope_section(merged.get("rope_scaling"), head_dim).map_err(bad)?;
        // The composite config carries tie_word_embeddings at the top level.
        let tie_word_embeddings = root
            .get("tie_word_embeddings")
            .or_else(|| merged.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let text_cfg = TextConfig {
            vocab_size: get_usize("vocab_size")?,
            hidden_size,
            intermediate_size: get_usize("intermediate_size")?,
            num_hidden_layers: get_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: get_f64("rms_norm_eps", 1e-6)?,
            rope_theta: get_f64("rope_theta", 1_000_000.0)?,
            max_position_embeddings: merged
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .unwrap_or(32768),
            tie_word_embeddings,
            mrope_section,
        };
        let vision: VisionConfig = match root.get("vision_config") {
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| bad(format!("vision_config: {e}")))?
            }
            None => return Err(bad("missing vision_config".into())),
        };
        if vision.num_heads == 0 || !vision.embed_dim.is_multiple_of(vision.num_heads) {
            return Err(bad(format!(
                "vision_config: embed_dim {} is not divisible by num_heads {}",
                vision.embed_dim, vision.num_heads
            )));
        }
        if !vision.head_dim().is_multiple_of(4) {
            return Err(bad(format!(
                "vision_config: head dim {} must be a multiple of 4 for 2-D rotary embeddings",
                vision.head_dim()
            )));
        }
        let token = |key: &str| {
            root.get(key)
                .or_else(|| merged.get(key))
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        };
        let eos_token_ids = match root
            .get("eos_token_id")
            .or_else(|| merged.get("eos_token_id"))
        {
            Some(Value::Array(ids)) => ids
                .iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(Self {
            text: text_cfg,
            vision,
            image_token_id: token("image_token_id"),
            video_token_id: token("video_token_id"),
            vision_start_token_id: token("vision_start_token_id"),
            vision_end_token_id: token("vision_end_token_id"),
            eos_token_ids,
        })
    }
}

/// `rope_scaling.mrope_section`, checked against the head dimension.
fn parse_mrope_section(
    rope_scaling: Option<&Value>,
    head_dim: usize,
) -> Result<[usize; 3], String> {
    let section = rope_scaling
        .and_then(|r| r.get("mrope_section"))
        .and_then(Value::as_array)
        .ok_or_else(|| {
            "missing rope_scaling.mrope_section (Qwen2-VL needs the M-RoPE sections, e.g. [16, 24, 24])"
                .to_string()
        })?;
    let values: Vec<usize> = section
        .iter()
        .map(|v| v.as_u64().map(|v| v as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| "rope_scaling.mrope_section must hold integers".to_string())?;
    let [t, h, w] = values[..] else {
        return Err(format!(
            "rope_scaling.mrope_section must have 3 entries, found {}",
            values.len()
        ));
    };
    if t + h + w != head_dim / 2 {
        return Err(format!(
            "rope_scaling.mrope_section {values:?} sums to {}, but head_dim/2 is {}",
            t + h + w,
            head_dim / 2
        ));
    }
    Ok([t, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN2VL_2B: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
      "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
      "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
      "intermediate_size": 8960, "max_position_embeddings": 32768, "num_attention_heads": 12,
      "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 151936,
      "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
        "in_chans": 3, "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}
    }"#;

    #[test]
    fn parses_the_released_2b_config() {
        let cfg = ModelConfig::from_json_str(QWEN2VL_2B, Path::new("config.json")).unwrap();
        assert_eq!(cfg.text.head_dim(), 128);
        assert_eq!(cfg.text.mrope_section, [16, 24, 24]);
        assert!(cfg.text.tie_word_embeddings);
        assert_eq!(cfg.vision.hidden_size, 1536);
        assert_eq!(cfg.vision.patch_row_len(), 1176);
        assert_eq!(cfg.image_token_id, Some(151655));
        assert_eq!(cfg.eos_token_ids, vec![151645]);
    }

    #[test]
    fn bundled_released_configs_parse() {
        let b2 = ModelConfig::from_json_str(QWEN2_VL_2B_CONFIG, Path::new("2b")).unwrap();
        assert_eq!((b2.text.hidden_size, b2.text.num_hidden_layers), (1536, 28));
        let b7 = ModelConfig::from_json_str(QWEN2_VL_7B_CONFIG, Path::new("7b")).unwrap();
        assert_eq!((b7.text.hidden_size, b7.vision.hidden_size), (3584, 3584));
        assert!(!b7.text.tie_word_embeddings);
    }

    #[test]
    fn nested_text_config_wins() {
        let mut v: Value = serde_json::from_str(QWEN2VL_2B).unwrap();
        v["text_config"] = serde_json::json!({"hidden_size": 3584, "num_attention_heads": 28,
            "num_key_value_heads": 4, "intermediate_size": 18944, "num_hidden_layers": 28,
            "vocab_size": 152064, "rope_scaling": {"mrope_section": [16, 24, 24]}});
        v["tie_word_embeddings"] = Value::Bool(false);
        let cfg = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap();
        assert_eq!(cfg.text.hidden_size, 3584);
        assert!(!cfg.text.tie_word_embeddings);
    }

    #[test]
    fn rejects_other_model_types_by_name() {
        let text = QWEN2VL_2B.replace("\"qwen2_vl\"", "\"llava\"");
        let err = ModelConfig::from_json_str(&text, Path::new("m/config.json")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("llava") && msg.contains("m/config.json"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_inconsistent_mrope_section() {
        let text = QWEN2VL_2B.replace("[16, 24, 24]", "[16, 24, 20]");
        let err = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("mrope_section"), "{err}");
    }
}
