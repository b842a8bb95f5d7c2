//! The Qwen2 language model of Qwen2-VL: embeddings with vision rows spliced in, decoder layers
//! with grouped-query attention and multimodal rotary embeddings (M-RoPE), a KV cache that grows
//! with the real context, and logits for the last position only.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::linear::{GatedLinear, Linear, Quantization, WeightLayer};

use super::attention;
use super::config::TextConfig;
use super::profile;
use super::rms_norm::RmsNorm;
use super::split_rope;

/// Keys and values of one layer for the positions seen so far, `(1, len, kv_heads, head_dim)`,
/// in a buffer that grows by doubling and can be cut back to a prefix (to reuse it across turns).
#[derive(Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold room for.
    #[cfg(feature = "cuda")]
    fn capacity(&self) -> usize {
        let room = |b: &Option<Tensor>| b.as_ref().map_or(0, |b| b.dim(1).unwrap_or(0));
        room(&self.k).min(room(&self.v))
    }

    /// Forgets everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes `buffer` `(1, capacity, kv_heads, d)` hold at least `needed` positions (doubling),
    /// keeping the first `used`.
    fn grow(
        buffer: &mut Option<Tensor>,
        used: usize,
        (kv_heads, d): (usize, usize),
        dtype: DType,
        device: &Device,
        needed: usize,
    ) -> candle_core::Result<()> {
        let capacity = buffer.as_ref().map_or(0, |b| b.dim(1).unwrap_or(0));
        if needed <= capacity {
            return Ok(());
        }
        let shape = (1, needed.max(capacity * 2), kv_heads, d);
        let bigger = Tensor::zeros(shape, dtype, device)?;
        if let Some(old) = buffer.as_ref()
            && used > 0
        {
            bigger.slice_set(&old.narrow(1, 0, used)?, 1, 0)?;
        }
        *buffer = Some(bigger);
        Ok(())
    }

    /// Room for `s` more positions of `kv_heads` heads of `d` values: the key and value buffers
    /// `(1, capacity, kv_heads, d)` and the position where the new rows go. A kernel writes them
    /// there; [`Self::commit`] then counts them.
    pub fn reserve(
        &mut self,
        s: usize,
        heads: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor, usize)> {
        let needed = self.len + s;
        Self::grow(&mut self.k, self.len, heads, dtype, device, needed)?;
        Self::grow(&mut self.v, self.len, heads, dtype, device, needed)?;
        let (Some(kb), Some(vb)) = (self.k.as_ref(), self.v.as_ref()) else {
            candle_core::bail!("KV cache buffers missing after growing");
        };
        Ok((kb.clone(), vb.clone(), self.len))
    }

    /// Counts `s` positions written after [`Self::reserve`] and returns everything cached.
    pub fn commit(&mut self, s: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (Some(kb), Some(vb)) = (self.k.as_ref(), self.v.as_ref()) else {
            candle_core::bail!("KV cache committed before it was reserved");
        };
        if self.len + s > kb.dim(1)? {
            candle_core::bail!("KV cache: {} positions committed past its capacity", s);
        }
        self.len += s;
        Ok((kb.narrow(1, 0, self.len)?, vb.narrow(1, 0, self.len)?))
    }

    /// The whole key and value buffers `(1, capacity, kv_heads, d)`.
    #[cfg(feature = "cuda")]
    fn buffers(&self) -> candle_core::Result<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
            _ => candle_core::bail!("KV cache buffers read before they were reserved"),
        }
    }

    /// Appends `k`, `v` `(1, s, kv_heads, d)` and returns everything cached.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, s, kv_heads, d) = k.dims4()?;
        let (kb, vb, at) = self.reserve(s, (kv_heads, d), k.dtype(), k.device())?;
        kb.slice_set(&k.contiguous()?, 1, at)?;
        vb.slice_set(&v.contiguous()?, 1, at)?;
        self.commit(s)
    }
}

