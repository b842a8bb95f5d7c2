//! Fused elementwise steps on CUDA devices in bf16 (the kernels of `fused_ops.cu`, compiled by
//! NVRTC on first use). A decode step is a few hundred small kernels, each launched by the host:
//! the decoder's cut the launches per layer from about 21 to 11 with the bits of the candle ops
//! they replace (see the .cu file), and the greedy token is picked on the device in one pass. The
//! vision tower's fold each layer's bias into the step after it (activation, residual, rotary
//! embedding): one pass over a frame's activations instead of two to four. [`enabled`] says
//! whether they apply to a tensor (CUDA, bf16, kernels built, not switched off with
//! `VLAD_CUDA_FUSED=0`); callers keep candle's ops otherwise.

use std::sync::{Once, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
    result,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use half::bf16;

const SOURCE: &str = include_str!("fused_ops.cu");
const MODULE: &str = "vlad_fused_ops";

use super::cuda_attention::cuda_only;

/// Whether the fused kernels take `x`: a bf16 tensor on a CUDA device, kernels that compile, and
/// `VLAD_CUDA_FUSED` not `0`.
pub fn enabled(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16 && switched_on()
}

fn switched_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("VLAD_CUDA_FUSED").as_deref() == Ok("0") {
            return false;
        }
        match ptx() {
            Ok(_) => true,
            Err(e) => {
                static WARN: Once = Once::new();
                WARN.call_once(|| tracing::warn!("fused CUDA kernels unavailable ({e})"));
                false
            }
        }
    })
}

/// PTX of [`SOURCE`] (bf16 conversions need compute capability 8.0), compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::cuda_attention::compiled_ptx(&PTX, SOURCE, "fused_ops.cu", Some("compute_80"))
}

/// The device address of `x`'s first element (bf16 or f32). The address stays valid while `x`
/// lives; the work that uses it is queued on the device's one stream.
fn address(x: &Tensor) -> Result<u64> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("fused CUDA kernels: a tensor off the CUDA device");
    };
    let stream = cuda.device().cuda_stream();
    let base = match x.dtype() {
        DType::BF16 => cuda.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
        DType::F32 => cuda.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        other => candle_core::bail!("fused CUDA kernels: unsupported dtype {other:?}"),
    };
    Ok(base + (layout.start_offset() * x.dtype().size_in_bytes()) as u64)
}

pub(super) fn int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("{x} {what} do not fit an int")))
}

pub(super) fn blocks(total: usize, per_block: usize) -> Result<u32> {
    u32::try_from(total.div_ceil(per_block).max(1))
        .map_err(|_| candle_core::Error::Msg(format!("{total} elements: too many blocks")))
}

/// A fresh bf16 buffer of `len` elements that the kernel launched next fills completely.
fn alloc_bf16(device: &CudaDevice, len: usize) -> Result<CudaSlice<bf16>> {
    // SAFETY: every caller launches a kernel that writes all `len` elements before anything
    // reads them.
    Ok(unsafe { device.alloc::<bf16>(len)? })
}

/// The q/k/v projection's bias, rotary embeddings of q and k, and the KV cache writes in one
/// launch: `y` `(b, s, (heads + 2·kv_heads)·d)` (the projection without its bias, unit-stride
/// rows), `bias` of that width, `cos`/`sin` `(s, d/2)` bf16; k and v land in rows `pos..pos + s`
/// of `k_cache`/`v_cache` `(1, capacity, kv_heads, d)` (contiguous). Returns q `(b, s, heads, d)`.
/// With `pos_dev` (the device address of an i32) the kernel reads the position there when it
/// runs: a captured decode step (see [`super::cuda_graph`]) then replays at any position.
#[allow(clippy::too_many_arguments)]
pub fn bias_rope_cache(
    y: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    (heads, kv_heads, d): (usize, usize, usize),
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: usize,
    pos_dev: Option<u64>,
) -> Result<Tensor> {
    let (b, s, width) = y.dims3()?;
    let capacity = k_cache.dim(1)?;
    let fits = b == 1
        && width == (heads + 2 * kv_heads) * d
        && d % 2 == 0
        && bias.is_none_or(|b| b.dims() == [width] && b.is_contiguous())
        && cos.dims() == [s, d / 2]
        && sin.dims() == [s, d / 2]
        && cos.is_contiguous()
        && sin.is_contiguous()
        && k_cache.dims() == [1, capacity, kv_heads, d]
        && v_cache.dims() == k_cache.dims()
        && k_cache.is_contiguous()
        && v_cache.is_contiguous()
        && pos + s <= capacity;
    if !fits {
        candle_core::bail!(
            "bias_rope_cache: y {:?}, cos {:?}, caches {:?} at {pos} for {heads}/{kv_heads} heads of {d}",
            y.dims(),
            cos.dims(),
            k_cache.dims()
        );
    }
    let op = BiasRopeCache {
        bias: bias.map(address).transpose()?.unwrap_or(0),
        cos: address(cos)?,
        sin: address(sin)?,
        k_cache: address(k_cache)?,
        v_cache: address(v_cache)?,
        heads,
        kv_heads,
        d,
        pos,
        pos_dev: pos_dev.unwrap_or(0),
    };
    y.apply_op1_no_bwd(&op)
}

struct BiasRopeCache {
    bias: u64,
    cos: u64,
    sin: u64,
    k_cache: u64,
    v_cache: u64,
    heads: usize,
    kv_heads: usize,
    d: usize,
    pos: usize,
    /// Device address of the position, or 0.
    pos_dev: u64,
}

