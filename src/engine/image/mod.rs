//! Qwen2-VL image and video preprocessing: decoding to RGB, `smart_resize`, Pillow-exact bicubic
//! resizing, rescale/normalise and patchify into the vision tower's `(rows, 1176)` input.
//!
//! Mirrors Hugging Face transformers' slow `Qwen2VLImageProcessor` (which resizes with Pillow),
//! value for value: the rows this module produces are bit-identical to the reference's
//! `pixel_values` for the same RGB input (Pillow 13 by default, earlier releases via
//! [`PillowCompat`]).

mod resample;

use std::path::{Path, PathBuf};

use image::DynamicImage;
use rayon::prelude::*;
use serde::Deserialize;

/// The 8-bit RGB image type this module takes and returns (from the `image` crate).
pub use image::RgbImage;
pub use resample::{PillowCompat, resize_bicubic, resize_bicubic_compat};

/// OpenAI CLIP mean, the reference's default `image_mean`.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP standard deviation, the reference's default `image_std`.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// The processor class's default `min_pixels` (56·56).
pub const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
/// The processor class's default `max_pixels` (28·28·1280 = 1280 LLM tokens).
pub const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
/// qwen-vl-utils' default per-frame minimum for videos (128·28·28).
pub const VIDEO_MIN_PIXELS: u64 = 128 * 28 * 28;
/// qwen-vl-utils' default per-frame maximum for videos (768·28·28).
pub const VIDEO_MAX_PIXELS: u64 = 768 * 28 * 28;
/// qwen-vl-utils' default cap on the pixels of a whole video (24576·28·28).
pub const VIDEO_TOTAL_PIXELS: u64 = 24576 * 28 * 28;
/// The largest aspect ratio the reference accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Errors of the image processor.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read image {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a decodable PNG, JPEG or WebP image.
    #[error("cannot decode image {path}: {source} (supported formats: PNG, JPEG, WebP)")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },
    /// A processor config file could not be read or parsed.
    #[error("invalid processor config {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A processor config value is unusable.
    #[error("invalid processor config: {0}")]
    Config(String),
    /// An image (or video frame) has no pixels.
    #[error("{what} is empty ({width}x{height}); pass an image with at least 28x28 pixels")]
    Empty {
        /// "image" or "video frame N".
        what: String,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// A side is shorter than the resize factor, which the reference rejects.
    #[error(
        "image of {width}x{height} is too small: both sides must be at least {factor} px; \
         pad or upscale it to at least {factor}x{factor} first"
    )]
    TooSmall {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The resize factor (patch_size · merge_size).
        factor: u32,
    },
    /// The aspect ratio exceeds the reference's limit of 200.
    #[error(
        "image of {width}x{height} has an aspect ratio of {ratio:.1}, over the limit of 200; \
         crop it or pad the short side"
    )]
    AspectRatio {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// max(side) / min(side).
        ratio: f64,
    },
    /// The pixel budget cannot hold an image of this shape.
    #[error(
        "cannot fit an image of {width}x{height} into {min_pixels}..={max_pixels} pixels in \
         multiples of {factor} px; raise max_pixels or lower min_pixels"
    )]
    Budget {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The resize factor.
        factor: u32,
        /// The lower bound used.
        min_pixels: f64,
        /// The upper bound used.
        max_pixels: f64,
    },
    /// A video without frames.
    #[error("video has no frames; pass at least one frame")]
    NoFrames,
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ImageError>;

/// The image processor's settings, as in a checkpoint's `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Lower bound on the resized area in pixels.
    pub min_pixels: u64,
    /// Upper bound on the resized area in pixels.
    pub max_pixels: u64,
    /// Side of a vision patch in pixels (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Side of the patch-merge block (2).
    pub merge_size: usize,
    /// Multiplier applied to the `u8` values when `do_rescale` (1/255).
    pub rescale_factor: f64,
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Whether to apply `(x - mean) / std`.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation.
    pub image_std: [f64; 3],
    /// Which Pillow release's resize to reproduce (not a config-file key).
    pub pillow: PillowCompat,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: DEFAULT_MIN_PIXELS,
            max_pixels: DEFAULT_MAX_PIXELS,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            rescale_factor: 1.0 / 255.0,
            do_rescale: true,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            pillow: PillowCompat::default(),
        }
    }
}

/// Either one number for all channels or one per channel, as transformers accepts.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f64),
    Many(Vec<f64>),
}

/// A pixel count; checkpoints sometimes write it as `12845056.0`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Pixels {
    Int(u64),
    Float(f64),
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<Pixels>,
    longest_edge: Option<Pixels>,
}

/// The keys of `preprocessor_config.json` / `video_preprocessor_config.json` this module reads.
#[derive(Deserialize)]
struct RawConfig {
    min_pixels: Option<Pixels>,
    max_pixels: Option<Pixels>,
    size: Option<RawSize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    rescale_factor: Option<f64>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    total_pixels: Option<Pixels>,
}

