//! Test data shared by the tests and the `measure` example: deterministic
//! pseudo-random bytes, and the "new version" edit the measurements use.

/// `n` pseudo-random bytes from `seed` (splitmix64).
pub fn prng_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// `old` with three 16-byte edits and a 1 KiB insertion in the middle.
pub fn edited(old: &[u8]) -> Vec<u8> {
    let n = old.len();
    let mut new = old.to_vec();
    for (i, at) in [n / 10, n * 3 / 10, n * 85 / 100].into_iter().enumerate() {
        new[at..at + 16].copy_from_slice(&prng_bytes(100 + i as u64, 16));
    }
    new.splice(n / 2..n / 2, prng_bytes(7, 1024));
    new
}