impl CustomOp1 for BiasRopeCache {
    fn name(&self) -> &'static str {
        "cuda-bias-rope-cache"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, y: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (b, s, width) = layout.shape().dims3()?;
        let row = match layout.stride() {
            [_, row, 1] => *row,
            _ => candle_core::bail!("{}: rows of y need unit stride", self.name()),
        };
        let device = y.device().clone();
        let func = device.get_or_load_custom_func("bias_rope_cache_bf16", MODULE, ptx()?)?;
        let q = alloc_bf16(&device, s * self.heads * self.d)?;
        let pairs = s * width / 2;
        let config = LaunchConfig {
            grid_dim: (blocks(pairs, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let start = layout.start_offset();
        let y_view = y
            .as_cuda_slice::<bf16>()?
            .slice(start..start + (s - 1) * row + width);
        let (y_row, pos) = (row as i64, self.pos as i64);
        let (s_arg, heads, kv_heads, d) = (
            int(s, "rows")?,
            int(self.heads, "heads")?,
            int(self.kv_heads, "heads")?,
            int(self.d, "values")?,
        );
        {
            let mut launch = func.builder();
            launch
                .arg(&y_view)
                .arg(&y_row)
                .arg(&self.bias)
                .arg(&self.cos)
                .arg(&self.sin);
            launch.arg(&q).arg(&self.k_cache).arg(&self.v_cache);
            launch
                .arg(&s_arg)
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&d)
                .arg(&pos)
                .arg(&self.pos_dev);
            // SAFETY: y's view covers its s rows; bias, cos, sin and the caches were checked
            // against these dimensions by `bias_rope_cache` and outlive the launch (the caller
            // holds them); q holds s × heads × d values; the arguments follow the kernel's
            // signature.
            unsafe { launch.launch(config) }.w()?;
        }
        let q = CudaStorage::wrap_cuda_slice(q, device);
        Ok((q, Shape::from((b, s, self.heads, self.d))))
    }
}

/// `(x + y, rms_norm(x + y) · w)` for `x`, `y` of the same shape (contiguous, last dimension
/// normalised) and `w` of that last dimension.
pub fn add_rmsnorm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let cols = *x.dims().last().unwrap_or(&0);
    if x.dims() != y.dims() || w.dims() != [cols] || cols == 0 {
        candle_core::bail!(
            "add_rmsnorm: x {:?}, y {:?}, w {:?}",
            x.dims(),
            y.dims(),
            w.dims()
        );
    }
    let (x, y, w) = (x.contiguous()?, y.contiguous()?, w.contiguous()?);
    let op = AddRmsNorm {
        w: address(&w)?,
        eps: eps as f32,
    };
    // both results in one buffer: (2, ..x's shape)
    let both = x.apply_op2_no_bwd(&y, &op)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    w: u64,
    eps: f32,
}

impl CustomOp2 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "cuda-add-rmsnorm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (Some((x0, x1)), Some((y0, y1))) = (xl.contiguous_offsets(), yl.contiguous_offsets())
        else {
            candle_core::bail!("{}: operands must be contiguous", self.name());
        };
        let cols = *xl.dims().last().unwrap_or(&1);
        let len = x1 - x0;
        let rows = len / cols;
        let device = x.device().clone();
        let func = device.get_or_load_custom_func("add_rmsnorm_bf16", MODULE, ptx()?)?;
        let out = alloc_bf16(&device, 2 * len)?;
        let config = LaunchConfig {
            grid_dim: (blocks(rows, 1)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ncols = int(cols, "columns")?;
        {
            let x_view = x.as_cuda_slice::<bf16>()?.slice(x0..x1);
            let y_view = y.as_cuda_slice::<bf16>()?.slice(y0..y1);
            let sums = out.slice(0..len);
            let normed = out.slice(len..2 * len);
            let mut launch = func.builder();
            launch
                .arg(&x_view)
                .arg(&y_view)
                .arg(&self.w)
                .arg(&sums)
                .arg(&normed);
            launch.arg(&ncols).arg(&self.eps);
            // SAFETY: x and y hold rows × cols values, w cols (checked by `add_rmsnorm`, held by
            // the caller); the output holds both results; the arguments follow the kernel's
            // signature.
            unsafe { launch.launch(config) }.w()?;
        }
        let mut dims = vec![2];
        dims.extend_from_slice(xl.dims());
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(dims)))
    }
}

/// `silu(gate) · up` from `gu` `(.., 2·width)` holding gate then up in each row (contiguous).
pub fn silu_mul(gu: &Tensor, width: usize) -> Result<Tensor> {
    if gu.dims().last() != Some(&(2 * width)) || width == 0 {
        candle_core::bail!("silu_mul: {:?} for a width of {width}", gu.dims());
    }
    gu.contiguous()?.apply_op1_no_bwd(&SiluMul { width })
}

struct SiluMul {
    width: usize,
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "cuda-silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, gu: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((o0, o1)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", self.name());
        };
        let total = (o1 - o0) / 2;
        let device = gu.device().clone();
        let func = device.get_or_load_custom_func("silu_mul_bf16", MODULE, ptx()?)?;
        let out = alloc_bf16(&device, total)?;
        let config = LaunchConfig {
            grid_dim: (blocks(total, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (width, total_arg) = (int(self.width, "columns")?, total as i64);
        {
            let view = gu.as_cuda_slice::<bf16>()?.slice(o0..o1);
            let mut launch = func.builder();
            launch.arg(&view).arg(&out).arg(&width).arg(&total_arg);
            // SAFETY: the input holds total × 2 values, the output total; the arguments follow
            // the kernel's signature.
            unsafe { launch.launch(config) }.w()?;
        }
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("checked rank") = self.width;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(dims)))
    }
}

