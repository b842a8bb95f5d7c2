//! Finding and opening a checkpoint: a local Hugging Face model folder or a hub id (downloaded with
//! `hf-hub` into the standard cache), its safetensors files checked before they are memory-mapped,
//! and both tensor-name layouts (`visual.*`/`model.*` and `model.visual.*`/`model.language_model.*`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::error::{EngineError, Result};

/// The default model: the one `vlad run` uses when none is given.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2-VL-2B-Instruct";

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";
const OPTIONAL_FILES: &[&str] = &[
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
];

/// Turns `--model` into a local folder: an existing folder as is, a hub id from the cache or the hub.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_hub_id = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && spec.split('/').all(|s| !s.is_empty());
    if !looks_like_hub_id {
        return Err(EngineError::MissingFile {
            path: path.to_path_buf(),
            file: "model folder".into(),
            hint:
                "pass an existing Hugging Face model folder (with config.json and *.safetensors) \
                   or a hub id such as Qwen/Qwen2-VL-2B-Instruct"
                    .into(),
        });
    }
    if let Some(dir) = cached_snapshot(spec) {
        return Ok(dir);
    }
    download(spec)
}

/// A snapshot folder in the local hub cache that already holds every file we need.
fn cached_snapshot(repo_id: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env().model(repo_id.to_string());
    let config = cache.get("config.json")?;
    cache.get("tokenizer.json")?;
    let dir = config.parent()?.to_path_buf();
    let weights_ok = match cache.get(INDEX_FILE) {
        Some(index) => index_files(&index)
            .ok()?
            .iter()
            .all(|f| cache.get(f).is_some()),
        None => cache.get(SINGLE_FILE).is_some(),
    };
    weights_ok.then_some(dir)
}

fn hub_error(repo: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Hub {
        repo: repo.to_string(),
        message: e.to_string(),
        hint: format!(
            "Without network access, download the model elsewhere (e.g. `huggingface-cli download {repo}`), \
             copy the folder here and pass it with --model /path/to/folder; set HF_HOME or HF_ENDPOINT \
             to use another cache or mirror"
        ),
    }
}

fn download(repo_id: &str) -> Result<PathBuf> {
    tracing::info!(
        repo = repo_id,
        "downloading model from the Hugging Face hub"
    );
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(repo_id, e))?;
    let repo = api.model(repo_id.to_string());
    let config = repo.get("config.json").map_err(|e| hub_error(repo_id, e))?;
    repo.get("tokenizer.json")
        .map_err(|e| hub_error(repo_id, e))?;
    for file in OPTIONAL_FILES {
        if let Err(e) = repo.get(file) {
            tracing::debug!(file, error = %e, "optional file not fetched");
        }
    }
    match repo.get(INDEX_FILE) {
        Ok(index) => {
            for file in index_files(&index)? {
                repo.get(&file).map_err(|e| hub_error(repo_id, e))?;
            }
        }
        Err(_) => {
            repo.get(SINGLE_FILE).map_err(|e| hub_error(repo_id, e))?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_error(repo_id, "the cache returned a path without a folder"))
}

/// The shard file names listed in `model.safetensors.index.json`, in a stable order.
fn index_files(index: &Path) -> Result<Vec<String>> {
    let map = index_weight_map(index)?;
    let mut files: Vec<String> = map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn index_weight_map(index: &Path) -> Result<HashMap<String, String>> {
    let bad = |message: String| EngineError::BadFile {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|source| EngineError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map object".into()))?;
    map.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|f| (k.clone(), f.to_string()))
                .ok_or_else(|| bad(format!("weight_map entry {k:?} is not a file name")))
        })
        .collect()
}

