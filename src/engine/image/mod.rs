//! Qwen2-VL image and video preprocessing: decoding to RGB, `smart_resize`, Pillow-exact bicubic
//! resizing, rescale/normalise and patchify into the vision tower's `(rows, 1176)` input.
//!
//! Mirrors Hugging Face transformers' slow `Qwen2VLImageProcessor` (which resizes with Pillow),
//! value for value: the rows this module produces are bit-identical to the reference's
//! `pixel_values` for the same RGB input.

mod resample;

use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};
use serde::Deserialize;

pub use resample::resize_bicubic;

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
        })
    }

    /// Reads the checkpoint directory's `video_preprocessor_config.json` if it exists. Otherwise
    /// takes patch geometry and normalisation from `preprocessor_config.json` (if that exists) and
    /// keeps the video pixel budget defaults: that file's `min_pixels`/`max_pixels` are an image
    /// budget (up to 16384 tokens), far too large per frame.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let video = dir.join("video_preprocessor_config.json");
        if video.is_file() {
            let defaults = Self::default();
            let (frame, total) = with_path(&video, read_raw(&video)?.apply(defaults.frame))?;
            return Ok(Self {
                frame,
                total_pixels: total.or(defaults.total_pixels),
            });
        }
        // Without a video config, the reference's video processor reads preprocessor_config.json
        // whole, pixel budget included, and caps nothing in total (transformers 4.57).
        let image = dir.join("preprocessor_config.json");
        if image.is_file() {
            return Ok(Self {
                frame: ProcessorConfig::from_file(&image)?,
                total_pixels: None,
            });
        }
        Ok(Self::default())
    }

    /// Returns the config with the per-frame bounds and/or the total cap replaced.
    pub fn with_pixels(
        mut self,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
        total_pixels: Option<Option<u64>>,
    ) -> Result<Self> {
        self.frame = self.frame.with_pixels(min_pixels, max_pixels)?;
        if let Some(total) = total_pixels {
            self.total_pixels = total;
        }
        Ok(self)
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

/// Per-channel lookup table `u8 -> f32` with the reference's float order: rescale in f64
/// (`x as f64 * rescale_factor`), cast to f32, then `(x - mean) / std` in f32 with mean and std
/// cast to f32.
fn value_table(config: &ProcessorConfig) -> [[f32; 256]; 3] {
    let mut table = [[0.0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        let mean = config.image_mean[c] as f32;
        let std = config.image_std[c] as f32;
        for (v, out) in row.iter_mut().enumerate() {
            let x = if config.do_rescale {
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
fn patchify(frames: &[&RgbImage], config: &ProcessorConfig) -> Result<PatchedMedia> {
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
    if frames.len() % tp != 0
        || h % (p * m) != 0
        || w % (p * m) != 0
        || frames.iter().any(|f| f.dimensions() != (width, height))
    {
        return Err(ImageError::Config(format!(
            "internal: cannot patchify {} frames of {width}x{height} with patch {p}, merge {m}, \
             temporal patch {tp}",
            frames.len()
        )));
    }
    let table = value_table(config);
    let (gt, gh, gw) = (frames.len() / tp, h / p, w / p);
    let rows = gt * gh * gw;
    let row_len = 3 * tp * p * p;
    let mut values = Vec::with_capacity(rows * row_len);
    for t in 0..gt {
        let group = &frames[t * tp..(t + 1) * tp];
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let y0 = (bh * m + mh) * p;
                        let x0 = (bw * m + mw) * p;
                        for (c, lut) in table.iter().enumerate() {
                            for frame in group {
                                let raw: &[u8] = frame.as_raw();
                                for y in y0..y0 + p {
                                    let line = &raw[(y * w + x0) * 3..(y * w + x0 + p) * 3];
                                    values.extend(
                                        line.chunks_exact(3).map(|px| lut[usize::from(px[c])]),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
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
    let resized = resize_bicubic(image, new_w, new_h);
    let frames = vec![&resized; config.temporal_patch_size];
    patchify(&frames, config)
}

/// Preprocesses video frames: every frame is resized (Pillow bicubic) to the `smart_resize` of
/// the first frame's size under the video budget ([`VideoConfig::frame_max_pixels`]), the frame
/// count is padded to a multiple of `temporal_patch_size` by repeating the last frame, and each
/// group of `temporal_patch_size` frames forms one temporal patch.
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
        .map(|f| resize_bicubic(f, new_w, new_h))
        .collect();
    let mut refs: Vec<&RgbImage> = resized.iter().collect();
    if let Some(last) = resized.last() {
        refs.resize(padded, last);
    }
    patchify(&refs, frame_config)
}

/// Reads and decodes a PNG, JPEG or WebP file to 8-bit RGB the way Pillow's
/// `Image.open(path).convert("RGB")` does: alpha is dropped (not composited), 16-bit colour keeps
/// the high byte, 16-bit grayscale is clipped to 255. EXIF orientation is not applied (Pillow
/// does not either).
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
mod tests {}