fn pixels(value: Option<Pixels>, key: &str) -> Result<Option<u64>> {
    match value {
        None => Ok(None),
        Some(Pixels::Int(n)) => Ok(Some(n)),
        Some(Pixels::Float(f)) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Ok(Some(f as u64)),
        Some(Pixels::Float(f)) => Err(ImageError::Config(format!(
            "{key} must be a non-negative whole number of pixels, got {f}"
        ))),
    }
}

fn per_channel(value: Option<PerChannel>, default: [f64; 3], key: &str) -> Result<[f64; 3]> {
    match value {
        None => Ok(default),
        Some(PerChannel::One(v)) => Ok([v; 3]),
        Some(PerChannel::Many(v)) => <[f64; 3]>::try_from(v.as_slice()).map_err(|_| {
            ImageError::Config(format!("{key} needs 3 values (R, G, B), got {}", v.len()))
        }),
    }
}

impl RawConfig {
    /// Applies the keys present in the file over `defaults` (`min_pixels`/`max_pixels` win over
    /// `size`, as transformers' backward-compatibility rule does).
    fn apply(self, defaults: ProcessorConfig) -> Result<(ProcessorConfig, Option<u64>)> {
        let (size_min, size_max) = match self.size {
            Some(s) => (
                pixels(s.shortest_edge, "size.shortest_edge")?,
                pixels(s.longest_edge, "size.longest_edge")?,
            ),
            None => (None, None),
        };
        let min_pixels = pixels(self.min_pixels, "min_pixels")?
            .or(size_min)
            .unwrap_or(defaults.min_pixels);
        let max_pixels = pixels(self.max_pixels, "max_pixels")?
            .or(size_max)
            .unwrap_or(defaults.max_pixels);
        let config = ProcessorConfig {
            min_pixels,
            max_pixels,
            patch_size: self.patch_size.unwrap_or(defaults.patch_size),
            temporal_patch_size: self
                .temporal_patch_size
                .unwrap_or(defaults.temporal_patch_size),
            merge_size: self.merge_size.unwrap_or(defaults.merge_size),
            rescale_factor: self.rescale_factor.unwrap_or(defaults.rescale_factor),
            do_rescale: self.do_rescale.unwrap_or(defaults.do_rescale),
            do_normalize: self.do_normalize.unwrap_or(defaults.do_normalize),
            image_mean: per_channel(self.image_mean, defaults.image_mean, "image_mean")?,
            image_std: per_channel(self.image_std, defaults.image_std, "image_std")?,
            pillow: defaults.pillow,
        };
        config.validate()?;
        Ok((config, pixels(self.total_pixels, "total_pixels")?))
    }
}

fn read_raw(path: &Path) -> Result<RawConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| ImageError::ConfigFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ImageError::ConfigFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn with_path<T>(path: &Path, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        ImageError::Config(reason) => ImageError::ConfigFile {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    })
}

impl ProcessorConfig {
    /// Parses the JSON text of a `preprocessor_config.json`; absent keys take the reference's
    /// defaults. Accepts `min_pixels`/`max_pixels` and the newer
    /// `size: {"shortest_edge": min, "longest_edge": max}`; the former win when both are present.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| ImageError::Config(e.to_string()))?;
        Ok(raw.apply(Self::default())?.0)
    }

    /// Reads a `preprocessor_config.json` file (see [`ProcessorConfig::from_json_str`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        with_path(path, read_raw(path)?.apply(Self::default()).map(|r| r.0))
    }

    /// Returns the config with `min_pixels` and/or `max_pixels` replaced (command-line or per-request
    /// overrides); checks the result.
    pub fn with_pixels(mut self, min_pixels: Option<u64>, max_pixels: Option<u64>) -> Result<Self> {
        if let Some(min) = min_pixels {
            self.min_pixels = min;
        }
        if let Some(max) = max_pixels {
            self.max_pixels = max;
        }
        self.validate()?;
        Ok(self)
    }

    /// The side length resized images are multiples of: `patch_size · merge_size` (28).
    pub fn factor(&self) -> u32 {
        (self.patch_size * self.merge_size) as u32
    }

    /// Checks that the values can be used.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ImageError::Config(m));
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return bad(format!(
                "patch_size ({}), merge_size ({}) and temporal_patch_size ({}) must be positive",
                self.patch_size, self.merge_size, self.temporal_patch_size
            ));
        }
        if self.patch_size * self.merge_size > 4096 || self.temporal_patch_size > 64 {
            return bad(
                "patch_size · merge_size or temporal_patch_size is implausibly large".into(),
            );
        }
        if self.min_pixels > self.max_pixels {
            return bad(format!(
                "min_pixels ({}) is larger than max_pixels ({})",
                self.min_pixels, self.max_pixels
            ));
        }
        let f = u64::from(self.factor());
        if self.max_pixels < f * f {
            return bad(format!(
                "max_pixels ({}) is below one {f}x{f} block; use at least {}",
                self.max_pixels,
                f * f
            ));
        }
        if self.image_std.iter().any(|s| *s == 0.0 || !s.is_finite())
            || self.image_mean.iter().any(|m| !m.is_finite())
            || !self.rescale_factor.is_finite()
        {
            return bad(
                "image_mean, image_std and rescale_factor must be finite, std non-zero".into(),
            );
        }
        Ok(())
    }
}

