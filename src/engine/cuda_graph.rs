//! Decode steps replayed from a CUDA graph. One greedy decode step of the language model — the
//! embedding of the token the last step picked (read on the device), the decoder layers, the
//! output layer and the argmax — is captured once per reply and then replayed for each further
//! token with a single launch, instead of ~300 kernel launches from the host. What changes from
//! step to step lives in fixed device buffers that the captured kernels read when they run: the
//! picked token's argmax key, the KV-cache position (the cache writes and the attention length
//! read it there), and the rotary rows of that position. The KV caches are grown before the
//! capture, so their buffers stay where the graph writes.
//!
//! Opt-in with `VLAD_CUDA_GRAPHS=1` while it has not been measured on a GPU; it replays the
//! pipelined loop's steps, so decoding must be pipelined too (`VLAD_CUDA_PIPELINE=1`). Where the
//! capture fails the engine logs why and decodes step by step.

use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, CudaStream, result, sys};
use candle_core::{Device, Result, Tensor};

use super::cuda_fused::{self, DeviceToken, TokenSlot, buffer_address};
use super::text::{RotaryTables, TextModel};

/// Whether decode steps are captured (`VLAD_CUDA_GRAPHS=1`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VLAD_CUDA_GRAPHS").as_deref() == Ok("1"))
}

/// One captured decode step and the buffers it reads.
pub struct DecodeGraph {
    graph: CudaGraph,
    stream: Arc<CudaStream>,
    /// The picked token's argmax key: the step embeds it first and overwrites it last.
    key: CudaSlice<u64>,
    /// The KV-cache position of the fed token.
    position: CudaSlice<i32>,
    /// The rotary rows `(1, head_dim / 2)` of that position.
    cos: Tensor,
    sin: Tensor,
    /// Positions the caches hold room for: replays stay below.
    capacity: usize,
}

impl DecodeGraph {
    /// Captures the step that feeds a token at the cache's next position, with `rope` that
    /// position's rotary rows as a model (their shape and dtype), after growing the caches to
    /// hold `steps` more positions. Nothing runs yet: [`Self::step`] runs it.
    pub fn capture(
        text: &mut TextModel,
        embedding_table: &Tensor,
        rope: &RotaryTables,
        steps: usize,
    ) -> Result<Self> {
        let Device::Cuda(device) = rope.cos.device() else {
            candle_core::bail!("decode graphs need a CUDA device");
        };
        let stream = device.cuda_stream();
        let start = text.cached_len();
        text.reserve_cache(start + steps, rope.cos.dtype(), rope.cos.device())?;
        let capacity = text.cache_capacity();
        let mut key = stream.alloc_zeros::<u64>(1).w()?;
        let position = stream.alloc_zeros::<i32>(1).w()?;
        let (cos, sin) = (rope.cos.copy()?, rope.sin.copy()?);
        let tables = RotaryTables {
            cos: cos.clone(),
            sin: sin.clone(),
            replay: Some(buffer_address(&position, &stream)),
        };
        let key_address = buffer_address(&key, &stream);
        // everything the step allocates is freed inside it, so the graph can run again
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let captured = (|| -> Result<()> {
            let embed = cuda_fused::embedding_at(key_address, embedding_table)?;
            let logits = text.forward(&embed, &tables)?;
            cuda_fused::argmax_into(&logits, &mut key)
        })();
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        // the capture ran no kernel: the caches hold what they held
        text.truncate_cache(start);
        captured?;
        let Some(graph) = graph.w()? else {
            candle_core::bail!("the decode step's capture gave no graph");
        };
        graph.upload().w()?;
        Ok(Self {
            graph,
            stream,
            key,
            position,
            cos,
            sin,
            capacity,
        })
    }

    /// Whether the caches still hold room for the next step (else capture anew: growing them
    /// moves their buffers).
    pub fn has_room(&self, text: &TextModel) -> bool {
        text.cached_len() < self.capacity
    }

    /// Queues the step feeding `token` at the cache's next position, whose rotary rows are
    /// `rope`; returns the token it picks, on its way back into `slot`.
    pub fn step(
        &mut self,
        text: &mut TextModel,
        token: &DeviceToken,
        rope: &RotaryTables,
        slot: TokenSlot,
    ) -> Result<DeviceToken> {
        let position = text.cached_len();
        if position >= self.capacity {
            candle_core::bail!(
                "decode graph: position {position} past the {} the caches were grown to",
                self.capacity
            );
        }
        let host = [i32::try_from(position)
            .map_err(|_| candle_core::Error::Msg(format!("position {position}")))?];
        self.stream.memcpy_htod(&host[..], &mut self.position).w()?;
        self.cos.slice_set(&rope.cos, 0, 0)?;
        self.sin.slice_set(&rope.sin, 0, 0)?;
        let key = buffer_address(&self.key, &self.stream);
        if token.key_address() != key {
            // SAFETY: both addresses hold one u64 on this stream's device: the token's key (its
            // owner outlives this call) and the graph's own buffer.
            unsafe {
                result::memcpy_dtod_async(key, token.key_address(), 8, self.stream.cu_stream())
            }
            .w()?;
        }
        self.graph.launch().w()?;
        text.advance_cache(1)?;
        DeviceToken::read_back(key, None, &self.stream, slot)
    }
}
