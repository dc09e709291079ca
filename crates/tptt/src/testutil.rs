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

/// `n` values in [−scale, scale) ([`rand_vec`] scaled).
pub(crate) fn rand_scaled(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    rand_vec(n, seed).into_iter().map(|v| v * scale).collect()
}

/// `w` (`[n, cols]`) quantized by candle to `dtype`: its blocks as stored.
pub(crate) fn quantized_bytes(
    w: &[f32],
    (n, cols): (usize, usize),
    dtype: candle_core::quantized::GgmlDType,
) -> Vec<u8> {
    let t = candle_core::Tensor::from_vec(w.to_vec(), (n, cols), &candle_core::Device::Cpu)
        .expect("tensor");
    candle_core::quantized::QTensor::quantize(&t, dtype)
        .expect("quantize")
        .data()
        .expect("data")
        .to_vec()
}

/// How far quantizing `x` per 256 values (Q8_K: each value moved by at most half a step,
/// `max/127` of its block) can move the product with the row `w`: `Σ_blocks Σ |w|·max/254`,
/// with a margin for the f32 sums.
pub(crate) fn q8k_rounding_bound(w: &[f32], x: &[f32]) -> f32 {
    w.chunks_exact(256)
        .zip(x.chunks_exact(256))
        .map(|(wb, xb)| {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            wb.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
        })
        .sum::<f32>()
        * 1.001
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

/// Asserts `a` and `b` agree elementwise within `tol · (1 + |b|)`.
pub(crate) fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "index {i}: {x} vs {y}"
        );
    }
}