/// The video processor's settings: patch geometry, normalisation and the per-frame pixel budget
/// (in `frame`), plus a cap on the pixels of the whole video.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoConfig {
    /// Settings applied to each frame; `min_pixels`/`max_pixels` are the per-frame budget.
    pub frame: ProcessorConfig,
    /// Cap on the pixels of all (padded) frames together; `None` for no cap.
    pub total_pixels: Option<u64>,
    /// How values are normalised (not a config-file key).
    pub normalize: VideoNormalize,
}

/// The float order used to normalise video frames. transformers' two video paths differ by about
/// one float32 ULP on some values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VideoNormalize {
    /// transformers ≥ 4.52 (`Qwen2VLVideoProcessor`): rescale fused into normalise,
    /// `(x - mean·(1/rescale)) / (std·(1/rescale))` in float32.
    #[default]
    Fused,
    /// transformers ≤ 4.51 (videos through the slow image processor): like images,
    /// `f32(x · rescale)` then `(x - mean) / std`.
    Separate,
}

impl Default for VideoConfig {
    fn default() -> Self {
        Self {
            frame: ProcessorConfig {
                min_pixels: VIDEO_MIN_PIXELS,
                max_pixels: VIDEO_MAX_PIXELS,
                ..ProcessorConfig::default()
            },
            total_pixels: Some(VIDEO_TOTAL_PIXELS),
            normalize: VideoNormalize::default(),
        }
    }
}

impl VideoConfig {
    /// Parses a `video_preprocessor_config.json`; absent keys take the video defaults
    /// (128·28·28 ≤ pixels/frame ≤ 768·28·28, total ≤ 24576·28·28).
    pub fn from_json_str(json: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| ImageError::Config(e.to_string()))?;
        let defaults = Self::default();
        let (frame, total) = raw.apply(defaults.frame)?;
        Ok(Self {
            frame,
            total_pixels: total.or(defaults.total_pixels),
            normalize: defaults.normalize,
        })
    }

    /// Reads a model directory's video settings as transformers 4.5x does: from
    /// `video_preprocessor_config.json` if it exists, else from `preprocessor_config.json` (whose
    /// `min_pixels`/`max_pixels` then apply per frame), else the video defaults. Keys absent from
    /// the file read take the video defaults; the total cap applies in every case (see
    /// [`VideoConfig::frame_max_pixels`]).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let defaults = Self::default();
        for name in ["video_preprocessor_config.json", "preprocessor_config.json"] {
            let path = dir.join(name);
            if path.is_file() {
                let (frame, total) = with_path(&path, read_raw(&path)?.apply(defaults.frame))?;
                return Ok(Self {
                    frame,
                    total_pixels: total.or(defaults.total_pixels),
                    normalize: defaults.normalize,
                });
            }
        }
        Ok(defaults)
    }

    /// Returns the config with the per-frame `min_pixels` and/or `max_pixels` replaced.
    pub fn with_pixels(mut self, min_pixels: Option<u64>, max_pixels: Option<u64>) -> Result<Self> {
        self.frame = self.frame.with_pixels(min_pixels, max_pixels)?;
        Ok(self)
    }

    /// Returns the config with the cap on the whole video's pixels replaced (`None`: no cap).
    pub fn with_total_pixels(mut self, total_pixels: Option<u64>) -> Self {
        self.total_pixels = total_pixels;
        self
    }

    /// The per-frame pixel maximum for a video of `frames` (padded) frames, as qwen-vl-utils
    /// computes it: `max(min(max_pixels, total / frames · temporal_patch_size),
    /// int(min_pixels · 1.05))`.
    pub fn frame_max_pixels(&self, frames: usize) -> f64 {
        let max = self.frame.max_pixels as f64;
        let capped = match self.total_pixels {
            Some(total) if frames > 0 => {
                let share = total as f64 / frames as f64 * self.frame.temporal_patch_size as f64;
                if share < max { share } else { max }
            }
            _ => max,
        };
        let floor = (self.frame.min_pixels as f64 * 1.05).trunc();
        if capped > floor { capped } else { floor }
    }
}

/// Patch rows for the vision tower: `rows × row_len` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchedMedia {
    /// `rows · row_len` normalised values.
    pub values: Vec<f32>,
    /// Number of patches: `t · h · w` of `grid_thw`.
    pub rows: usize,
    /// Values per patch: `3 · temporal_patch_size · patch_size²` (1176).
    pub row_len: usize,
    /// Grid in patches: (temporal patches, patch rows, patch columns).
    pub grid_thw: [usize; 3],
}

/// The reference's `smart_resize`: the `(height, width)` closest to the input whose sides are
/// multiples of `factor` and whose area lies in `min_pixels..=max_pixels`, keeping the aspect
/// ratio. Rounds half to even like Python's `round`.
///
/// Errors, as the reference does, when a side is shorter than `factor` or the aspect ratio is
/// over 200; also when the budget cannot hold the shape (where the reference would return 0).
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    smart_resize_f64(height, width, factor, min_pixels as f64, max_pixels as f64)
}