/// cos/sin tables for M-RoPE: `(len, head_dim/2)` each, in the model dtype.
pub struct RotaryTables {
    pub cos: Tensor,
    pub sin: Tensor,
    /// In a decode step captured as a CUDA graph: the device address of an i32 holding the
    /// KV-cache position of the step's token, which the cache writes and the attention read when
    /// the graph runs (see `cuda_graph`); `None` everywhere else.
    pub replay: Option<u64>,
}

/// Builds M-RoPE tables for positions given as three rows (t, h, w).
pub fn mrope_tables(
    cfg: &TextConfig,
    rows: [&[i64]; 3],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<RotaryTables> {
    let half = cfg.head_dim() / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim() as f32))
        .collect();
    let [st, sh, _] = cfg.mrope_section;
    let len = rows[0].len();
    let mut freqs = Vec::with_capacity(len * half);
    for ((&t, &h), &w) in rows[0].iter().zip(rows[1]).zip(rows[2]) {
        let (t, h, w) = (t as f32, h as f32, w as f32);
        for (i, f) in inv_freq.iter().enumerate() {
            let position = if i < st {
                t
            } else if i < st + sh {
                h
            } else {
                w
            };
            freqs.push(position * f);
        }
    }
    let freqs = Tensor::from_vec(freqs, (len, half), device)?;
    Ok(RotaryTables {
        cos: freqs.cos()?.to_dtype(dtype)?,
        sin: freqs.sin()?.to_dtype(dtype)?,
        replay: None,
    })
}

/// Rotary tables of the positions a decode loop feeds, `first`, `first + 1`, ..., built a chunk
/// of positions at a time by [`mrope_tables`] (row by row the same values), so a step takes a
/// view instead of computing and uploading its own.
pub struct DecodeRope {
    first: i64,
    dtype: DType,
    device: Device,
    chunk: Option<(usize, RotaryTables)>,
}

impl DecodeRope {
    const CHUNK: usize = 64;

    pub fn new(first: i64, dtype: DType, device: &Device) -> Self {
        Self {
            first,
            dtype,
            device: device.clone(),
            chunk: None,
        }
    }

    /// The tables of position `first + step` (all three M-RoPE rows equal, as for text).
    pub fn at(&mut self, cfg: &TextConfig, step: usize) -> candle_core::Result<RotaryTables> {
        let index = step / Self::CHUNK;
        let tables = match &self.chunk {
            Some((at, tables)) if *at == index => tables,
            _ => {
                let start = self.first + (index * Self::CHUNK) as i64;
                let positions: Vec<i64> = (start..start + Self::CHUNK as i64).collect();
                let tables = mrope_tables(
                    cfg,
                    [&positions, &positions, &positions],
                    self.dtype,
                    &self.device,
                )?;
                &self.chunk.insert((index, tables)).1
            }
        };
        let row = step % Self::CHUNK;
        Ok(RotaryTables {
            cos: tables.cos.narrow(0, row, 1)?,
            sin: tables.sin.narrow(0, row, 1)?,
            replay: None,
        })
    }
}

