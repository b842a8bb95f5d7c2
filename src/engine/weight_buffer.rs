//! Memory for the engine's own weight layouts (packed bf16 panels, Q8_0 rows) on transparent
//! huge pages where the OS offers them.
//!
//! Decoding streams every weight once per token, and with 4 KiB pages that costs one TLB miss
//! every 4 KiB — in a virtual machine a two-level page walk each. A fresh anonymous mapping
//! advised `MADV_HUGEPAGE` before its first write is backed by 2 MiB pages instead (its 2 MiB
//! aligned interior; the edges stay small pages, so nothing is wasted): on the 2-core Zen 4 the
//! CI runs on, a 1 GiB sum reads 29–31 GB/s this way against 24–28 with small pages, and
//! faulting the pages in is faster too. Small buffers, other OSes, and a failed mapping fall
//! back to the heap. Either way the values start on a cache line.

use std::ops::{Deref, DerefMut};

use memmap2::MmapMut;

const CACHE_LINE: usize = 64;

/// Buffers below this size live on the heap (a huge page would not fit in them anyway).
const MAPPED_FROM_BYTES: usize = 2 << 20;

/// Where a buffer's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Held for the model's lifetime and streamed on every token: huge pages when large.
    Model,
    /// Short-lived scratch (packed per call): the heap, which recycles it without page faults.
    Scratch,
}

/// A zero-initialised, fixed-length buffer of plain values.
pub struct WeightBuffer<T: bytemuck::Pod> {
    storage: Storage<T>,
}

enum Storage<T> {
    /// `len` values from `start` on, `start` chosen so they begin on a cache line (a 64-byte
    /// vector load then never straddles two lines).
    Heap {
        values: Vec<T>,
        start: usize,
        len: usize,
    },
    /// An anonymous mapping of at least `len` values (mappings start page-aligned, so the cast
    /// to `T` is aligned).
    Mapped { map: MmapMut, len: usize },
}

impl<T: bytemuck::Pod> WeightBuffer<T> {
    /// `len` zeros. Mapped pages are faulted in by the first write, so fill the buffer after
    /// creating it.
    pub fn zeroed(len: usize, placement: Placement) -> Self {
        let bytes = len * size_of::<T>();
        if placement == Placement::Model
            && bytes >= MAPPED_FROM_BYTES
            && let Ok(map) = MmapMut::map_anon(bytes)
        {
            #[cfg(target_os = "linux")]
            if let Err(e) = map.advise(memmap2::Advice::HugePage) {
                // kernels without transparent huge pages: small pages, same contents
                tracing::debug!("no transparent huge pages for a {bytes}-byte weight: {e}");
            }
            return Self {
                storage: Storage::Mapped { map, len },
            };
        }
        let slack = CACHE_LINE.div_ceil(size_of::<T>().max(1));
        let values = vec![T::zeroed(); len + slack];
        let start = values.as_ptr().align_offset(CACHE_LINE).min(slack);
        Self {
            storage: Storage::Heap { values, start, len },
        }
    }
}

impl<T: bytemuck::Pod> Deref for WeightBuffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.storage {
            Storage::Heap { values, start, len } => &values[*start..*start + *len],
            Storage::Mapped { map, len } => &bytemuck::cast_slice(map)[..*len],
        }
    }
}

impl<T: bytemuck::Pod> DerefMut for WeightBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Heap { values, start, len } => &mut values[*start..*start + *len],
            Storage::Mapped { map, len } => &mut bytemuck::cast_slice_mut(map)[..*len],
        }
    }
}

/// A copy of a CPU tensor of floats whose storage is advised onto huge pages before it is
/// written, for a candle tensor read whole on every token: the tied embedding matrix, which is
/// also the 2B model's output layer (467 MB in bf16), where the packed bf16 kernel does not run
/// (where it does, the output layer is packed, onto huge pages too). With small pages its
/// decode product read 15–16 GB/s, with huge pages 22–24 GB/s, on a 2-core Xeon whose packed
/// layers read 26.
/// Anything else (other devices and dtypes, non-Linux) comes back as it is.
pub fn tensor_on_huge_pages(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{CpuStorage, DType, Storage};
    if !t.device().is_cpu() || !t.is_contiguous() || !cfg!(target_os = "linux") {
        return Ok(t.clone());
    }
    let copy = {
        let (storage, layout) = t.storage_and_layout();
        let range = layout.start_offset()..layout.start_offset() + t.elem_count();
        match (&*storage, t.dtype()) {
            (Storage::Cpu(CpuStorage::BF16(v)), DType::BF16) => {
                candle_core::Tensor::from_vec(advised_copy(&v[range]), t.shape(), t.device())?
            }
            (Storage::Cpu(CpuStorage::F16(v)), DType::F16) => {
                candle_core::Tensor::from_vec(advised_copy(&v[range]), t.shape(), t.device())?
            }
            (Storage::Cpu(CpuStorage::F32(v)), DType::F32) => {
                candle_core::Tensor::from_vec(advised_copy(&v[range]), t.shape(), t.device())?
            }
            _ => t.clone(),
        }
    };
    Ok(copy)
}