/// [`smart_resize`] with real-valued bounds (qwen-vl-utils' video budget is fractional).
fn smart_resize_f64(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: f64,
    max_pixels: f64,
) -> Result<(u32, u32)> {
    if height == 0 || width == 0 {
        return Err(ImageError::Empty {
            what: "image".into(),
            width,
            height,
        });
    }
    if factor == 0 {
        return Err(ImageError::Config(
            "the resize factor must be positive".into(),
        ));
    }
    if height < factor || width < factor {
        return Err(ImageError::TooSmall {
            width,
            height,
            factor,
        });
    }
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageError::AspectRatio {
            width,
            height,
            ratio,
        });
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    // Python compares the integer area with the (int or float) bound exactly; areas here are far
    // below 2^53, so f64 is exact too.
    let area = h * w;
    if h_bar * w_bar > max_pixels {
        let beta = (area / max_pixels).sqrt();
        h_bar = (h / beta / f).floor() * f;
        w_bar = (w / beta / f).floor() * f;
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels / area).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if !(h_bar >= f && w_bar >= f && h_bar <= f64::from(u32::MAX) && w_bar <= f64::from(u32::MAX)) {
        return Err(ImageError::Budget {
            width,
            height,
            factor,
            min_pixels,
            max_pixels,
        });
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// Per-channel lookup table `u8 -> f32` in the reference's float order. Images
/// ([`VideoNormalize::Separate`]): rescale in f64 (`x as f64 * rescale_factor`), cast to f32, then
/// `(x - mean) / std` in f32 with mean and std cast to f32. [`VideoNormalize::Fused`]:
/// `(x - f32(mean)·f32(1/rescale)) / (f32(std)·f32(1/rescale))` in f32, as torch computes it.
fn value_table(config: &ProcessorConfig, normalize: VideoNormalize) -> [[f32; 256]; 3] {
    let mut table = [[0.0f32; 256]; 3];
    let fused = normalize == VideoNormalize::Fused && config.do_rescale && config.do_normalize;
    for (c, row) in table.iter_mut().enumerate() {
        let (mut mean, mut std) = (config.image_mean[c] as f32, config.image_std[c] as f32);
        if fused {
            let inverse = (1.0 / config.rescale_factor) as f32;
            (mean, std) = (mean * inverse, std * inverse);
        }
        for (v, out) in row.iter_mut().enumerate() {
            let x = if config.do_rescale && !fused {
                (v as f64 * config.rescale_factor) as f32
            } else {
                v as f32
            };
            *out = if config.do_normalize {
                (x - mean) / std
            } else {
                x
            };
        }
    }
    table
}

/// Normalises `frames` (all the same size, a multiple of `patch_size · merge_size` on each side,
/// count a multiple of `temporal_patch_size`) and lays them out as the reference's reshape
/// `(gt, tp, C, gh/m, m, p, gw/m, m, p)` → transpose `(0,3,6,4,7,2,1,5,8)` → `(gt·gh·gw, C·tp·p·p)`.
fn patchify(
    frames: &[&RgbImage],
    config: &ProcessorConfig,
    normalize: VideoNormalize,
) -> Result<PatchedMedia> {
    let (p, m, tp) = (
        config.patch_size,
        config.merge_size,
        config.temporal_patch_size,
    );
    let Some(first) = frames.first() else {
        return Err(ImageError::NoFrames);
    };
    let (width, height) = first.dimensions();
    let (w, h) = (width as usize, height as usize);
    if !frames.len().is_multiple_of(tp)
        || !h.is_multiple_of(p * m)
        || !w.is_multiple_of(p * m)
        || frames.iter().any(|f| f.dimensions() != (width, height))
    {
        return Err(ImageError::Config(format!(
            "internal: cannot patchify {} frames of {width}x{height} with patch {p}, merge {m}, \
             temporal patch {tp}",
            frames.len()
        )));
    }
    let table = value_table(config, normalize);
    let (gt, gh, gw) = (frames.len() / tp, h / p, w / p);
    let rows = gt * gh * gw;
    let row_len = 3 * tp * p * p;
    let mut values = vec![0.0f32; rows * row_len];
    let frame_len = p * p; // values of one channel of one frame in a row
    let plane = tp * frame_len; // values of one channel in a row
    // One task per row of merge blocks (`gw · m` patches) of one temporal group; rows of patches
    // follow the reference's order: groups, block rows, block columns, then 2×2 inside a block.
    // (never 0: with no patch columns there are no rows either, and no chunks)
    let block_row_len = (gw * m * row_len).max(1);
    values
        .par_chunks_exact_mut(block_row_len)
        .enumerate()
        .for_each(|(index, block_row)| {
            let group = &frames[(index / (gh / m)) * tp..][..tp];
            let bh = index % (gh / m);
            let mut out_rows = block_row.chunks_exact_mut(row_len);
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let Some(row) = out_rows.next() else {
                            continue;
                        };
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for (ti, frame) in group.iter().enumerate() {
                            if ti > 0 && std::ptr::eq(*frame, group[ti - 1]) {
                                // A repeated frame (still image, padding): copy the previous one.
                                for c in 0..3 {
                                    let at = c * plane + ti * frame_len;
                                    row.copy_within(at - frame_len..at, at);
                                }
                                continue;
                            }
                            let raw: &[u8] = frame.as_raw();
                            let (r, rest) = row.split_at_mut(plane);
                            let (g, b) = rest.split_at_mut(plane);
                            let span = ti * frame_len..(ti + 1) * frame_len;
                            let dst = r[span.clone()]
                                .chunks_exact_mut(p)
                                .zip(g[span.clone()].chunks_exact_mut(p))
                                .zip(b[span].chunks_exact_mut(p));
                            for (py, ((r, g), b)) in dst.enumerate() {
                                let start = ((y0 + py) * w + x0) * 3;
                                let line = &raw[start..start + p * 3];
                                let px = line.chunks_exact(3).zip(r).zip(g).zip(b);
                                for (((rgb, r), g), b) in px {
                                    *r = table[0][usize::from(rgb[0])];
                                    *g = table[1][usize::from(rgb[1])];
                                    *b = table[2][usize::from(rgb[2])];
                                }
                            }
                        }
                    }
                }
            }
        });
    Ok(PatchedMedia {
        values,
        rows,
        row_len,
        grid_thw: [gt, gh, gw],
    })
}

