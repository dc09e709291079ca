//! Helpers shared by the crate's unit tests.

/// Deterministic pseudo-random values in [-1, 1) (xorshift on a seeded state).
pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The largest absolute difference between two tensors' values (flattened, f32).
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let a = a
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values");
    let b = b
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values");
    assert_eq!(a.len(), b.len(), "tensors of different sizes");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
