//! Per-thread buffers kept from one call to the next. Convolution temporaries (im2col columns, Winograd's V and
//! M, bf16 operands) run to megabytes; allocated afresh, every call faults in new zeroed pages, which on batch-1
//! inference cost as much as the copies that fill them.

use std::cell::RefCell;
use std::thread::LocalKey;

/// What inference keeps: buffers up to 8 MiB (a batch-1 stem's im2col columns are 7 MB). Training keeps none
/// but U (see `winograd`): kept on every thread, its temporaries added 45 MiB to the step's peak RSS, a
/// twentieth of its budget, for no measurable time.
pub const INFERENCE_KEEP: usize = 8 << 20;

/// Runs `f` on `len` entries of this thread's `key` buffer (contents unspecified), and keeps the buffer for the
/// next call if it is at most `keep_bytes` long.
pub fn with_buffer<T: Copy + Default + 'static, R>(
    key: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    keep_bytes: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    // Taken out rather than borrowed, so a nested call (rayon may run another task on this thread while it
    // waits) just allocates its own.
    let mut buf = key.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    let r = f(&mut buf[..len]);
    if buf.capacity() * std::mem::size_of::<T>() <= keep_bytes {
        key.with(|s| *s.borrow_mut() = buf);
    }
    r
}
