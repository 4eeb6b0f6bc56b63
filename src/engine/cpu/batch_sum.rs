//! Sums over the batch split where data parallelism splits them, so that the split does not change the result.
//!
//! A weight gradient is a sum over the batch's images. One process on 64 images and two ranks on 32 each add
//! the same products, but in another order (and so with other rounding) unless the process splits its sum
//! where the ranks do. Here every such sum (the convolutions' and the head's weight gradients, the head's bias
//! gradient) is taken over fixed chunks of `CHUNK` images on their own, and the chunks' sums are added
//! pairwise: a batch of 2^k·`CHUNK` images then adds its chunks in the tree in which 2^k ranks of `CHUNK`
//! images each (one subtree per rank, then the all-reduce) add theirs, and `mpirun -n 2 resnet train
//! --batch-size 32 --sync-bn` trains bit for bit as one process on 64 (tests/distributed.rs). Without the
//! split, the first gradients differed by 5e-8, and ReLUs flipped by that rounding made it 2e-3 of the gradient
//! norm by step 9 (ResNet-18 on digits, measured on an AMD EPYC with AVX-512): no tolerance can tell a wrong
//! synchronisation from that. Costs: one add of the weight gradient per extra chunk, and at most `CHUNK` images
//! per GEMM where maps are too small to fill one; but the chunks of those layers then run on separate threads
//! instead of one GEMM on all: the digits step (ResNet-34, batch 64, 2 threads, AMD EPYC) took 323-385 ms
//! against 366-424 ms before, alternating in one run; peak RSS 318 MiB against 298.

use std::ops::Range;

/// Images per chunk: the smallest per-rank batch for which a split over ranks changes no gradient.
pub const CHUNK: usize = 32;

/// The image ranges of a batch of `n`: `CHUNK` images each, the last one shorter.
pub fn chunks(n: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n.div_ceil(CHUNK)).map(move |c| c * CHUNK..((c + 1) * CHUNK).min(n))
}

/// The element-wise sum of equal-length parts, added pairwise (the first half's sum plus the second half's,
/// halves split at the largest power of two below the count, so 2^k parts make a balanced tree).
pub fn pairwise(mut parts: Vec<Vec<f32>>) -> Vec<f32> {
    match parts.len() {
        0 => Vec::new(),
        1 => parts.pop().unwrap_or_default(),
        len => {
            let upper = parts.split_off(len.next_power_of_two() / 2);
            let (mut a, b) = (pairwise(parts), pairwise(upper));
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_batch_in_order() {
        let all: Vec<_> = chunks(70).collect();
        assert_eq!(all, [0..32, 32..64, 64..70]);
        assert_eq!(chunks(0).count(), 0);
    }

    #[test]
    fn four_parts_add_as_two_ranks_of_two_then_their_sum() {
        // Values whose sum depends on the order in f32: the tree must be (a + b) + (c + d).
        let parts = vec![vec![1.0e8f32], vec![1.0], vec![-1.0e8], vec![1.0]];
        let ranks = [parts[0][0] + parts[1][0], parts[2][0] + parts[3][0]];
        assert_eq!(pairwise(parts.clone()), vec![ranks[0] + ranks[1]]);
        let sequential = ((parts[0][0] + parts[1][0]) + parts[2][0]) + parts[3][0];
        assert_ne!(ranks[0] + ranks[1], sequential, "the example must tell the two orders apart");
    }
}
