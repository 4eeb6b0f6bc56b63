"""The seeded train/test split of resnet-rs (`Digits::split`, `ImageFolder::split`), in pure Python.

`split_indices(n, fraction, seed)` returns the same (kept, held_out) index lists as the Rust function
`resnet_rs::data::split::split_indices(n, fraction, seed)`; for the digits,
`digits_split(test_fraction, seed)` returns (train, test) as `Digits::load()?.split(test_fraction, seed)`
does: sample k of the Rust train set is `load_digits().images[train[k]]`.

The algorithm (not stratified):
1. SplitMix64 from state = seed: state += 0x9E3779B97F4A7C15; z = state;
   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; out = z ^ (z >> 31)
   (all modulo 2**64).
2. Fisher-Yates from the end: perm = [0..n); for i = n-1 down to 1: j = next() % (i + 1); swap perm[i], perm[j].
3. k = floor(n * f + 0.5), with f the fraction clamped to [0, 1] (NaN -> 0) and rounded to float32, the product
   in float64.
4. held_out = sorted(perm[:k]), kept = sorted(perm[k:]).

Run as a script to print the test indices of the digits for a seed: `python python/digits_split.py 0 0.2`.
"""

import math
import struct
import sys

MASK = (1 << 64) - 1
DIGITS_LEN = 1797


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def permutation(n, seed):
    perm = list(range(n))
    rng = SplitMix64(seed)
    for i in range(n - 1, 0, -1):
        j = rng.next() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def held_out_count(n, fraction):
    f = 0.0 if math.isnan(fraction) else min(max(float(fraction), 0.0), 1.0)
    f = struct.unpack("<f", struct.pack("<f", f))[0]  # the Rust argument is an f32
    return min(math.floor(n * f + 0.5), n)


def split_indices(n, fraction, seed):
    """(kept, held_out), each sorted ascending."""
    perm = permutation(n, seed)
    k = held_out_count(n, fraction)
    return sorted(perm[k:]), sorted(perm[:k])


def stratified_split_indices(labels, fraction, seed):
    """ImageFolder's split (`resnet_rs::data::split::stratified_split_indices`): walk the same permutation and
    hold out the first held_out_count(n_c, fraction) samples of each class c (at least one of a class with two
    or more samples when fraction > 0). Returns (kept, held_out), each sorted ascending."""
    count = {}
    for label in labels:
        count[label] = count.get(label, 0) + 1
    want = {}
    for label, n in count.items():
        k = held_out_count(n, fraction)
        want[label] = 1 if k == 0 and n >= 2 and fraction > 0 else k
    taken = {label: 0 for label in count}
    kept, held_out = [], []
    for i in permutation(len(labels), seed):
        label = labels[i]
        if taken[label] < want[label]:
            taken[label] += 1
            held_out.append(i)
        else:
            kept.append(i)
    return sorted(kept), sorted(held_out)


def digits_split(test_fraction, seed):
    """(train_indices, test_indices) into sklearn.datasets.load_digits(), as Digits::split gives them."""
    return split_indices(DIGITS_LEN, test_fraction, seed)


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    fraction = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
    train, test = digits_split(fraction, seed)
    print(f"# seed {seed}, test fraction {fraction}: {len(train)} train, {len(test)} test")
    print(",".join(map(str, test)))