/// Names of the tensors in one safetensors file, after checking that the file is complete.
fn read_safetensors_header(path: &Path) -> Result<Vec<String>> {
    let bad = |message: String| EngineError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file
        .metadata()
        .map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad("too short to be a safetensors file (truncated download?)".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit in a file of {file_len} bytes (truncated or not safetensors); download it again"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    let mut data_end = 0u64;
    let mut names = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?;
        data_end = data_end.max(end);
        names.push(name.clone());
    }
    let expected = 8 + header_len + data_end;
    if file_len < expected {
        return Err(bad(format!(
            "truncated: the header describes {expected} bytes but the file has {file_len}; download it again"
        )));
    }
    Ok(names)
}

/// Where the two halves of the model live in the checkpoint's tensor names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameLayout {
    pub vision: &'static str,
    pub text: &'static str,
}

/// The checked weight files of a model folder.
pub struct Weights {
    files: Vec<PathBuf>,
    file_of: HashMap<String, String>,
    pub layout: NameLayout,
}

impl Weights {
    /// Finds `model.safetensors` or the shards listed in the index, checks every file.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.exists() {
            let files = index_files(&index)?;
            for f in &files {
                if !dir.join(f).exists() {
                    return Err(EngineError::MissingFile {
                        path: dir.to_path_buf(),
                        file: f.clone(),
                        hint: format!("{INDEX_FILE} lists it; download the missing shard"),
                    });
                }
            }
            files.iter().map(|f| dir.join(f)).collect()
        } else if dir.join(SINGLE_FILE).exists() {
            vec![dir.join(SINGLE_FILE)]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| EngineError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(EngineError::MissingFile {
                    path: dir.to_path_buf(),
                    file: "*.safetensors".into(),
                    hint: format!(
                        "a model folder needs {SINGLE_FILE} or {INDEX_FILE} with its shards"
                    ),
                });
            }
            found
        };
        let mut file_of = HashMap::new();
        for f in &files {
            let display = f
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            for name in read_safetensors_header(f)? {
                file_of.insert(name, display.clone());
            }
        }
        let layout = if file_of.keys().any(|k| k.starts_with("model.visual.")) {
            NameLayout {
                vision: "model.visual",
                text: "model.language_model",
            }
        } else {
            NameLayout {
                vision: "visual",
                text: "model",
            }
        };
        Ok(Self {
            files,
            file_of,
            layout,
        })
    }

    /// A var builder over the memory-mapped files whose errors name the tensor and its file.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: the files are opened read-only; like every mmap-based loader we rely on them not
        // being modified while the model is loaded. Their headers were checked above.
        let inner = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&self.files) }?;
        let backend = NamedBackend {
            inner,
            file_of: self.file_of.clone(),
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }
}

/// Decorates loading errors with the tensor's name and file.
struct NamedBackend {
    inner: candle_core::safetensors::MmapedSafetensors,
    file_of: HashMap<String, String>,
}

impl NamedBackend {
    fn context(&self, name: &str, e: candle_core::Error) -> candle_core::Error {
        match self.file_of.get(name) {
            Some(file) => candle_core::Error::Msg(format!("tensor {name} in {file}: {e}")),
            None => candle_core::Error::Msg(format!(
                "tensor {name} is missing from the checkpoint (is this a Qwen2-VL model? {e})"
            )),
        }
    }
}

impl SimpleBackend for NamedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.file_of.contains_key(name) {
            return Err(self.context(name, candle_core::Error::Msg("not found".into())));
        }
        SimpleBackend::get(&self.inner, s, name, h, dtype, dev).map_err(|e| self.context(name, e))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(&self.inner, name, dtype, dev)
            .map_err(|e| self.context(name, e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file_of.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), t)]), &path).unwrap();
        assert_eq!(
            read_safetensors_header(&path).unwrap(),
            vec!["a".to_string()]
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_safetensors_header(&path).unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("model.safetensors"),
            "{err}"
        );
        std::fs::write(&path, b"abc").unwrap();
        assert!(read_safetensors_header(&path).is_err());
    }

    #[test]
    fn neither_folder_nor_hub_id_is_a_clear_error() {
        let err = resolve_model("./no/such/folder").unwrap_err().to_string();
        assert!(err.contains("model folder"), "{err}");
    }
}