struct Attention {
    /// q, k and v stacked: one pass over the three weights.
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        Ok(Self {
            qkv_proj: Linear::load_stacked(
                h,
                &[(q, "q_proj"), (kv, "k_proj"), (kv, "v_proj")],
                true,
                vb.clone(),
            )?,
            o_proj: Linear::load(cfg.num_attention_heads * hd, h, false, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `residual + attention(x)`; with `last_only`, for the last position alone (every
    /// position's keys and values are still cached).
    fn forward_plus(
        &self,
        x: &Tensor,
        residual: &Tensor,
        rope: &RotaryTables,
        cache: &mut KvCache,
        last_only: bool,
    ) -> candle_core::Result<Tensor> {
        let out = self.attend(x, rope, cache, last_only)?;
        let s = residual.dim(1)?;
        let residual = if last_only {
            residual.narrow(1, s - 1, 1)?
        } else {
            residual.clone()
        };
        profile::phase("text.attention.o_proj", x.device(), || {
            self.o_proj.forward_plus(&out, &residual)
        })
    }

    /// `attention(x)` without the residual.
    #[cfg(feature = "cuda")]
    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryTables,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let out = self.attend(x, rope, cache, false)?;
        profile::phase("text.attention.o_proj", x.device(), || {
            self.o_proj.forward(&out)
        })
    }

    /// The attention heads' output `(b, s, heads · head_dim)` before the output projection (with
    /// `last_only`, of the last position alone: `s` is 1); the new keys and values are appended
    /// to `cache`.
    fn attend(
        &self,
        x: &Tensor,
        rope: &RotaryTables,
        cache: &mut KvCache,
        last_only: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (q, k, v) = self.rotated_and_cached(x, rope, cache)?;
        let (q, s) = if last_only && s > 1 {
            (q.narrow(1, s - 1, 1)?, 1)
        } else {
            (q, s)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        #[cfg(feature = "cuda")]
        if let Some(position) = rope.replay {
            // a captured decode step: the keys up to the position the device holds, read from
            // the whole cache buffers (the views above end where the capture was)
            let (kb, vb) = cache.buffers()?;
            let out = super::cuda_fused::decode_attention_at(
                &q.squeeze(0)?,
                &kb.squeeze(0)?,
                &vb.squeeze(0)?,
                scale,
                Some(position),
            )?;
            let Some(out) = out else {
                candle_core::bail!("a captured decode step needs the fused decode attention");
            };
            return out.reshape((b, s, self.num_heads * self.head_dim));
        }
        let out = profile::phase("text.attention.attend", x.device(), || {
            attention::causal(&q, &k, &v, scale)
        })?;
        out.reshape((b, s, self.num_heads * self.head_dim))
    }

    /// q `(b, s, heads, d)` rotated, and every cached key and value after `x`'s are appended.
    /// On CUDA in bf16 the projection's bias, the rotations and the cache writes are one kernel.
    fn rotated_and_cached(
        &self,
        x: &Tensor,
        rope: &RotaryTables,
        cache: &mut KvCache,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let device = x.device();
        #[cfg(feature = "cuda")]
        if super::cuda_fused::enabled(x) {
            let (y, bias) = profile::phase("text.attention.qkv", device, || {
                self.qkv_proj.forward_split_bias(x)
            })?;
            return profile::phase("text.attention.rope_cache", device, || {
                let heads = (self.num_kv_heads, self.head_dim);
                let (k_buf, v_buf, at) = cache.reserve(s, heads, x.dtype(), device)?;
                let q = super::cuda_fused::bias_rope_cache(
                    &y,
                    bias,
                    &rope.cos,
                    &rope.sin,
                    (self.num_heads, self.num_kv_heads, self.head_dim),
                    &k_buf,
                    &v_buf,
                    at,
                    rope.replay,
                )?;
                let (k, v) = cache.commit(s)?;
                Ok((q, k, v))
            });
        }
        let qkv = profile::phase("text.attention.qkv", device, || self.qkv_proj.forward(x))?;
        let (q_width, kv_width) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        // the stacked output's columns: q heads, then k heads, then v heads
        let split = |start: usize, heads: usize| {
            qkv.narrow(2, start, heads * self.head_dim)?
                .reshape((b, s, heads, self.head_dim))
        };
        profile::phase("text.attention.rope_cache", device, || {
            let heads = [self.num_heads, self.num_kv_heads, self.num_kv_heads];
            if let Some((q, k, v)) =
                split_rope::split_rotated(&qkv, heads, self.head_dim, &rope.cos, &rope.sin)?
            {
                let (q, k, v) = (
                    q.reshape((b, s, self.num_heads, self.head_dim))?,
                    k.reshape((b, s, self.num_kv_heads, self.head_dim))?,
                    v.reshape((b, s, self.num_kv_heads, self.head_dim))?,
                );
                let (k, v) = cache.append(&k, &v)?;
                return Ok((q, k, v));
            }
            let q = split(0, self.num_heads)?;
            let k = split(q_width, self.num_kv_heads)?;
            let v = split(q_width + kv_width, self.num_kv_heads)?;
            let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &rope.cos, &rope.sin)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &rope.cos, &rope.sin)?;
            let (k, v) = cache.append(&k, &v)?;
            Ok((q, k, v))
        })
    }
}

struct DecoderLayer {
    attn: Attention,
    gate_up: GatedLinear,
    down: Linear,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

impl DecoderLayer {
    fn linears_mut(&mut self) -> [&mut dyn WeightLayer; 4] {
        [
            &mut self.attn.qkv_proj,
            &mut self.attn.o_proj,
            &mut self.gate_up,
            &mut self.down,
        ]
    }

    fn load(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        Ok(Self {
            attn: Attention::load(cfg, vb.pp("self_attn"))?,
            gate_up: GatedLinear::load(h, i, "gate_proj", "up_proj", mlp.clone())?,
            down: Linear::load(i, h, false, mlp.pp("down_proj"))?,
            input_norm: RmsNorm::load(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_norm: RmsNorm::load(h, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    /// The layer on the residual stream `x` whose input norm `normed` is already computed;
    /// returns the new stream and `next_norm` of it (the next layer's input norm, or the final
    /// norm). On CUDA in bf16 each residual sum and the norm after it are one kernel.
    ///
    /// With `last_only` (the last layer, on the CPU) only the last position goes on after the
    /// keys and values are cached: nothing reads the other positions' outputs, and their
    /// attention, output projection and MLP were 1/28 of a 2B prefill.
    fn forward(
        &self,
        x: &Tensor,
        normed: &Tensor,
        rope: &RotaryTables,
        cache: &mut KvCache,
        (next_norm, last_only): (&RmsNorm, bool),
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let device = x.device();
        #[cfg(feature = "cuda")]
        if super::cuda_fused::enabled(x) {
            use super::cuda_fused::add_rmsnorm;
            let attn = self.attn.forward(normed, rope, cache)?;
            let norm = &self.post_norm;
            let (x, normed) = profile::phase("text.norm", device, || {
                add_rmsnorm(x, &attn, norm.weight(), norm.eps())
            })?;
            let gated =
                profile::phase("text.mlp.gate_up", device, || self.gate_up.forward(&normed))?;
            let down = profile::phase("text.mlp.down", device, || self.down.forward(&gated))?;
            return profile::phase("text.norm", device, || {
                add_rmsnorm(&x, &down, next_norm.weight(), next_norm.eps())
            });
        }
        let x = self.attn.forward_plus(normed, x, rope, cache, last_only)?;
        let normed = profile::phase("text.norm", device, || self.post_norm.forward(&x))?;
        let gated = profile::phase("text.mlp.gate_up", device, || self.gate_up.forward(&normed))?;
        let x = profile::phase("text.mlp.down", device, || {
            self.down.forward_plus(&gated, &x)
        })?;
        let normed = profile::phase("text.norm", device, || next_norm.forward(&x))?;
        Ok((x, normed))
    }
}

/// Where the token embeddings are looked up.
enum TokenTable {
    /// The embedding matrix (also the output layer's weight when tied and not packed).
    Matrix(Embedding),
    /// The rows of a tied output layer that is held packed for the CPU kernel only: the matrix
    /// is not kept twice.
    OutputLayer,
}

/// The decoder with its own KV cache (one conversation at a time).
pub struct TextModel {
    embed: TokenTable,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    caches: Vec<KvCache>,
    cfg: TextConfig,
}

impl TextModel {
    /// `model_vb` is rooted at the decoder (`model` or `model.language_model`); `lm_head_vb` at
    /// the checkpoint root. A tied model reuses the embedding matrix as the output layer. With
    /// `quantize`, every linear layer (the output layer included; the embedding lookup stays
    /// dense) is stored in that format.
    pub fn load(
        cfg: &TextConfig,
        model_vb: VarBuilder,
        root_vb: VarBuilder,
        quantize: Option<Quantization>,
    ) -> candle_core::Result<Self> {
        let embed =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, model_vb.pp("embed_tokens"))?;
        // A tied output layer reads the whole matrix every token. Where the CPU kernel runs it
        // is packed (the embedding lookup then reads its rows back from the panels); elsewhere
        // it stays one dense matrix for both, copied onto huge pages. Either happens now,
        // before the layers load, and the original goes at once, so neither adds to the peak.
        let (embed, tied_head) = if cfg.tie_word_embeddings && quantize.is_none() {
            let mut head = Linear::new(embed.embeddings().clone(), None);
            head.pack_for_cpu()?;
            if head.is_packed() {
                drop(embed);
                (TokenTable::OutputLayer, Some(head))
            } else {
                drop(head);
                let table = super::weight_buffer::tensor_on_huge_pages(embed.embeddings())?;
                drop(embed);
                let embed = candle_nn::Embedding::new(table, cfg.hidden_size);
                let head = Linear::new(embed.embeddings().clone(), None);
                (TokenTable::Matrix(embed), Some(head))
            }
        } else {
            (TokenTable::Matrix(embed), None)
        };
        // Quantized layer by layer, so the whole decoder is never held in full precision.
        let mut dense = 0;
        // Without quantization, bf16 weights are packed for the CPU kernel where it runs.
        let mut quantized =
            |linears: &mut [&mut dyn WeightLayer], pack: bool| -> candle_core::Result<()> {
                for linear in linears {
                    match quantize {
                        Some(format) if !linear.quantize(format)? => dense += 1,
                        Some(_) => {}
                        None if pack => linear.pack_for_cpu()?,
                        None => {}
                    }
                }
                Ok(())
            };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut layer = DecoderLayer::load(cfg, model_vb.pp("layers").pp(i))?;
            quantized(&mut layer.linears_mut(), true)?;
            layers.push(layer);
        }
        let norm = RmsNorm::load(cfg.hidden_size, cfg.rms_norm_eps, model_vb.pp("norm"))?;
        let lm_head = if let Some(head) = tied_head {
            head
        } else if cfg.tie_word_embeddings {
            // quantized: the lookup keeps the dense matrix (it only ever reads a few rows)
            let TokenTable::Matrix(embed) = &embed else {
                unreachable!("a quantized model's tied head is built here, from the matrix");
            };
            let mut head = Linear::new(embed.embeddings().clone(), None);
            quantized(&mut [&mut head], false)?;
            head
        } else {
            let mut head = Linear::load(
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                root_vb.pp("lm_head"),
            )?;
            quantized(&mut [&mut head], true)?;
            head
        };
        if let Some(format) = quantize.filter(|_| dense > 0) {
            tracing::warn!(
                "{dense} linear layer(s) stay dense: their rows do not divide into {format} blocks"
            );
        }
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            caches: Vec::new(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Bytes of weights one decode step reads (every linear layer, the embedding row aside).
    pub fn decode_weight_bytes(&mut self) -> usize {
        let layers: usize = self
            .layers
            .iter_mut()
            .flat_map(DecoderLayer::linears_mut)
            .map(|l| l.weight_bytes())
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// Token embeddings (`ids`' shape plus `hidden`) for `ids`.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.embed {
            TokenTable::Matrix(embed) => embed.forward(ids),
            TokenTable::OutputLayer => {
                let hidden = self.cfg.hidden_size;
                let tokens: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let mut rows: Vec<half::bf16> = bytemuck::zeroed_vec(tokens.len() * hidden);
                for (&token, row) in tokens.iter().zip(rows.chunks_exact_mut(hidden)) {
                    if token as usize >= self.cfg.vocab_size {
                        candle_core::bail!(
                            "token id {token} is outside the vocabulary of {} tokens",
                            self.cfg.vocab_size
                        );
                    }
                    self.lm_head.row_bf16(token as usize, row)?;
                }
                let mut dims = ids.dims().to_vec();
                dims.push(hidden);
                Tensor::from_vec(rows, dims, ids.device())
            }
        }
    }

    /// The embedding matrix `(vocab, hidden)`; `None` where a tied output layer holds it packed
    /// for the CPU kernel (look rows up with [`Self::embed`]).
    pub fn embedding_table(&self) -> Option<&Tensor> {
        match &self.embed {
            TokenTable::Matrix(embed) => Some(embed.embeddings()),
            TokenTable::OutputLayer => None,
        }
    }

    /// Keeps the first `len` cached positions and forgets the rest (0 clears the cache; the
    /// buffers are kept for reuse).
    pub fn truncate_cache(&mut self, len: usize) {
        if self.caches.len() != self.layers.len() {
            self.caches = (0..self.layers.len()).map(|_| KvCache::default()).collect();
        }
        for cache in &mut self.caches {
            cache.truncate(len);
        }
    }

    /// Grows every layer's KV cache to hold `positions` (its buffers then stay where they are
    /// until that many are cached).
    #[cfg(feature = "cuda")]
    pub fn reserve_cache(
        &mut self,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<()> {
        if self.caches.len() != self.layers.len() {
            self.truncate_cache(0);
        }
        let heads = (self.cfg.num_key_value_heads, self.cfg.head_dim());
        for cache in &mut self.caches {
            let more = positions.saturating_sub(cache.len());
            cache.reserve(more, heads, dtype, device)?;
        }
        Ok(())
    }

    /// Positions every layer's cache buffers hold room for.
    #[cfg(feature = "cuda")]
    pub fn cache_capacity(&self) -> usize {
        self.caches.iter().map(KvCache::capacity).min().unwrap_or(0)
    }

    /// Counts `s` positions every layer's cache holds after kernels wrote them without the host
    /// (a replayed decode step).
    #[cfg(feature = "cuda")]
    pub fn advance_cache(&mut self, s: usize) -> candle_core::Result<()> {
        for cache in &mut self.caches {
            cache.commit(s)?;
        }
        Ok(())
    }

    /// Number of positions in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    /// Runs `embeds` `(1, len, hidden)` through the decoder after what is cached, appends to the
    /// cache, and returns the logits of the last position `(vocab,)` in f32.
    pub fn forward(&mut self, embeds: &Tensor, rope: &RotaryTables) -> candle_core::Result<Tensor> {
        if embeds.device().is_cuda() {
            // the host only queues kernels: no thread hop (two wake-ups per call)
            return self.forward_in_pool(embeds, rope);
        }
        // on one of rayon's threads: the kernels' parallel loops inside then split work with
        // the other threads instead of blocking and waking this thread on every layer
        rayon::scope(|_| self.forward_in_pool(embeds, rope))
    }

    fn forward_in_pool(
        &mut self,
        embeds: &Tensor,
        rope: &RotaryTables,
    ) -> candle_core::Result<Tensor> {
        if self.caches.len() != self.layers.len() {
            self.truncate_cache(0);
        }
        let device = embeds.device();
        let mut x = embeds.clone();
        // each layer returns its output and the next layer's input norm of it (the final norm
        // after the last layer)
        let first_norm = self.layers.first().map_or(&self.norm, |l| &l.input_norm);
        let mut normed = profile::phase("text.norm", device, || first_norm.forward(&x))?;
        let layers = self.layers.len();
        for (i, (layer, cache)) in self.layers.iter().zip(self.caches.iter_mut()).enumerate() {
            let next_norm = self.layers.get(i + 1).map_or(&self.norm, |l| &l.input_norm);
            let last_only = i + 1 == layers;
            (x, normed) = layer.forward(&x, &normed, rope, cache, (next_norm, last_only))?;
        }
        let len = normed.dim(1)?;
        let last = normed.narrow(1, len - 1, 1)?;
        profile::phase("text.lm_head", device, || {
            self.lm_head
                .forward(&last)?
                .flatten_all()?
                .to_dtype(DType::F32)
        })
    }
}
