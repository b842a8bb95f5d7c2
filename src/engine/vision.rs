//! The Qwen2-VL vision tower: patch embedding as one matmul, 2-D rotary embeddings, transformer
//! blocks with block-diagonal attention per frame (never an N×N matrix across frames or media),
//! and the 2×2 patch merger that maps vision features into the language model's width.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::attention;
use super::config::VisionConfig;
use super::layer_norm::LayerNorm;
use super::linear::{self, Activation, Linear, WeightLayer};
use super::profile;
use super::rope_index::GridThw;
use super::split_rope;

const LAYER_NORM_EPS: f64 = 1e-6;
const VISION_ROPE_THETA: f32 = 10_000.0;

fn layer_norm(size: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    LayerNorm::load(size, LAYER_NORM_EPS, vb)
}

/// A linear layer with bias, packed for the CPU's bf16 kernel where that applies.
fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let mut layer = Linear::load(in_dim, out_dim, true, vb)?;
    layer.pack_for_cpu()?;
    Ok(layer)
}

struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.embed_dim;
        Ok(Self {
            qkv: linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: linear(dim, dim, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `residual + attention(x)`.
    fn forward_plus(
        &self,
        x: &Tensor,
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        frame_lens: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (n, dim) = x.dims2()?;
        let device = x.device();
        #[cfg(feature = "cuda")]
        if super::cuda_fused::enabled(x) {
            // the bias joins the rotation: one pass from the projection to q, k, v
            let (y, bias) = profile::phase("vision.attention.qkv", device, || {
                self.qkv.forward_split_bias(x)
            })?;
            let (q, k, v) = profile::phase("vision.attention.rope", device, || {
                super::cuda_fused::vision_qkv_rope(
                    &y,
                    bias,
                    cos,
                    sin,
                    self.num_heads,
                    self.head_dim,
                )
            })?;
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let out = profile::phase("vision.attention.attend", device, || {
                attention::block_diagonal(&q, &k, &v, frame_lens, scale)
            })?;
            return profile::phase("vision.attention.proj", device, || {
                self.proj.forward_plus(&out.reshape((n, dim))?, residual)
            });
        }
        let heads = [self.num_heads; 3];
        // On the CPU's packed kernel the rotation is the projection's epilogue (its profile
        // phase is then `qkv`, which includes it).
        let fused = match self.qkv.is_packed() {
            true => profile::phase("vision.attention.qkv", device, || {
                split_rope::projected_split_rotated(&self.qkv, x, heads, self.head_dim, cos, sin)
            })?,
            false => None,
        };
        let (q, k, v) = match fused {
            Some(qkv) => qkv,
            None => self.split_rotated(x, cos, sin)?,
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = profile::phase("vision.attention.attend", device, || {
            attention::block_diagonal(&q, &k, &v, frame_lens, scale)
        })?;
        let out = out.reshape((n, dim))?;
        profile::phase("vision.attention.proj", device, || {
            self.proj.forward_plus(&out, residual)
        })
    }

    /// q, k and v of `x` (`(n, heads, head_dim)` each) with q and k rotated, as two steps: the
    /// projection, then the rotation.
    fn split_rotated(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (n, dim) = x.dims2()?;
        let device = x.device();
        let qkv = profile::phase("vision.attention.qkv", device, || self.qkv.forward(x))?
            .reshape((n, 3, self.num_heads, self.head_dim))?;
        // Rotary embeddings are applied in f32 and rounded back to the model's dtype, as the
        // reference does; attention then runs in that dtype (f32 sums).
        let rotate = |t: Tensor| -> candle_core::Result<Tensor> {
            let t = t.to_dtype(DType::F32)?.unsqueeze(0)?.contiguous()?;
            candle_nn::rotary_emb::rope_thd(&t, cos, sin)?
                .squeeze(0)?
                .to_dtype(x.dtype())
        };
        profile::phase("vision.attention.rope", device, || {
            let heads = [self.num_heads; 3];
            let flat = qkv.reshape((n, 3 * dim))?;
            if let Some(qkv) = split_rope::split_rotated(&flat, heads, self.head_dim, cos, sin)? {
                return Ok(qkv);
            }
            Ok((
                rotate(qkv.i((.., 0))?)?,
                rotate(qkv.i((.., 1))?)?,
                qkv.i((.., 2))?.contiguous()?,
            ))
        })
    }
}

struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    attn: VisionAttention,
    fc1: Linear,
    fc2: Linear,
}

impl VisionBlock {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.embed_dim;
        let hidden = cfg.mlp_hidden();
        Ok(Self {
            norm1: layer_norm(dim, vb.pp("norm1"))?,
            norm2: layer_norm(dim, vb.pp("norm2"))?,
            attn: VisionAttention::load(cfg, vb.pp("attn"))?,
            fc1: linear(dim, hidden, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(hidden, dim, vb.pp("mlp").pp("fc2"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        frame_lens: &[usize],
    ) -> candle_core::Result<Tensor> {
        let device = x.device();
        let normed = profile::phase("vision.norm", device, || self.norm1.forward(x))?;
        let x = self.attn.forward_plus(&normed, x, cos, sin, frame_lens)?;
        let normed = profile::phase("vision.norm", device, || self.norm2.forward(&x))?;
        profile::phase("vision.mlp", device, || {
            linear::mlp_plus(&self.fc1, Activation::QuickGelu, &self.fc2, &normed, &x)
        })
    }
}

/// Vision transformer + merger. Input: patch rows `(N, C·T·P·P)`; output: `(N / merge², hidden)`.
pub struct VisionTower {
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger_norm: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    cfg: VisionConfig,
    dtype: DType,
}

impl VisionTower {
    /// Loads the tower from `vb` rooted at the checkpoint's vision prefix (`visual` or `model.visual`).
    pub fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let patch = cfg.patch_size;
        let w = vb.get(
            (
                cfg.embed_dim,
                cfg.in_chans,
                cfg.temporal_patch_size,
                patch,
                patch,
            ),
            "patch_embed.proj.weight",
        )?;
        // Conv3d with kernel == stride and no bias is one matmul over flattened patches.
        let mut patch_embed = Linear::new(w.reshape((cfg.embed_dim, cfg.patch_row_len()))?, None);
        patch_embed.pack_for_cpu()?;
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::load(cfg, vb.pp("blocks").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let merged = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let mvb = vb.pp("merger");
        Ok(Self {
            patch_embed,
            blocks,
            merger_norm: layer_norm(cfg.embed_dim, mvb.pp("ln_q"))?,
            merger_fc1: linear(merged, merged, mvb.pp("mlp").pp("0"))?,
            merger_fc2: linear(merged, cfg.hidden_size, mvb.pp("mlp").pp("2"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// The tower's input tensor on `device` from the patch rows of several media items (in
    /// order), already in the tower's dtype. The values are converted on the host, spread over
    /// rayon's threads, so a GPU upload carries half the bytes in bf16/f16; the rounding is
    /// candle's cast (to nearest, ties to even), so the bits equal a cast on the device.
    pub fn input(&self, media: &[&[f32]], device: &Device) -> candle_core::Result<Tensor> {
        let row_len = self.cfg.patch_row_len();
        let total: usize = media.iter().map(|m| m.len()).sum();
        if !total.is_multiple_of(row_len) {
            candle_core::bail!("vision input has {total} values, not whole rows of {row_len}");
        }
        let shape = (total / row_len, row_len);
        match self.dtype {
            DType::BF16 => Tensor::from_vec(gather(media, half::bf16::from_f32), shape, device),
            DType::F16 => Tensor::from_vec(gather(media, half::f16::from_f32), shape, device),
            DType::F32 => Tensor::from_vec(gather(media, |v| v), shape, device),
            other => Tensor::from_vec(gather(media, |v| v), shape, device)?.to_dtype(other),
        }
    }

    /// Runs the tower over the patch rows of several media items (`grids` in order).
    pub fn forward(&self, patches: &Tensor, grids: &[GridThw]) -> candle_core::Result<Tensor> {
        if patches.device().is_cuda() {
            // the host only queues kernels: no thread hop
            return self.forward_in_pool(patches, grids);
        }
        // on one of rayon's threads, as the decoder does (see `TextModel::forward`)
        rayon::scope(|_| self.forward_in_pool(patches, grids))
    }

    fn forward_in_pool(&self, patches: &Tensor, grids: &[GridThw]) -> candle_core::Result<Tensor> {
        let device = patches.device().clone();
        let (n, row_len) = patches.dims2()?;
        let expected: usize = grids.iter().map(|[t, h, w]| t * h * w).sum();
        if n != expected || row_len != self.cfg.patch_row_len() {
            candle_core::bail!(
                "vision input has shape ({n}, {row_len}) but the grids {grids:?} need ({expected}, {})",
                self.cfg.patch_row_len()
            );
        }
        let mut x = profile::phase("vision.patch_embed", &device, || {
            self.patch_embed.forward(&patches.to_dtype(self.dtype)?)
        })?;
        let (cos, sin) = profile::phase("vision.rope_tables", &device, || {
            self.rotary(grids, &device)
        })?;
        let frame_lens: Vec<usize> = grids
            .iter()
            .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t))
            .collect();
        for block in &self.blocks {
            x = block.forward(&x, &cos, &sin, &frame_lens)?;
        }
        let merge = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        profile::phase("vision.merger", &device, || {
            let x = self.merger_norm.forward(&x)?;
            let x = x.reshape((n / merge, self.cfg.embed_dim * merge))?;
            let x = self.merger_fc1.forward(&x)?;
            let x = x.gelu_erf()?;
            self.merger_fc2.forward(&x)
        })
    }

    /// cos/sin of the 2-D rotary embedding, `(N, head_dim/2)` in f32, rows in patch order
    /// (2×2 merge blocks, block-major).
    fn rotary(&self, grids: &[GridThw], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let rot_dim = self.cfg.head_dim() / 2; // frequencies split between rows and columns
        let inv_freq: Vec<f32> = (0..rot_dim / 2)
            .map(|i| 1.0 / VISION_ROPE_THETA.powf((2 * i) as f32 / rot_dim as f32))
            .collect();
        let m = self.cfg.spatial_merge_size;
        let total: usize = grids.iter().map(|[t, h, w]| t * h * w).sum();
        let mut freqs = Vec::with_capacity(total * rot_dim);
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                let (row, col) = ((bh * m + ih) as f32, (bw * m + iw) as f32);
                                freqs.extend(inv_freq.iter().map(|f| row * f));
                                freqs.extend(inv_freq.iter().map(|f| col * f));
                            }
                        }
                    }
                }
            }
        }
        let freqs = Tensor::from_vec(freqs, (total, rot_dim), device)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

/// The values of `media` one after another, each converted by `convert`, in parallel (written
/// in place, no zeroing first).
fn gather<T: Send>(media: &[&[f32]], convert: impl Fn(f32) -> T + Sync + Send) -> Vec<T> {
    let mut out = Vec::with_capacity(media.iter().map(|m| m.len()).sum());
    for values in media {
        out.par_extend(values.par_iter().map(|&v| convert(v)));
    }
    out
}
