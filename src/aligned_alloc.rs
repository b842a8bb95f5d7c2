//! The process's allocator: the C library's `malloc`, with every block of 4 KiB or more starting
//! on a 64-byte cache line.
//!
//! Tensors are plain `Vec`s, which `malloc` aligns to 16 bytes only (a block that `malloc` maps
//! on its own starts 16 bytes into a page). The CPU matrix kernels read rows of activations as
//! 64-byte lines (an AMX tile row is one line, an AVX-512 load one register): a row that starts
//! mid-line touches two lines for every one it uses. Measured on a 2-core Xeon with AMX, the
//! vision tower's products went from 1.55 to 1.88 TFLOP/s with aligned rows.
//!
//! A large block is `malloc`'d (or `calloc`'d, which keeps fresh pages untouched) 64 bytes
//! longer; the address handed out is the first line boundary past the start, and the start is
//! kept in the 8 bytes before it. `realloc` stays `realloc` (glibc moves large blocks with
//! `mremap`, without copying), followed by a move of the bytes if their offset from the line
//! changed.

use std::alloc::{GlobalAlloc, Layout, System};

/// See the module docs.
pub struct CacheLineAligned;

/// The alignment of large blocks.
const LINE: usize = 64;
/// Blocks from this size on are aligned to [`LINE`].
const LARGE: usize = 4096;

/// Whether a block of this layout goes through the aligned path (larger alignments than
/// [`LINE`] stay with the system allocator, which honours them itself).
fn aligned_here(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= LINE
}

/// The line-aligned address inside the block `raw` (≥ 16 bytes past it, as `malloc` returns
/// 16-byte aligned blocks), with `raw` recorded just before it.
///
/// # Safety
/// `raw` is a block of at least `LINE` bytes more than the caller uses.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    let offset = LINE - (raw as usize % LINE);
    // SAFETY: 8 ≤ offset ≤ LINE and the block has LINE spare bytes; the header slot
    // `aligned - 8` is 8-byte aligned and inside the block.
    unsafe {
        let aligned = raw.add(offset);
        (aligned as *mut *mut u8).sub(1).write(raw);
        aligned
    }
}

/// The block start recorded before `aligned`.
///
/// # Safety
/// `aligned` came from [`place`].
unsafe fn start_of(aligned: *mut u8) -> *mut u8 {
    // SAFETY: `place` wrote the start there.
    unsafe { (aligned as *mut *mut u8).sub(1).read() }
}

// SAFETY: every block handed out is valid for its layout's size and aligned to its alignment
// (large ones to LINE ≥ that alignment); blocks are freed by the path that allocated them, since
// the path depends only on the layout, which the caller passes back unchanged.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !aligned_here(layout) {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { System.alloc(layout) };
        }
        let Some(bytes) = layout.size().checked_add(LINE) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a plain malloc of `bytes`; `place` keeps LINE of them spare.
        unsafe { place(libc::malloc(bytes) as *mut u8) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !aligned_here(layout) {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let Some(bytes) = layout.size().checked_add(LINE) else {
            return std::ptr::null_mut();
        };
        // SAFETY: as in `alloc`, zeroed.
        unsafe { place(libc::calloc(1, bytes) as *mut u8) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if aligned_here(layout) {
            // SAFETY: allocated by `alloc`/`alloc_zeroed`/`realloc` with this layout's path.
            unsafe { libc::free(start_of(ptr) as *mut libc::c_void) }
        } else {
            // SAFETY: allocated by the system allocator with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (below): the caller's contract: `ptr` holds `layout`, `new_size` is valid for
        // its alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (aligned_here(layout), aligned_here(new_layout)) {
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                let Some(bytes) = new_size.checked_add(LINE) else {
                    return std::ptr::null_mut();
                };
                unsafe {
                    let raw = start_of(ptr);
                    let old_offset = ptr as usize - raw as usize;
                    let moved = libc::realloc(raw as *mut libc::c_void, bytes) as *mut u8;
                    if moved.is_null() {
                        return moved;
                    }
                    let offset = LINE - (moved as usize % LINE);
                    if offset != old_offset {
                        // the bytes sit at the old offset inside the moved block
                        let kept = layout.size().min(new_size);
                        std::ptr::copy(moved.add(old_offset), moved.add(offset), kept);
                    }
                    place(moved)
                }
            }
            // crossing the size threshold: a new block from the other path, the bytes copied
            _ => unsafe {
                let fresh = self.alloc(new_layout);
                if !fresh.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                fresh
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_bytes_through_realloc() {
        let a = CacheLineAligned;
        for size in [LARGE, LARGE + 3, 1 << 20, 40 << 20] {
            let layout = Layout::from_size_align(size, 2).unwrap();
            // SAFETY: layouts of non-zero size; every block is freed with its own layout.
            unsafe {
                let p = a.alloc(layout);
                assert_eq!(p as usize % LINE, 0, "{size} bytes");
                for i in 0..size {
                    *p.add(i) = (i % 251) as u8;
                }
                // grow, shrink below the threshold, grow past it again: the bytes follow
                let grown = a.realloc(p, layout, size * 2);
                assert_eq!(grown as usize % LINE, 0);
                assert!((0..size).all(|i| *grown.add(i) == (i % 251) as u8));
                let big = Layout::from_size_align(size * 2, 2).unwrap();
                let small = a.realloc(grown, big, 100);
                assert!((0..100).all(|i| *small.add(i) == (i % 251) as u8));
                let small_layout = Layout::from_size_align(100, 2).unwrap();
                let again = a.realloc(small, small_layout, size);
                assert_eq!(again as usize % LINE, 0);
                assert!((0..100).all(|i| *again.add(i) == (i % 251) as u8));
                a.dealloc(again, layout);

                let z = a.alloc_zeroed(layout);
                assert_eq!(z as usize % LINE, 0);
                assert!((0..size).all(|i| *z.add(i) == 0));
                a.dealloc(z, layout);
            }
        }
    }

    #[test]
    fn vectors_of_the_process_are_line_aligned_when_large() {
        // this test binary links the crate, so its allocator is this one
        for len in [2048usize, 100_000, 3 << 20] {
            let v = vec![half::bf16::ZERO; len];
            assert_eq!(v.as_ptr() as usize % LINE, 0, "{len} bf16");
        }
    }
}