/// Resizes an image as the reference does (`smart_resize` with the config's budget, then Pillow
/// bicubic), normalises it, repeats it to `temporal_patch_size` frames and patchifies it.
pub fn preprocess_image(image: &RgbImage, config: &ProcessorConfig) -> Result<PatchedMedia> {
    config.validate()?;
    let (width, height) = image.dimensions();
    let (new_h, new_w) = smart_resize(
        height,
        width,
        config.factor(),
        config.min_pixels,
        config.max_pixels,
    )?;
    let resized = resize_bicubic_compat(image, new_w, new_h, config.pillow);
    let frames = vec![&resized; config.temporal_patch_size];
    patchify(&frames, config, VideoNormalize::Separate)
}

/// Preprocesses video frames: every frame is resized (Pillow bicubic) to the `smart_resize` of
/// the first frame's size under the video budget ([`VideoConfig::frame_max_pixels`]), the frame
/// count is padded to a multiple of `temporal_patch_size` by repeating the last frame, and each
/// group of `temporal_patch_size` frames forms one temporal patch.
///
/// transformers ≥ 4.52 resizes video frames with torchvision instead of Pillow: frames that need
/// resampling may differ from it by a few units per channel; frames already a multiple of 28 px
/// on each side inside the budget (not resampled) match it exactly with [`VideoNormalize::Fused`].
pub fn preprocess_video(frames: &[RgbImage], config: &VideoConfig) -> Result<PatchedMedia> {
    let frame_config = &config.frame;
    frame_config.validate()?;
    let Some(first) = frames.first() else {
        return Err(ImageError::NoFrames);
    };
    for (i, f) in frames.iter().enumerate() {
        let (width, height) = f.dimensions();
        if width == 0 || height == 0 {
            return Err(ImageError::Empty {
                what: format!("video frame {i}"),
                width,
                height,
            });
        }
    }
    let tp = frame_config.temporal_patch_size;
    let padded = frames.len().div_ceil(tp) * tp;
    let (width, height) = first.dimensions();
    let (new_h, new_w) = smart_resize_f64(
        height,
        width,
        frame_config.factor(),
        frame_config.min_pixels as f64,
        config.frame_max_pixels(padded),
    )?;
    let resized: Vec<RgbImage> = frames
        .iter()
        .map(|f| resize_bicubic_compat(f, new_w, new_h, frame_config.pillow))
        .collect();
    let mut refs: Vec<&RgbImage> = resized.iter().collect();
    if let Some(last) = resized.last() {
        refs.resize(padded, last);
    }
    patchify(&refs, frame_config, config.normalize)
}

/// Reads and decodes a PNG, JPEG or WebP file to 8-bit RGB the way Pillow's
/// `Image.open(path).convert("RGB")` does: alpha is dropped (not composited), 16-bit colour keeps
/// the high byte, 16-bit grayscale is clipped to 255. EXIF orientation is not applied (Pillow
/// does not either). PNG and WebP decode to the same bytes as Pillow; JPEG decoders differ
/// (`image` uses zune-jpeg, Pillow libjpeg-turbo) by up to a few units per channel.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let decoded = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode {
            path: path.to_path_buf(),
            source: image::ImageError::IoError(e),
        })?
        .decode()
        .map_err(|source| ImageError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(to_rgb_like_pillow(decoded))
}