/// `values` copied into a vector whose 2 MiB-aligned interior is advised `MADV_HUGEPAGE`
/// before the copy writes (and so faults in) its pages.
fn advised_copy<T: Copy>(values: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(values.len());
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let begin = out.as_ptr() as usize;
        let (start, end) = (
            begin.next_multiple_of(HUGE),
            (begin + std::mem::size_of_val(values)) / HUGE * HUGE,
        );
        if end > start {
            // SAFETY: the range lies inside `out`'s allocation; advice changes no contents.
            let advised = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
            };
            if advised != 0 {
                tracing::debug!(
                    "no transparent huge pages for a {}-byte tensor",
                    end - start
                );
            }
        }
    }
    out.extend_from_slice(values);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_buffers_start_zeroed_and_keep_what_is_written() {
        for len in [0, 7, 1001, 3 << 20] {
            let mut b = WeightBuffer::<u16>::zeroed(len, Placement::Model);
            assert_eq!(b.len(), len);
            assert_eq!(
                b.as_ptr() as usize % 64,
                0,
                "{len} values start on a cache line"
            );
            assert!(b.iter().all(|&v| v == 0));
            for (i, v) in b.iter_mut().enumerate() {
                *v = i as u16;
            }
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as u16));
        }
        assert!(matches!(
            WeightBuffer::<f32>::zeroed(1 << 20, Placement::Model).storage,
            Storage::Mapped { len: 1048576, .. }
        ));
        assert!(matches!(
            WeightBuffer::<f32>::zeroed(1000, Placement::Model).storage,
            Storage::Heap { .. }
        ));
        assert!(matches!(
            WeightBuffer::<f32>::zeroed(1 << 20, Placement::Scratch).storage,
            Storage::Heap { .. }
        ));
    }

    /// On Linux with THP in `madvise` or `always` mode, a large buffer really is backed by huge
    /// pages (checked in /proc/self/smaps for its address range).
    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_land_on_huge_pages_where_the_kernel_offers_them() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !mode.contains("[madvise]") && !mode.contains("[always]") {
            eprintln!("transparent huge pages are off here ({mode:?}): nothing to check");
            return;
        }
        let mut b = WeightBuffer::<u8>::zeroed(16 << 20, Placement::Model);
        b.fill(1);
        let huge_kib = huge_kib_at(b.as_ptr() as usize);
        // 16 MiB from a page boundary: 7 or 8 whole 2 MiB pages inside it; most, not all, as
        // the kernel falls back to small pages for some where memory is fragmented
        assert!(huge_kib >= 8 << 10, "{huge_kib} KiB on huge pages");
    }

    /// The huge-page KiB of the mapping that holds `address`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn huge_kib_at(address: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut huge_kib = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_range = (lo..hi).contains(&address);
            } else if in_range && let Some(v) = line.strip_prefix("AnonHugePages:") {
                huge_kib = v.trim().trim_end_matches(" kB").parse::<usize>().ok();
            }
        }
        huge_kib.expect("the address's mapping in /proc/self/smaps")
    }

    #[test]
    fn a_tensor_copied_onto_huge_pages_keeps_its_values_and_shape() {
        use candle_core::{DType, Device, Tensor};
        // 48 MiB in f32: above glibc's largest mmap threshold, so fresh pages as in a model
        let rows = 8192;
        let t = Tensor::arange(0f32, (rows * 1536) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 1536))
            .unwrap();
        // a view that starts inside its storage, in bf16 and f32
        for view in [
            t.narrow(0, 3, rows - 3).unwrap(),
            t.to_dtype(DType::BF16).unwrap(),
        ] {
            let copy = tensor_on_huge_pages(&view).unwrap();
            assert_eq!((copy.dims(), copy.dtype()), (view.dims(), view.dtype()));
            let (a, b): (Vec<f32>, Vec<f32>) = (
                view.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                copy.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
            assert_eq!(a, b);
        }
        #[cfg(target_os = "linux")]
        {
            let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .unwrap_or_default();
            if mode.contains("[madvise]") || mode.contains("[always]") {
                let copy = tensor_on_huge_pages(&t).unwrap();
                let (storage, _) = copy.storage_and_layout();
                let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
                    panic!("an f32 CPU tensor")
                };
                // advice splits the mapping: its 2 MiB-aligned interior (at least 23 whole
                // pages) is a mapping of its own. Most of it, not all: where memory is
                // fragmented the kernel falls back to small pages for some (seen: 22 of 23).
                let huge_kib = huge_kib_at((v.as_ptr() as usize).next_multiple_of(2 << 20));
                assert!(huge_kib >= 24 << 10, "{huge_kib} KiB on huge pages");
            }
        }
    }
}
