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
        let start = b.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut huge_kib = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_range = (lo..hi).contains(&start);
            } else if in_range && let Some(v) = line.strip_prefix("AnonHugePages:") {
                huge_kib = v.trim().trim_end_matches(" kB").parse::<usize>().ok();
            }
        }
        let huge_kib = huge_kib.expect("the buffer's mapping in /proc/self/smaps");
        // 16 MiB unaligned: at least 7 whole 2 MiB pages inside it
        assert!(huge_kib >= 14 << 10, "{huge_kib} KiB on huge pages");
    }
}
