//! Counter-based randomness: every random draw of the simulator is a hash of what it is for
//! (seed, device, metric, purpose, tick), never the next number of a shared stream.
//!
//! So a device's values do not depend on how many other devices or metrics were simulated before
//! it, on thread scheduling, or on the version of an external random-number crate: the same seed,
//! device index, metric name and tick always give the same draw, on every platform (the mixing
//! function is SplitMix64's finaliser, specified here).

/// SplitMix64's finaliser: a bijection on `u64` with good avalanche.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key derived from `key` and `part` (order matters: `derive(a, b) != derive(b, a)`).
#[inline]
pub fn derive(key: u64, part: u64) -> u64 {
    mix(key ^ mix(part))
}

/// A stable 64-bit hash of a name (FNV-1a), so that a metric's draws follow its name, not its
/// position in the profile.
pub fn name_key(name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h)
}

/// A uniform draw in `[0, 1)` from a key (53 random bits).
#[inline]
pub fn unit(key: u64) -> f64 {
    (mix(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform draw in `[lo, hi)`.
#[inline]
pub fn uniform(key: u64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * unit(key)
}

/// A standard normal draw (mean 0, standard deviation 1) from a key (Box–Muller).
#[inline]
pub fn gaussian(key: u64) -> f64 {
    // 1 - unit is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - unit(key);
    let u2 = unit(derive(key, 0x6A09_E667));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A point of a low-discrepancy sequence in `[0, 1)` (the golden-ratio Weyl sequence): index `i`
/// and `i + 1` land far apart, and any run of consecutive indices covers `[0, 1)` evenly. Used to
/// spread devices over profiles by weight so that small fleets get close to the exact shares.
#[inline]
pub fn weyl(index: u64) -> f64 {
    (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_in_range_and_roughly_fair() {
        let n = 100_000u64;
        let mut sum = 0.0;
        let mut sq = 0.0;
        let mut below_half = 0;
        for i in 0..n {
            let u = unit(derive(7, i));
            assert!((0.0..1.0).contains(&u));
            if u < 0.5 {
                below_half += 1;
            }
            let g = gaussian(derive(9, i));
            assert!(g.is_finite());
            sum += g;
            sq += g * g;
        }
        let mean = sum / n as f64;
        let var = sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        assert!((below_half as f64 / n as f64 - 0.5).abs() < 0.01);
    }

    #[test]
    fn weyl_spreads_consecutive_indices() {
        // Any 100 consecutive indices put 50 ± 2 in the lower half.
        for start in [0u64, 1, 977, 1_000_000] {
            let low = (start..start + 100).filter(|i| weyl(*i) < 0.5).count();
            assert!((48..=52).contains(&low), "{start}: {low}");
        }
    }

    #[test]
    fn names_key_differently() {
        assert_ne!(name_key("temperature"), name_key("humidity"));
        assert_eq!(name_key("rpm"), name_key("rpm"));
    }
}
