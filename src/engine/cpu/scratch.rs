//! Per-thread buffers kept from one call to the next. Convolution temporaries (im2col columns, Winograd's V and
//! M, bf16 operands) run to megabytes; allocated afresh, every call faults in new zeroed pages, which on batch-1
//! inference cost as much as the copies that fill them.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` on `len` entries of this thread's `key` buffer (contents unspecified).
pub fn with_buffer<T: Copy + Default + 'static, R>(
    key: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    // Taken out rather than borrowed, so a nested call (rayon may run another task on this thread while it
    // waits) just allocates its own.
    let mut buf = key.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    let r = f(&mut buf[..len]);
    if buf.capacity() * std::mem::size_of::<T>() <= KEEP_MAX_BYTES {
        key.with(|s| *s.borrow_mut() = buf);
    }
    r
}

/// Larger buffers are freed after each call: kept, the few that large (Winograd's V and M in the training step's
/// backward pass) added 45 MiB to its peak RSS, a twentieth of its budget, for page faults worth less.
const KEEP_MAX_BYTES: usize = 8 << 20;