/// Converts a decoded image to RGB with Pillow's `convert("RGB")` semantics.
pub fn to_rgb_like_pillow(image: DynamicImage) -> RgbImage {
    fn map<P: image::Pixel, F: Fn(&P) -> [u8; 3]>(
        img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
        f: F,
    ) -> RgbImage {
        RgbImage::from_fn(img.width(), img.height(), |x, y| {
            image::Rgb(f(img.get_pixel(x, y)))
        })
    }
    let hi = |v: u16| (v >> 8) as u8;
    let clip = |v: u16| v.min(255) as u8;
    match image {
        DynamicImage::ImageRgb8(img) => img,
        DynamicImage::ImageRgba8(img) => map(&img, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(img) => map(&img, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(img) => map(&img, |p| [p[0]; 3]),
        DynamicImage::ImageRgb16(img) => map(&img, |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageRgba16(img) => map(&img, |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        // Pillow opens 16-bit grayscale as mode "I;16", whose RGB conversion clips.
        DynamicImage::ImageLuma16(img) => map(&img, |p| [clip(p[0]); 3]),
        // 16-bit gray + alpha opens as 8-bit "LA"/"RGBA" from the high bytes.
        DynamicImage::ImageLumaA16(img) => map(&img, |p| [hi(p[0]); 3]),
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir() -> tempfile::TempDir {
        match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        }
    }

    #[test]
    fn smart_resize_design_doc_vector() {
        assert_eq!(
            smart_resize(561, 278, 28, 3136, 1_003_520).ok(),
            Some((560, 280))
        );
    }

    /// (height, width, min_pixels, max_pixels, expected) from the Python port of the reference.
    type SmartCase = (u32, u32, u64, u64, (u32, u32));

    #[test]
    fn smart_resize_matches_python_table() {
        let table: &[SmartCase] = &[
            (561, 278, 3136, 1003520, (560, 280)),
            (1080, 1920, 3136, 12845056, (1092, 1932)),
            (1080, 1920, 3136, 1003520, (728, 1316)),
            (2400, 1080, 3136, 1003520, (1484, 672)),
            (3024, 4032, 3136, 12845056, (3024, 4032)),
            (4320, 7680, 3136, 12845056, (2688, 4760)),
            (42, 42, 3136, 1003520, (56, 56)),
            // 70 / 28 = 2.5 rounds to even (2): `f64::round` would give 84.
            (70, 70, 3136, 1003520, (56, 56)),
            (98, 98, 3136, 1003520, (112, 112)),
            (28, 28, 3136, 1003520, (56, 56)),
            (28, 5600, 3136, 1003520, (28, 5600)),
            (30, 40, 100352, 602112, (280, 392)),
            (1080, 1920, 100352, 602112, (560, 1008)),
            (2400, 1080, 100352, 602112, (1148, 504)),
            (322, 574, 3136, 12845056, (336, 560)),
            (50, 4000, 3136, 1003520, (56, 4004)),
            (768, 1366, 3136, 1003520, (728, 1316)),
        ];
        for &(h, w, min, max, want) in table {
            assert_eq!(smart_resize(h, w, 28, min, max).ok(), Some(want), "{h}x{w}");
        }
    }

    #[test]
    fn smart_resize_errors() {
        let err = |h, w, max| smart_resize(h, w, 28, 3136, max).err();
        assert!(matches!(
            err(27, 100, 1 << 20),
            Some(ImageError::TooSmall { height: 27, .. })
        ));
        assert!(matches!(
            err(100, 27, 1 << 20),
            Some(ImageError::TooSmall { width: 27, .. })
        ));
        assert!(matches!(
            err(28, 5601, 1 << 20),
            Some(ImageError::AspectRatio { .. })
        ));
        assert!(matches!(
            err(0, 50, 1 << 20),
            Some(ImageError::Empty { .. })
        ));
        // A budget of one 28x28 block cannot hold a 2:1 image (the reference would return width 0).
        assert!(matches!(
            err(100, 200, 784),
            Some(ImageError::Budget { .. })
        ));
        let msg = err(28, 5601, 1 << 20)
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("5601x28") && msg.contains("crop"), "{msg}");
        let msg = err(20, 40, 1 << 20)
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("40x20") && msg.contains("at least 28"),
            "{msg}"
        );
    }

    #[test]
    fn value_table_matches_numpy_float32_bits() {
        // numpy: normalize(rescale(x, 1/255), CLIP_MEAN, CLIP_STD) for x = 0, 1, 128, 255.
        let want: [[u32; 4]; 3] = [
            [0xbfe568dc, 0xbfe38a7f, 0x3d9c5620, 0x3ff71541],
            [0xbfe044b8, 0xbfde58f1, 0x3e2cf36b, 0x4004cae5],
            [0xbfbd77d8, 0xbfbba5e1, 0x3eae0dc4, 0x40095660],
        ];
        let table = value_table(&ProcessorConfig::default(), VideoNormalize::Separate);
        for (c, row) in want.iter().enumerate() {
            for (i, &v) in [0usize, 1, 128, 255].iter().enumerate() {
                assert_eq!(table[c][v].to_bits(), row[i], "channel {c} value {v}");
            }
        }
    }

    /// A 56x28 image whose red channel is x and green is y, unnormalised, so every value names
    /// the pixel it came from.
    fn coordinate_image() -> (RgbImage, ProcessorConfig) {
        let img = RgbImage::from_fn(56, 28, |x, y| image::Rgb([x as u8, y as u8, 200]));
        let config = ProcessorConfig {
            min_pixels: 784,
            do_rescale: false,
            do_normalize: false,
            ..ProcessorConfig::default()
        };
        (img, config)
    }

    #[test]
    fn patchify_layout_hand_checked() {
        let (img, config) = coordinate_image();
        let Ok(out) = preprocess_image(&img, &config) else {
            panic!("preprocess failed")
        };
        assert_eq!(out.grid_thw, [1, 2, 4]);
        assert_eq!((out.rows, out.row_len), (8, 1176));
        assert_eq!(out.values.len(), 8 * 1176);
        // Rows come in 2x2 merge blocks: row 5 is block column 1, top-right patch: x0 = 42, y0 = 0.
        let row = &out.values[5 * 1176..6 * 1176];
        // Feature (c, t, py, px) = c·392 + t·196 + py·14 + px.
        assert_eq!(row[196 + 3 * 14 + 4], 46.0); // red = x = 42 + 4, second frame
        assert_eq!(row[392 + 3 * 14 + 4], 3.0); // green = y = 0 + 3
        assert_eq!(row[2 * 392 + 195], 200.0); // blue
        // Row 2 is block column 0, bottom-left patch: x0 = 0, y0 = 14.
        let row = &out.values[2 * 1176..3 * 1176];
        assert_eq!(row[392 + 13 * 14 + 13], 27.0);
        assert_eq!(row[13 * 14 + 13], 13.0);
    }

    #[test]
    fn patchify_equals_the_reference_transpose() {
        // The reference: (gt, tp, C, gh/2, 2, 14, gw/2, 2, 14) transposed by (0,3,6,4,7,2,1,5,8).
        let img = RgbImage::from_fn(84, 56, |x, y| {
            image::Rgb([(x * 3 + y) as u8, (x ^ y) as u8, (x * y) as u8])
        });
        let config = ProcessorConfig {
            do_rescale: false,
            do_normalize: false,
            ..ProcessorConfig::default()
        };
        let Ok(out) = preprocess_image(&img, &config) else {
            panic!("preprocess failed")
        };
        let [gt, gh, gw] = out.grid_thw;
        assert_eq!([gt, gh, gw], [1, 4, 6]);
        let (hb, wb) = (gh / 2, gw / 2);
        // Output dims after the transpose: (gt, hb, wb, 2, 2, C, tp, 14, 14).
        for (flat, &v) in out.values.iter().enumerate() {
            let mut i = flat;
            let mut take = |n: usize| {
                let d = i % n;
                i /= n;
                d
            };
            let (px, py, _t, c, mw, mh, bw, bh) = (
                take(14),
                take(14),
                take(2),
                take(3),
                take(2),
                take(2),
                take(wb),
                take(hb),
            );
            let (x, y) = ((bw * 2 + mw) * 14 + px, (bh * 2 + mh) * 14 + py);
            let want = f32::from(img.get_pixel(x as u32, y as u32)[c]);
            assert_eq!(v, want, "flat index {flat}");
        }
    }

    #[test]
    fn video_pads_with_the_last_frame_and_resizes_all_frames_to_the_first() {
        let frame = |w, h, v: u8| RgbImage::from_fn(w, h, |x, y| image::Rgb([v, x as u8, y as u8]));
        let frames = [frame(56, 56, 10), frame(90, 30, 20), frame(56, 56, 30)];
        let config = match VideoConfig::default().with_pixels(Some(784), Some(56 * 56)) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let Ok(out) = preprocess_video(&frames, &config) else {
            panic!("preprocess failed")
        };
        assert_eq!(out.grid_thw, [2, 4, 4]);
        assert_eq!(out.rows, 32);
        let table = value_table(&config.frame, config.normalize);
        for row in out.values.chunks_exact(out.row_len).skip(16) {
            // Second temporal patch: frame 2 and its padding copy, red = 30 everywhere.
            assert!(row[..392].iter().all(|&v| v == table[0][30]));
        }
        for row in out.values.chunks_exact(out.row_len).take(16) {
            assert!(row[..196].iter().all(|&v| v == table[0][10]));
            assert!(row[196..392].iter().all(|&v| v == table[0][20]));
        }
    }

    #[test]
    fn video_errors() {
        let config = VideoConfig::default();
        assert!(matches!(
            preprocess_video(&[], &config),
            Err(ImageError::NoFrames)
        ));
        let frames = [RgbImage::new(56, 56), RgbImage::new(0, 56)];
        let err = preprocess_video(&frames, &config)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|m| m.contains("video frame 1")));
        let frames = [RgbImage::new(28, 6000)];
        assert!(matches!(
            preprocess_video(&frames, &config),
            Err(ImageError::AspectRatio { .. })
        ));
    }

    #[test]
    fn video_frame_budget_matches_qwen_vl_utils() {
        let config = VideoConfig::default();
        assert_eq!(config.frame_max_pixels(2), 602112.0);
        assert_eq!(config.frame_max_pixels(64), 602112.0);
        assert_eq!(config.frame_max_pixels(100), 19267584.0 / 100.0 * 2.0);
        assert_eq!(config.frame_max_pixels(768), 105369.0);
    }

    #[test]
    fn config_parsing() -> Result<()> {
        let released = r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 0.00392156862745098,
            "image_processor_type": "Qwen2VLImageProcessor"}"#;
        let c = ProcessorConfig::from_json_str(released)?;
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 12845056));
        // serde_json must read these exactly as Python does (they become float32 constants).
        assert_eq!(c.image_mean, CLIP_MEAN);
        assert_eq!(c.image_std, CLIP_STD);
        assert_eq!(c.rescale_factor, 1.0 / 255.0);
        assert_eq!(
            ProcessorConfig::from_json_str("{}")?,
            ProcessorConfig::default()
        );
        let sized = r#"{"size": {"shortest_edge": 1000, "longest_edge": 2000000.0}}"#;
        let c = ProcessorConfig::from_json_str(sized)?;
        assert_eq!((c.min_pixels, c.max_pixels), (1000, 2_000_000));
        let both = r#"{"size": {"shortest_edge": 1000, "longest_edge": 2000}, "max_pixels": 5000}"#;
        assert_eq!(ProcessorConfig::from_json_str(both)?.max_pixels, 5000);
        let c = ProcessorConfig::from_json_str(r#"{"image_mean": 0.5}"#)?;
        assert_eq!(c.image_mean, [0.5; 3]);
        assert!(ProcessorConfig::from_json_str(r#"{"image_std": [1, 2]}"#).is_err());
        assert!(ProcessorConfig::from_json_str(r#"{"min_pixels": 10, "max_pixels": 5}"#).is_err());
        assert!(ProcessorConfig::from_json_str(r#"{"patch_size": 0}"#).is_err());
        let c = ProcessorConfig::default().with_pixels(Some(100), Some(200_000))?;
        assert_eq!((c.min_pixels, c.max_pixels), (100, 200_000));
        assert!(
            ProcessorConfig::default()
                .with_pixels(None, Some(10))
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn video_config_sources() -> Result<()> {
        let dir = tmp_dir();
        assert_eq!(VideoConfig::from_dir(dir.path())?, VideoConfig::default());
        let image_cfg =
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.5, 0.5, 0.5]}"#;
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);
        write("preprocessor_config.json", image_cfg)
            .map_err(|e| ImageError::Config(e.to_string()))?;
        let v = VideoConfig::from_dir(dir.path())?;
        // Like transformers 4.5x: without a video file the image file's budget applies per frame.
        assert_eq!((v.frame.min_pixels, v.frame.max_pixels), (3136, 12845056));
        assert_eq!(v.total_pixels, Some(VIDEO_TOTAL_PIXELS));
        assert_eq!(v.frame.image_mean, [0.5; 3]);
        write(
            "video_preprocessor_config.json",
            r#"{"max_pixels": 400000, "total_pixels": 9000000}"#,
        )
        .map_err(|e| ImageError::Config(e.to_string()))?;
        let v = VideoConfig::from_dir(dir.path())?;
        assert_eq!(
            (v.frame.min_pixels, v.frame.max_pixels),
            (VIDEO_MIN_PIXELS, 400_000)
        );
        assert_eq!(v.total_pixels, Some(9_000_000));
        write("video_preprocessor_config.json", "{not json")
            .map_err(|e| ImageError::Config(e.to_string()))?;
        let err = VideoConfig::from_dir(dir.path())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|m| m.contains("video_preprocessor_config.json")));
        Ok(())
    }

    #[test]
    fn load_rgb_errors_name_the_path() {
        let dir = tmp_dir();
        let missing = dir.path().join("missing.png");
        let msg = load_rgb(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("missing.png"), "{msg}");
        let junk = dir.path().join("junk.png");
        if let Err(e) = std::fs::write(&junk, b"not an image") {
            panic!("{e}");
        }
        let msg = load_rgb(&junk)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("junk.png") && msg.contains("PNG, JPEG, WebP"),
            "{msg}"
        );
    }

    #[test]
    fn rgb_conversion_follows_pillow() {
        let rgba = image::RgbaImage::from_pixel(2, 1, image::Rgba([10, 20, 30, 0]));
        let rgb = to_rgb_like_pillow(DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]); // alpha dropped, not composited
        let l16 = image::ImageBuffer::from_raw(3, 1, vec![7u16, 256, 65535]);
        let Some(l16) = l16 else { panic!("buffer") };
        let rgb = to_rgb_like_pillow(DynamicImage::ImageLuma16(l16));
        assert_eq!(rgb.as_raw(), &[7, 7, 7, 255, 255, 255, 255, 255, 255]);
        let c16 = image::ImageBuffer::from_raw(1, 1, vec![0x01ffu16, 0x7fff, 0x8000]);
        let Some(c16) = c16 else { panic!("buffer") };
        let rgb = to_rgb_like_pillow(DynamicImage::ImageRgb16(c16));
        assert_eq!(rgb.as_raw(), &[1, 127, 128]);
    }
}
