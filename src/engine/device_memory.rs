//! Peak GPU memory of the engine. On CUDA, candle allocates from the device's default
//! stream-ordered memory pool (`cuMemAllocAsync`), whose high-water mark is the peak the engine
//! held — the counterpart of torch's `max_memory_allocated`. Elsewhere there is nothing to report.

use candle_core::Device;

/// Bytes held at most since the last [`reset_peak`] (`None` off CUDA or when the driver does not
/// say).
pub fn peak_bytes(device: &Device) -> Option<u64> {
    imp::peak_bytes(device)
}

/// Starts a new peak measurement at the memory held now.
pub fn reset_peak(device: &Device) {
    imp::reset_peak(device)
}

/// Lets the device's memory pool keep freed memory for the next allocations instead of handing
/// it back to the driver at every synchronisation (the pool's default; a decode step synchronises
/// once per token), as PyTorch's caching allocator does. A no-op off CUDA.
pub fn keep_freed_memory(device: &Device) {
    imp::keep_freed_memory(device)
}

/// Stops creating two CUDA events with every device buffer. cudarc uses them to order a buffer's
/// uses across streams, and only once a context has several streams; candle's device works on
/// one (so they are never recorded), but each allocation and free still created and destroyed
/// them: four driver calls per buffer, hundreds of buffers per decoded token. A no-op off CUDA.
pub fn skip_buffer_events(device: &Device) {
    imp::skip_buffer_events(device)
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::sys;

    fn default_pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(cuda) = device else {
            return None;
        };
        let dev = cuda.cuda_stream().context().cu_device();
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to one pool handle.
        let status = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, dev) };
        (status == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    pub fn peak_bytes(device: &Device) -> Option<u64> {
        let pool = default_pool(device)?;
        let mut value: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
        let status = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut value as *mut u64).cast(),
            )
        };
        (status == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }

    fn set(device: &Device, attribute: sys::CUmemPool_attribute, mut value: u64) {
        let Some(pool) = default_pool(device) else {
            return;
        };
        // SAFETY: both attributes set here are cuuint64_t values.
        let status =
            unsafe { sys::cuMemPoolSetAttribute(pool, attribute, (&mut value as *mut u64).cast()) };
        if status != sys::CUresult::CUDA_SUCCESS {
            tracing::debug!(?attribute, ?status, "memory pool attribute not set");
        }
    }

    /// Setting USED_MEM_HIGH to 0 resets it to the memory in use (driver API contract).
    pub fn reset_peak(device: &Device) {
        set(
            device,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        );
    }

    pub fn skip_buffer_events(device: &Device) {
        if let Device::Cuda(cuda) = device {
            // SAFETY: the engine queues all its work on the device's one stream, where the
            // events would never be recorded or waited on (cudarc only does so once a context
            // has several streams); without tracking, cudarc leaves ordering across streams to
            // the caller, and there are none.
            unsafe { cuda.disable_event_tracking() }
        }
    }

    pub fn keep_freed_memory(device: &Device) {
        set(
            device,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        );
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    pub fn peak_bytes(_device: &Device) -> Option<u64> {
        None
    }

    pub fn reset_peak(_device: &Device) {}

    pub fn keep_freed_memory(_device: &Device) {}

    pub fn skip_buffer_events(_device: &Device) {}
}