/// The index of the largest value of `logits` (f32, any shape; the first of equal ones), found on
/// the device: one pass and 8 bytes back, instead of copying the whole vocabulary to the host.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    let Device::Cuda(device) = logits.device() else {
        candle_core::bail!("argmax: logits off the CUDA device");
    };
    let key = launch_argmax(logits)?;
    token_of(device.cuda_stream().clone_dtoh(&key).w()?[0])
}

/// Queues the argmax kernel; the result is a packed key in device memory (see `argmax_key` in
/// the .cu file: the ordered value above, the complemented index below; 0 when every logit is
/// NaN).
fn launch_argmax(logits: &Tensor) -> Result<CudaSlice<u64>> {
    let Device::Cuda(device) = logits.device() else {
        candle_core::bail!("argmax: logits off the CUDA device");
    };
    let mut best = device.alloc_zeros::<u64>(1)?;
    argmax_into(logits, &mut best)?;
    Ok(best)
}

/// Queues the argmax of `logits` into `best` (zeroed first, on the stream).
pub(super) fn argmax_into(logits: &Tensor, best: &mut CudaSlice<u64>) -> Result<()> {
    let Device::Cuda(device) = logits.device() else {
        candle_core::bail!("argmax: logits off the CUDA device");
    };
    let logits = logits.flatten_all()?.contiguous()?;
    if logits.dtype() != DType::F32 || logits.elem_count() == 0 {
        candle_core::bail!("argmax: {:?} logits of {:?}", logits.dtype(), logits.dims());
    }
    let n = logits.elem_count();
    let func = device.get_or_load_custom_func("argmax_f32", MODULE, ptx()?)?;
    device.cuda_stream().memset_zeros(best).w()?;
    let view_address = address(&logits)?;
    let config = LaunchConfig {
        grid_dim: (blocks(n, 256)?.min(264), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_arg = n as i64;
    let mut launch = func.builder();
    launch.arg(&view_address).arg(&n_arg).arg(&*best);
    // SAFETY: the logits hold n contiguous f32 values; their memory is released, if at all,
    // by a free queued behind this kernel on the same stream. `best` is one zeroed u64.
    unsafe { launch.launch(config) }.w()?;
    Ok(())
}

/// The token of a packed argmax key.
fn token_of(key: u64) -> Result<u32> {
    if key == 0 {
        candle_core::bail!("argmax: every logit is NaN");
    }
    Ok(!(key as u32))
}

/// Pinned host memory for one token coming back from the device (see [`argmax_start`]), and the
/// event that marks the copy's end.
pub struct TokenSlot {
    host: PinnedHostSlice<u64>,
    copied: CudaEvent,
}

impl TokenSlot {
    pub fn new(device: &Device) -> Result<Self> {
        let Device::Cuda(device) = device else {
            candle_core::bail!("token slot: not a CUDA device");
        };
        let context = device.cuda_stream().context().clone();
        // SAFETY: the slot is only read after a copy into it has completed (`DeviceToken::wait`).
        let host = unsafe { context.alloc_pinned_with_flags::<u64>(1, 0) }.w()?;
        // cudarc records the pinned slice's own event only with several streams: this one is
        // recorded after every copy
        let copied = context.new_event(None).w()?;
        Ok(Self { host, copied })
    }
}

/// A greedy token still on the device: the address of its argmax key, which the next step's
/// embedding reads there, and a copy of the key on its way to pinned host memory. Work queued
/// after it does not delay [`DeviceToken::wait`], so the host can queue the next step before it
/// knows the token.
pub struct DeviceToken {
    key: u64,
    /// The key's memory, unless it lives in a buffer of its producer's (a captured decode step's).
    _owned: Option<CudaSlice<u64>>,
    slot: TokenSlot,
}

/// Queues the argmax of `logits` (f32) and the copy of its result into `slot`, without waiting.
pub fn argmax_start(logits: &Tensor, slot: TokenSlot) -> Result<DeviceToken> {
    let key = launch_argmax(logits)?;
    let stream = key.stream().clone();
    DeviceToken::read_back(buffer_address(&key, &stream), Some(key), &stream, slot)
}

/// The device address of a buffer's first element.
pub(super) fn buffer_address<T>(buffer: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    buffer.device_ptr(stream).0
}

impl DeviceToken {
    /// Queues the copy of the argmax key at `key` into `slot`; `owned` is the key's memory
    /// where the token keeps it (else the caller's buffer holds it).
    pub(super) fn read_back(
        key: u64,
        owned: Option<CudaSlice<u64>>,
        stream: &CudaStream,
        mut slot: TokenSlot,
    ) -> Result<Self> {
        // SAFETY: `key` is a live u64 on this stream's device (owned here, or the caller's
        // buffer, freed if at all behind this copy); the slot's host memory holds one u64 and
        // stays allocated until the copy is done (`wait` synchronises on the event recorded
        // below before the slot can be dropped or reused). Into pinned memory the copy is
        // asynchronous.
        unsafe {
            result::memcpy_dtoh_async(
                std::slice::from_raw_parts_mut(slot.host.as_mut_ptr().w()?, 1),
                key,
                stream.cu_stream(),
            )
        }
        .w()?;
        slot.copied.record(stream).w()?;
        Ok(Self {
            key,
            _owned: owned,
            slot,
        })
    }

    /// The device address of the argmax key.
    pub(super) fn key_address(&self) -> u64 {
        self.key
    }

    /// Waits for this token's copy only, not for the work queued after it; gives the slot back
    /// for the next token.
    pub fn wait(self) -> Result<(u32, TokenSlot)> {
        self.slot.copied.synchronize().w()?;
        let key = self.slot.host.as_slice().w()?[0];
        Ok((token_of(key)?, self.slot))
    }

    /// The token's row of the embedding table `(vocab, hidden)` (bf16, contiguous) as
    /// `(1, 1, hidden)`, read on the device. An unusable key (every logit NaN) reads row 0; the
    /// host learns of it from [`DeviceToken::wait`].
    pub fn embedding(&self, table: &Tensor) -> Result<Tensor> {
        embedding_at(self.key, table)
    }
}

/// Row `key`'s token of the embedding table `(vocab, hidden)` as `(1, 1, hidden)`, with `key`
/// the device address of an argmax key.
pub(super) fn embedding_at(key: u64, table: &Tensor) -> Result<Tensor> {
    let (_, hidden) = table.dims2()?;
    table
        .contiguous()?
        .apply_op1_no_bwd(&EmbedKey { key })?
        .reshape((1, 1, hidden))
}

struct EmbedKey {
    /// Device address of the packed argmax key.
    key: u64,
}

impl CustomOp1 for EmbedKey {
    fn name(&self) -> &'static str {
        "cuda-embed-key"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, table: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (Some((o0, o1)), [vocab, hidden]) = (layout.contiguous_offsets(), layout.dims()) else {
            candle_core::bail!(
                "{}: the table must be contiguous (vocab, hidden)",
                self.name()
            );
        };
        if table.dtype() != DType::BF16 {
            candle_core::bail!("{}: {:?} table, bf16 expected", self.name(), table.dtype());
        }
        let device = table.device().clone();
        let func = device.get_or_load_custom_func("embed_key_bf16", MODULE, ptx()?)?;
        let out = alloc_bf16(&device, *hidden)?;
        let config = LaunchConfig {
            grid_dim: (blocks(*hidden, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (vocab, hidden_arg) = (int(*vocab, "table rows")?, int(*hidden, "columns")?);
        {
            let view = table.as_cuda_slice::<bf16>()?.slice(o0..o1);
            let mut launch = func.builder();
            launch
                .arg(&self.key)
                .arg(&view)
                .arg(&vocab)
                .arg(&hidden_arg)
                .arg(&out);
            // SAFETY: `key` is a live u64 on this stream's device (its `DeviceToken` outlives the
            // launch and frees it, if at all, behind it); the table holds vocab × hidden values,
            // the output hidden.
            unsafe { launch.launch(config) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(vec![*hidden]),
        ))
    }
}

/// `quick_gelu(y + bias)` (`h · sigmoid(1.702 · h)`) of a linear layer's output `y` (unit-stride
/// rows) in one pass.
pub fn bias_quick_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    rows_op(y, bias, None, "bias_quick_gelu_bf16")
}

/// `residual + (y + bias)` in one pass, `residual` of `y`'s shape.
pub fn bias_residual(y: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    if residual.dims() != y.dims() {
        candle_core::bail!(
            "residual of shape {:?} for a layer output of shape {:?}",
            residual.dims(),
            y.dims()
        );
    }
    rows_op(y, bias, Some(&residual.contiguous()?), "bias_residual_bf16")
}

/// The elementwise kernels over rows of `y` with an optional bias and residual.
fn rows_op(
    y: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    kernel: &'static str,
) -> Result<Tensor> {
    let cols = *y.dims().last().unwrap_or(&0);
    if cols == 0 || bias.is_some_and(|b| b.dims() != [cols]) {
        candle_core::bail!(
            "{kernel}: y {:?} with bias {:?}",
            y.dims(),
            bias.map(|b| b.dims())
        );
    }
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let op = RowsOp {
        bias: bias.as_ref().map(address).transpose()?.unwrap_or(0),
        residual: residual.map(address).transpose()?.unwrap_or(0),
        kernel,
    };
    // `bias` (and the caller's residual) live until the kernel has been queued
    y.apply_op1_no_bwd(&op)
}

struct RowsOp {
    bias: u64,
    residual: u64,
    kernel: &'static str,
}

/// The row stride of a layout whose rows have unit stride (any leading dimensions flattened).
fn rows_stride(layout: &Layout) -> Option<usize> {
    let dims = layout.dims();
    let strides = layout.stride();
    let cols = *dims.last()?;
    if *strides.last()? != 1 && cols > 1 {
        return None;
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    if rows <= 1 {
        return Some(cols);
    }
    // the leading dimensions must flatten to one stride
    let mut expected = strides[dims.len().checked_sub(2)?];
    for k in (0..dims.len() - 1).rev() {
        if dims[k] > 1 && strides[k] != expected {
            return None;
        }
        expected = strides[k] * dims[k];
    }
    Some(strides[dims.len() - 2])
}

impl CustomOp1 for RowsOp {
    fn name(&self) -> &'static str {
        self.kernel
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, y: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some(row) = rows_stride(layout) else {
            candle_core::bail!("{}: rows of y need unit stride", self.name());
        };
        let cols = *layout.dims().last().unwrap_or(&1);
        let total = layout.shape().elem_count();
        let rows = total / cols;
        let device = y.device().clone();
        let func = device.get_or_load_custom_func(self.kernel, MODULE, ptx()?)?;
        let out = alloc_bf16(&device, total)?;
        let config = LaunchConfig {
            grid_dim: (blocks(total, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (y_row, cols_arg, total_arg) = (row as i64, int(cols, "columns")?, total as i64);
        let start = layout.start_offset();
        {
            let view = y
                .as_cuda_slice::<bf16>()?
                .slice(start..start + (rows - 1) * row + cols);
            let mut launch = func.builder();
            launch.arg(&view).arg(&y_row).arg(&self.bias);
            if self.residual != 0 {
                launch.arg(&self.residual);
            }
            launch.arg(&out).arg(&cols_arg).arg(&total_arg);
            // SAFETY: y's view covers its rows; bias (cols values) and residual (total values,
            // contiguous) were checked by the callers and outlive the launch; the output holds
            // total values; the arguments follow the kernel's signature.
            unsafe { launch.launch(config) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            layout.shape().clone(),
        ))
    }
}

/// The vision tower's q, k, v from its stacked projection `y` `(n, 3·heads·d)` (without its
/// bias): the bias added, q and k rotated with the f32 tables `cos`/`sin` `(n, d/2)`, each
/// `(n, heads, d)` contiguous.
pub fn vision_qkv_rope(
    y: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    d: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, width) = y.dims2()?;
    let fits = width == 3 * heads * d
        && d.is_multiple_of(2)
        && bias.is_none_or(|b| b.dims() == [width])
        && cos.dims() == [n, d / 2]
        && sin.dims() == [n, d / 2]
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32;
    if !fits {
        candle_core::bail!(
            "vision_qkv_rope: y {:?}, cos {:?} {:?} for {heads} heads of {d}",
            y.dims(),
            cos.dims(),
            cos.dtype()
        );
    }
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let op = VisionQkvRope {
        bias: bias.as_ref().map(address).transpose()?.unwrap_or(0),
        cos: address(&cos)?,
        sin: address(&sin)?,
        heads,
        d,
    };
    let qkv = y.apply_op1_no_bwd(&op)?;
    Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
}

struct VisionQkvRope {
    bias: u64,
    cos: u64,
    sin: u64,
    heads: usize,
    d: usize,
}

impl CustomOp1 for VisionQkvRope {
    fn name(&self) -> &'static str {
        "cuda-vision-qkv-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, y: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, width) = layout.shape().dims2()?;
        let Some(row) = rows_stride(layout) else {
            candle_core::bail!("{}: rows of y need unit stride", self.name());
        };
        let device = y.device().clone();
        let func = device.get_or_load_custom_func("vision_qkv_rope_bf16", MODULE, ptx()?)?;
        let out = alloc_bf16(&device, n * width)?;
        let config = LaunchConfig {
            grid_dim: (blocks(n * width / 2, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (y_row, n_arg, heads, d) = (
            row as i64,
            int(n, "rows")?,
            int(self.heads, "heads")?,
            int(self.d, "values")?,
        );
        let start = layout.start_offset();
        {
            let view = y
                .as_cuda_slice::<bf16>()?
                .slice(start..start + (n - 1) * row + width);
            let mut launch = func.builder();
            launch
                .arg(&view)
                .arg(&y_row)
                .arg(&self.bias)
                .arg(&self.cos)
                .arg(&self.sin);
            launch.arg(&out).arg(&n_arg).arg(&heads).arg(&d);
            // SAFETY: y's view covers its n rows; bias and the tables were checked against these
            // dimensions by `vision_qkv_rope` and outlive the launch; the output holds
            // 3 × n × heads × d values; the arguments follow the kernel's signature.
            unsafe { launch.launch(config) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((3, n, self.heads, self.d)),
        ))
    }
}

/// Whether `x` is one row of unit-stride values on a 16-byte boundary with a multiple of 8
/// values, as the one-row kernels read it.
fn one_aligned_row(x: &Tensor) -> bool {
    let k = *x.dims().last().unwrap_or(&0);
    x.elem_count() == k
        && k.is_multiple_of(8)
        && x.is_contiguous()
        && x.layout().start_offset().is_multiple_of(8)
}

/// `x · Wᵀ` for one row `x` `(.., k)` and `w` `(n, k)` bf16 (one decode token), without cuBLAS:
/// `None` where the kernel does not apply (several rows, another dtype, unaligned rows).
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Ok((n, _)) = w.dims2() else {
        return Ok(None);
    };
    one_row_product(
        x,
        w,
        Gemv {
            rows: n,
            gated: false,
        },
    )
}

/// `silu(x · Gᵀ) · (x · Uᵀ)` for one row `x` and the stacked `[G; U]` `w` `(2·width, k)`, with the
/// bits of [`gemv`] followed by [`silu_mul`]; `None` where the kernel does not apply.
pub fn gemv_silu(x: &Tensor, w: &Tensor, width: usize) -> Result<Option<Tensor>> {
    if !matches!(w.dims2(), Ok((rows, _)) if rows == 2 * width) {
        return Ok(None);
    }
    one_row_product(
        x,
        w,
        Gemv {
            rows: width,
            gated: true,
        },
    )
}

/// `op` on one row `x` `(.., k)` and `w` `(_, k)`, the result `(.., op.rows)`; `None` where the
/// one-row kernels do not apply.
fn one_row_product(x: &Tensor, w: &Tensor, op: Gemv) -> Result<Option<Tensor>> {
    let k = *w.dims().last().unwrap_or(&0);
    if !enabled(x)
        || !one_aligned_row(x)
        || x.elem_count() != k
        || w.dtype() != DType::BF16
        || !w.is_contiguous()
        || !w.layout().start_offset().is_multiple_of(8)
    {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("one row has a last dimension") = op.rows;
    x.apply_op2_no_bwd(w, &op)?.reshape(dims).map(Some)
}

struct Gemv {
    /// Output values.
    rows: usize,
    /// The gated form: `rows` gate rows of the weight, then as many up rows.
    gated: bool,
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "cuda-gemv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (w_rows, k) = wl.shape().dims2()?;
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("{}: operands must be contiguous", self.name());
        };
        if x1 - x0 != k || w1 - w0 != w_rows * k {
            candle_core::bail!("{}: x {:?} for w {:?}", self.name(), xl.dims(), wl.dims());
        }
        let device = x.device().clone();
        let kernel = if self.gated {
            "gemv_silu_bf16"
        } else {
            "gemv_bf16"
        };
        let func = device.get_or_load_custom_func(kernel, MODULE, ptx()?)?;
        let out = alloc_bf16(&device, self.rows)?;
        let config = LaunchConfig {
            grid_dim: (blocks(self.rows, 8)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, k_arg) = (int(self.rows, "rows")?, int(k, "columns")?);
        {
            let x_view = x.as_cuda_slice::<bf16>()?.slice(x0..x1);
            let w_view = w.as_cuda_slice::<bf16>()?.slice(w0..w1);
            let mut launch = func.builder();
            launch
                .arg(&w_view)
                .arg(&x_view)
                .arg(&out)
                .arg(&rows)
                .arg(&k_arg);
            // SAFETY: w holds the rows the kernel reads (rows, or 2 × rows for the gated form)
            // of k values, x one row of k, out `rows` values; both inputs start on 16-byte
            // boundaries with k a multiple of 8 (checked by the callers).
            unsafe { launch.launch(config) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(self.rows),
        ))
    }
}

/// Attention of one query per head (a decode step) over every cached key: `q` `(1, heads, d)`,
/// `k`/`v` `(T, kv_heads, d)` with unit-stride rows, all bf16. Split over the keys in blocks of
/// 128 and merged, two launches instead of two cuBLAS products and a softmax. `None` where it does
/// not apply.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    decode_attention_at(q, k, v, scale, None)
}

/// [`decode_attention`] over the keys before a position the device holds: `replay` is the
/// address of an i32 with the new key's position; `k` and `v` are the whole cache buffers
/// `(capacity, kv_heads, d)`, and the kernels read only the first `position + 1` rows (a decode
/// step captured in a CUDA graph, see [`super::cuda_graph`]).
pub fn decode_attention_at(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    replay: Option<u64>,
) -> Result<Option<Tensor>> {
    let (s, heads, d) = q.dims3()?;
    let (t, kv_heads, _) = k.dims3()?;
    let row = super::cuda_attention::row_stride(k.layout());
    let applies = enabled(q)
        && s == 1
        && t > 0
        && d <= 128
        && d % 8 == 0
        && q.is_contiguous()
        && k.dtype() == DType::BF16
        && v.dtype() == DType::BF16
        && row.is_some_and(|r| r % 8 == 0)
        && row == super::cuda_attention::row_stride(v.layout())
        && k.layout().start_offset().is_multiple_of(8)
        && v.layout().start_offset().is_multiple_of(8);
    if !applies {
        return Ok(None);
    }
    let kv_row = row.expect("checked") as i64;
    let Device::Cuda(device) = q.device() else {
        return Ok(None);
    };
    let splits = t.div_ceil(128);
    // SAFETY: every (head, split) block writes all d + 2 values of its share before the
    // combining kernel reads them.
    let partial = unsafe { device.alloc::<f32>(heads * splits * (d + 2))? };
    let out = alloc_bf16(device, heads * d)?;
    let split_fn = device.get_or_load_custom_func("decode_attention_split_bf16", MODULE, ptx()?)?;
    let combine_fn =
        device.get_or_load_custom_func("decode_attention_combine_bf16", MODULE, ptx()?)?;
    let (t_arg, rep, d_arg) = (
        int(t, "keys")?,
        int(heads / kv_heads, "heads")?,
        int(d, "values")?,
    );
    let splits_arg = int(splits, "splits")?;
    let scale = scale as f32;
    let pos_dev = replay.unwrap_or(0);
    let (q_at, k_at, v_at) = (address(q)?, address(k)?, address(v)?);
    {
        let mut launch = split_fn.builder();
        launch.arg(&q_at).arg(&k_at).arg(&v_at).arg(&partial);
        launch
            .arg(&t_arg)
            .arg(&rep)
            .arg(&d_arg)
            .arg(&kv_row)
            .arg(&scale)
            .arg(&pos_dev);
        let config = LaunchConfig {
            grid_dim: (int(heads, "heads")? as u32, splits_arg as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q holds heads × d values, k and v T rows of the stride checked above with
        // kv_heads × d values each; `partial` holds (d + 2) values per head and split; q, k, v
        // outlive the launches (the caller holds them).
        unsafe { launch.launch(config) }.w()?;
    }
    {
        let mut launch = combine_fn.builder();
        launch
            .arg(&partial)
            .arg(&out)
            .arg(&splits_arg)
            .arg(&d_arg)
            .arg(&pos_dev);
        let config = LaunchConfig {
            grid_dim: (int(heads, "heads")? as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `partial` as written above, `out` heads × d values.
        unsafe { launch.launch(config) }.w()?;
    }
    let out = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device.clone())),
        (1, heads, d),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(x: &Tensor) -> Vec<u16> {
        x.flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap()
            .into_iter()
            .map(|v| v.to_bits())
            .collect()
    }

    fn random(shape: &[usize], device: &Device) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, device)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// Each fused kernel against separate bf16 ops on the GPU: the same bits (the norm's sum of
    /// squares is added up in another order, so its output may differ by one bf16 step).
    /// Needs a CUDA device; says so and passes without one.
    #[test]
    fn fused_decoder_kernels_give_the_bits_of_candles_ops_on_the_gpu() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: fused decoder kernels not checked");
            return;
        };
        // q/k/v bias, rotary embeddings and the KV cache writes
        for (s, heads, kv_heads, d, at) in
            [(5, 4, 2, 16, 3), (1, 12, 2, 128, 40), (33, 6, 6, 64, 0)]
        {
            let width = (heads + 2 * kv_heads) * d;
            let y = random(&[1, s, width], &device);
            let bias = random(&[width], &device);
            let cos = random(&[s, d / 2], &device);
            let sin = random(&[s, d / 2], &device);
            let capacity = at + s + 7;
            let k_cache = Tensor::zeros((1, capacity, kv_heads, d), DType::BF16, &device).unwrap();
            let v_cache = k_cache.zeros_like().unwrap();
            let q = bias_rope_cache(
                &y,
                Some(&bias),
                &cos,
                &sin,
                (heads, kv_heads, d),
                &k_cache,
                &v_cache,
                at,
                None,
            )
            .unwrap();
            let full = y.broadcast_add(&bias).unwrap();
            let part = |start: usize, n: usize| {
                full.narrow(2, start * d, n * d)
                    .unwrap()
                    .reshape((1, s, n, d))
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            // the reference's order: every product and sum its own bf16 op (candle's rope_thd
            // kernel contracts one product into a multiply-add, a step off now and then)
            let rotate = |x: &Tensor| {
                let half = d / 2;
                let (x1, x2) = (
                    x.narrow(3, 0, half).unwrap(),
                    x.narrow(3, half, half).unwrap(),
                );
                let c = cos.reshape((1, s, 1, half)).unwrap();
                let n = sin.reshape((1, s, 1, half)).unwrap();
                let mul = |a: &Tensor, b: &Tensor| a.broadcast_mul(b).unwrap();
                let r1 = (mul(&x1, &c) - mul(&x2, &n)).unwrap();
                let r2 = (mul(&x1, &n) + mul(&x2, &c)).unwrap();
                Tensor::cat(&[r1, r2], 3).unwrap()
            };
            let want_q = rotate(&part(0, heads));
            let want_k = rotate(&part(heads, kv_heads));
            let want_v = part(heads + kv_heads, kv_heads);
            assert_eq!(bits(&q), bits(&want_q), "q, s={s} d={d}");
            assert_eq!(
                bits(&k_cache.narrow(1, at, s).unwrap()),
                bits(&want_k),
                "k, s={s} d={d}"
            );
            assert_eq!(
                bits(&v_cache.narrow(1, at, s).unwrap()),
                bits(&want_v),
                "v, s={s} d={d}"
            );
            // rows outside the written range stay as they were
            let before = k_cache.narrow(1, 0, at).unwrap();
            assert!(
                bits(&before).iter().all(|&b| b == 0),
                "k rows before {at} touched"
            );
        }

        // residual sum and RMS norm
        for (rows, cols) in [(1, 1536), (7, 96), (3, 3584)] {
            let x = random(&[1, rows, cols], &device);
            let y = random(&[1, rows, cols], &device);
            let w = random(&[cols], &device);
            let (sum, normed) = add_rmsnorm(&x, &y, &w, 1e-6).unwrap();
            let want_sum = (&x + &y).unwrap();
            assert_eq!(bits(&sum), bits(&want_sum), "sum {rows}x{cols}");
            let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-6).unwrap();
            let (got, want) = (bits(&normed), bits(&want));
            let off = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap_or(0);
            assert!(off <= 1, "norm {rows}x{cols}: {off} bf16 steps off");
        }

        // silu(gate) · up
        let gu = random(&[1, 3, 2 * 200], &device);
        let got = silu_mul(&gu, 200).unwrap();
        let gate = gu.narrow(2, 0, 200).unwrap();
        let up = gu.narrow(2, 200, 200).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        assert_eq!(bits(&got), bits(&want), "silu_mul");

        // argmax, the first of equal values winning, over a vocabulary-sized row
        let mut values: Vec<f32> = (0..151_936)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
            .collect();
        values[100_000] = 42.0;
        values[120_000] = 42.0;
        values[5] = f32::NAN;
        let logits = Tensor::from_vec(values, 151_936, &device).unwrap();
        assert_eq!(argmax(&logits).unwrap(), 100_000);
        let negative = Tensor::from_vec(vec![-3.0f32, -1.0, -2.0, -1.0], 4, &device).unwrap();
        assert_eq!(argmax(&negative).unwrap(), 1);
    }

    fn values(x: &Tensor) -> Vec<f64> {
        x.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The one-row kernels of a decode step on the GPU: the product against cuBLAS (f32 sums in
    /// another order: within a bf16 step of the largest output), the gated product with the bits
    /// of the product followed by `silu_mul`, and the split decode attention against f64 sums.
    #[test]
    fn decode_kernels_match_cublas_and_exact_sums_on_the_gpu() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: decode kernels not checked");
            return;
        };
        let x = random(&[1, 1, 1536], &device);
        let w = random(&[600, 1536], &device);
        let got = gemv(&x, &w).unwrap().expect("gemv applies to one bf16 row");
        assert_eq!(got.dims(), [1, 1, 600]);
        let want = x
            .reshape((1, 1536))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap();
        let (g, w_) = (values(&got), values(&want));
        let largest = w_.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = g
            .iter()
            .zip(&w_)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= largest / 128.0,
            "gemv: {worst} off (largest {largest})"
        );

        let gated = gemv_silu(&x, &w, 300).unwrap().expect("gemv_silu applies");
        let both = gemv(&x, &w).unwrap().unwrap();
        assert_eq!(
            bits(&gated),
            bits(&silu_mul(&both, 300).unwrap()),
            "gemv_silu"
        );

        for (t, heads, kv_heads, d) in [(1, 4, 2, 16), (300, 12, 2, 128), (129, 16, 16, 80)] {
            let q = random(&[1, heads, d], &device);
            // keys and values as a prefix of a larger cache
            let k = random(&[t + 5, kv_heads, d], &device)
                .narrow(0, 0, t)
                .unwrap();
            let v = random(&[t + 5, kv_heads, d], &device)
                .narrow(0, 0, t)
                .unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let got = decode_attention(&q, &k, &v, scale)
                .unwrap()
                .expect("applies");
            let want = super::super::cuda_flash::tests::reference(&q, &k, &v, scale, None);
            for (g, w) in values(&got).iter().zip(&want) {
                let err = (g - w).abs();
                assert!(err <= 0.01 * (0.1 + w.abs()), "t={t} d={d}: {g} for {w}");
            }
        }
    }

    /// A captured decode step's kernels read the position on the device: the same bits as with
    /// the position from the host, and keys past it in the cache buffers are never read.
    #[test]
    fn device_held_positions_give_the_bits_of_host_ones_on_the_gpu() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: device-held positions not checked");
            return;
        };
        let Device::Cuda(cuda) = &device else {
            unreachable!()
        };
        let stream = cuda.cuda_stream();
        let (heads, kv_heads, d, capacity) = (12, 2, 128, 700);
        for at in [0, 127, 128, 299, 699] {
            let held = stream.clone_htod(&[at as i32]).unwrap();
            let held_at = held.device_ptr(&stream).0;
            let width = (heads + 2 * kv_heads) * d;
            let y = random(&[1, 1, width], &device);
            let bias = random(&[width], &device);
            let (cos, sin) = (random(&[1, d / 2], &device), random(&[1, d / 2], &device));
            // caches full of other values: what is past the position must not count
            let (k1, v1) = (
                random(&[1, capacity, kv_heads, d], &device),
                random(&[1, capacity, kv_heads, d], &device),
            );
            let (k2, v2) = (k1.copy().unwrap(), v1.copy().unwrap());
            let write = |k: &Tensor, v: &Tensor, held: Option<u64>| {
                let pos = if held.is_some() { 0 } else { at };
                bias_rope_cache(
                    &y,
                    Some(&bias),
                    &cos,
                    &sin,
                    (heads, kv_heads, d),
                    k,
                    v,
                    pos,
                    held,
                )
                .unwrap()
            };
            let q1 = write(&k1, &v1, None);
            let q2 = write(&k2, &v2, Some(held_at));
            assert_eq!(bits(&q1), bits(&q2), "q at {at}");
            assert_eq!(bits(&k1), bits(&k2), "keys at {at}");
            assert_eq!(bits(&v1), bits(&v2), "values at {at}");

            let q = q1.squeeze(0).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let (ks, vs) = (k1.squeeze(0).unwrap(), v1.squeeze(0).unwrap());
            let seen = |x: &Tensor| x.narrow(0, 0, at + 1).unwrap();
            let host = decode_attention(&q, &seen(&ks), &seen(&vs), scale)
                .unwrap()
                .expect("applies");
            let held_out = decode_attention_at(&q, &ks, &vs, scale, Some(held_at))
                .unwrap()
                .expect("applies");
            assert_eq!(bits(&host), bits(&held_out), "attention at {at}");
        }
    }

    /// Largest distance in bf16 steps between two bf16 tensors of one shape.
    fn steps_apart(a: &Tensor, b: &Tensor) -> i32 {
        assert_eq!(a.dims(), b.dims());
        bits(a)
            .iter()
            .zip(bits(b))
            .map(|(&x, y)| (x as i16 as i32 - y as i16 as i32).abs())
            .max()
            .unwrap_or(0)
    }

    /// The vision tower's kernels against candle's ops on the GPU: the residual sum with the
    /// same bits; the activation and the rotation (f32 inside, rounded once) within one bf16
    /// step. Inputs include rows read in place from a wider tensor. Needs a CUDA device.
    #[test]
    fn fused_vision_kernels_match_candles_ops_on_the_gpu() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: fused vision kernels not checked");
            return;
        };
        let wide = random(&[37, 300], &device);
        let y = wide.narrow(1, 20, 256).unwrap();
        let bias = random(&[256], &device);
        let h = y.broadcast_add(&bias).unwrap();
        let f = h.to_dtype(DType::F32).unwrap();
        let want = (&f * candle_nn::ops::sigmoid(&(&f * 1.702).unwrap()).unwrap())
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let got = bias_quick_gelu(&y, Some(&bias)).unwrap();
        assert!(steps_apart(&got, &want) <= 1, "quick gelu");

        let residual = random(&[37, 256], &device);
        let got = bias_residual(&y, Some(&bias), &residual).unwrap();
        assert_eq!(
            bits(&got),
            bits(&(&residual + &h).unwrap()),
            "bias + residual"
        );
        let got = bias_residual(&y, None, &residual).unwrap();
        assert_eq!(bits(&got), bits(&(&residual + &y).unwrap()), "residual");

        let (n, heads, d) = (29, 3, 16);
        let y = random(&[n, 3 * heads * d], &device);
        let bias = random(&[3 * heads * d], &device);
        let freqs = Tensor::randn(0f32, 3.0, (n, d / 2), &device).unwrap();
        let (cos, sin) = (freqs.cos().unwrap(), freqs.sin().unwrap());
        let (q, k, v) = vision_qkv_rope(&y, Some(&bias), &cos, &sin, heads, d).unwrap();
        let full = y
            .broadcast_add(&bias)
            .unwrap()
            .reshape((n, 3, heads, d))
            .unwrap();
        let rotate = |part: usize| {
            let t = full.narrow(1, part, 1).unwrap().squeeze(1).unwrap();
            let t = t
                .to_dtype(DType::F32)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .contiguous()
                .unwrap();
            candle_nn::rotary_emb::rope_thd(&t, &cos, &sin)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        assert!(steps_apart(&q, &rotate(0)) <= 1, "q");
        assert!(steps_apart(&k, &rotate(1)) <= 1, "k");
        let want_v = full.narrow(1, 2, 1).unwrap().squeeze(1).unwrap();
        assert_eq!(bits(&v), bits(&want_v), "v");
    }
}
