//! Tests of the linear branch: both paths against each other and the naive scan, carries,
//! modes, the activations.

use super::prepare::*;
use super::*;
use crate::config::Trick;

use crate::testutil::rand_vec;

fn normalized_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut v = rand_vec(n * d, seed);
    v.chunks_mut(d).for_each(l2norm);
    v
}

/// Tolerance between the two scan orders of operation, relative to the output scale.
const SCAN_TOL: f32 = 2e-5;

fn check_scan(heads: usize, d: usize, s: usize, n: usize, chunk: usize, linear: bool) {
    let rows = heads * s * n;
    let q = normalized_rows(rows, d, 1);
    let k = normalized_rows(rows, d, 2);
    let v = rand_vec(rows * d, 3)
        .iter()
        .map(|x| x * 0.3)
        .collect::<Vec<_>>();
    // gates in (0, 1) and, as under dt, some negative ones
    let alpha = rand_vec(rows * d, 4)
        .iter()
        .map(|x| 0.6 + 0.4 * x)
        .collect::<Vec<_>>();
    let beta = rand_vec(rows * d, 5)
        .iter()
        .map(|x| 0.5 * x)
        .collect::<Vec<_>>();
    let inp = ScanInput {
        heads,
        dim: d,
        tokens: s,
        order: n,
        chunk,
        linear,
        q: &q,
        k: &k,
        v: &v,
        alpha: &alpha,
        beta: &beta,
    };
    let init = rand_vec(heads * d * d, 6)
        .iter()
        .map(|x| 0.1 * x)
        .collect::<Vec<_>>();
    let (mut s_naive, mut s_fast) = (init.clone(), init);
    let o_naive = scan(&inp, &mut s_naive, ScanImpl::Naive);
    let o_fast = scan(&inp, &mut s_fast, ScanImpl::Fast);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let scale = o_naive
        .iter()
        .map(|x| x.abs())
        .fold(0f32, f32::max)
        .max(1.0);
    assert!(
        max_diff(&o_naive, &o_fast) <= SCAN_TOL * scale,
        "output H{heads} D{d} S{s} n{n} C{chunk}: {}",
        max_diff(&o_naive, &o_fast)
    );
    assert!(
        max_diff(&s_naive, &s_fast) <= SCAN_TOL * scale,
        "state H{heads} D{d} S{s} n{n} C{chunk}: {}",
        max_diff(&s_naive, &s_fast)
    );
}

#[test]
fn fast_scan_matches_naive_on_odd_shapes() {
    for &(s, c) in &[(1, 1), (7, 7), (63, 21), (67, 1), (100, 50), (130, 26)] {
        for n in [1, 2] {
            for linear in [true, false] {
                check_scan(3, 60, s, n, c, linear);
            }
        }
    }
    check_scan(2, 16, 64, 2, 64, true);
    check_scan(1, 5, 9, 2, 3, true);
}

#[test]
fn chunk_size_rule_matches_the_reference_table() {
    let table = [
        (1, 1),
        (7, 7),
        (20, 20),
        (31, 31),
        (64, 64),
        (67, 1),
        (100, 50),
        (128, 64),
        (130, 26),
        (512, 64),
        (1000, 50),
        (4099, 1),
    ];
    for (s, c) in table {
        assert_eq!(chunk_size(s, 64), c, "S = {s}");
    }
    assert_eq!(chunk_size(130, 7), 5);
    assert_eq!(chunk_size(5, 1), 1);
}

#[test]
fn spec_worked_example_of_dt_virtual_tokens() {
    // One head, D = 2: x_0 = (1, 2), x_1 = (3, 4).
    let x = [1.0, 2.0, 3.0, 4.0];
    let out = expand(&x, None, 1, 2, 2, 2, Trick::Dt);
    assert_eq!(out, vec![-0.5, -1.0, 0.0, 0.0, -1.5, -2.0, 0.5, 1.0]);
}

#[test]
fn rotation_uses_float32_sin_pi() {
    let out = expand(&[1.0, 2.0], None, 1, 1, 2, 2, Trick::Rot);
    assert_eq!(out[..2], [1.0, 2.0]);
    let s = -8.742278e-08f32;
    assert_eq!(out[2], -1.0 - 2.0 * s);
    assert_eq!(out[3], 1.0 * s + -2.0);
}

#[test]
fn pooling_replicates_then_uses_history() {
    let x = [3.0, 6.0, 9.0];
    let fresh = pool3(&x, 1, &[]);
    assert!(
        (fresh[0] - 3.0).abs() < 1e-6
            && (fresh[1] - 4.0).abs() < 1e-6
            && (fresh[2] - 6.0).abs() < 1e-6
    );
    let hist = pool3(&[9.0], 1, &[vec![3.0], vec![6.0]]);
    assert!((hist[0] - 6.0).abs() < 1e-6);
}

fn layer_inputs(s: usize, h: usize, hkv: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rand_vec(s * h * d, 11),
        rand_vec(s * hkv * d, 12),
        rand_vec(s * hkv * d, 13),
    )
}

#[test]
fn split_calls_with_carried_state_equal_one_call_at_chunk_one() {
    for mode in crate::config::OPERATOR_MODES {
        let rc = RecurrentConfig::from_operator_mode(mode).expect("known mode");
        let shape = LinearShape {
            heads: 4,
            kv_heads: 2,
            dim: 8,
            rc,
            max_chunk: 1,
        };
        let s = 9;
        let (q, k, v) = layer_inputs(s, 4, 2, 8);
        let mut one = LinearCarry::new(4, 8);
        let full = forward(
            &shape,
            &q,
            &k,
            &v,
            &mut one,
            CarryMode::Continue,
            ScanImpl::Fast,
        );
        let mut split = LinearCarry::new(4, 8);
        let mut parts = Vec::new();
        for (a, b) in [(0, 4), (4, 5), (5, 9)] {
            parts.extend(forward(
                &shape,
                &q[a * 32..b * 32],
                &k[a * 16..b * 16],
                &v[a * 16..b * 16],
                &mut split,
                CarryMode::Continue,
                ScanImpl::Fast,
            ));
        }
        let diff = full
            .iter()
            .zip(&parts)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{mode}: {diff}");
        assert!(
            one.state
                .iter()
                .zip(&split.state)
                .all(|(x, y)| (x - y).abs() < 1e-5),
            "{mode}: state"
        );
    }
}

/// The largest difference between two carries of `h` heads of size `d`, states compared per
/// query head (either may store one state per kv head).
fn carry_diff(a: &LinearCarry, b: &LinearCarry, h: usize, d: usize) -> f32 {
    let md = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    let (sa, sb) = (a.head_states(h, d), b.head_states(h, d));
    assert_eq!((sa.len(), sb.len()), (h * d * d, h * d * d));
    let mut m = md(&sa, &sb);
    assert_eq!(a.pool_k, b.pool_k);
    assert_eq!(a.pool_v, b.pool_v);
    match (&a.prev, &b.prev) {
        (Some(p), Some(q)) => {
            for (x, y) in [
                (&p.q, &q.q),
                (&p.k, &q.k),
                (&p.v, &q.v),
                (&p.alpha, &q.alpha),
                (&p.beta, &q.beta),
            ] {
                m = m.max(md(x, y));
            }
        }
        (None, None) => {}
        _ => panic!("order-2 buffer present on one path only"),
    }
    m
}

/// The fused fast forward (rows built per chunk, kv-head groups shared) against the literal
/// one (expanded arrays, naive scan), over every operator mode, across calls that carry
/// state, pooling history and the order-2 buffer, in both carry modes, with GQA groups.
#[test]
fn fused_forward_matches_expanded_forward() {
    let (h, hkv, d) = (6, 2, 10);
    for mode in crate::config::OPERATOR_MODES {
        let rc = RecurrentConfig::from_operator_mode(mode).expect("known mode");
        for max_chunk in [1, 4, 64] {
            let shape = LinearShape {
                heads: h,
                kv_heads: hkv,
                dim: d,
                rc,
                max_chunk,
            };
            for cm in [CarryMode::Continue, CarryMode::Reference] {
                // The fast path starts with one state per kv head, the literal one per query head.
                let (mut fast, mut naive) = (LinearCarry::grouped(hkv, d), LinearCarry::new(h, d));
                for (call, s) in [12usize, 1, 1, 7, 1, 30, 1].into_iter().enumerate() {
                    let seed = 100 + call as u64;
                    let (q, k, v) = (
                        rand_vec(s * h * d, seed),
                        rand_vec(s * hkv * d, seed + 10),
                        rand_vec(s * hkv * d, seed + 20),
                    );
                    let of = forward(&shape, &q, &k, &v, &mut fast, cm, ScanImpl::Fast);
                    let on = forward(&shape, &q, &k, &v, &mut naive, cm, ScanImpl::Naive);
                    let diff = of
                        .iter()
                        .zip(&on)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff < 1e-4,
                        "{mode} C≤{max_chunk} {cm:?} call {call}: output {diff}"
                    );
                    let cd = carry_diff(&fast, &naive, h, d);
                    assert!(
                        cd < 1e-5,
                        "{mode} C≤{max_chunk} {cm:?} call {call}: carry {cd}"
                    );
                    assert_eq!(fast.stored_states(d), hkv, "{mode}: one state per kv head");
                }
            }
        }
    }
}

/// Heads of a kv group whose carried states differ are scanned one by one.
#[test]
fn fused_forward_handles_unequal_group_states() {
    let (h, hkv, d, s) = (4, 2, 8, 9);
    for mode in ["delta_rule", "delta_product_c"] {
        let rc = RecurrentConfig::from_operator_mode(mode).expect("known mode");
        let shape = LinearShape {
            heads: h,
            kv_heads: hkv,
            dim: d,
            rc,
            max_chunk: 3,
        };
        let (q, k, v) = layer_inputs(s, h, hkv, d);
        let mut start = LinearCarry::new(h, d);
        forward(
            &shape,
            &q,
            &k,
            &v,
            &mut start,
            CarryMode::Continue,
            ScanImpl::Naive,
        );
        start.state[d * d..2 * d * d]
            .iter_mut()
            .zip(rand_vec(d * d, 7))
            .for_each(|(x, r)| *x += 0.1 * r);
        if let Some(p) = start.prev.as_mut() {
            p.k[3 * d] += 0.25;
        }
        let (mut fast, mut naive) = (start.clone(), start);
        let of = forward(
            &shape,
            &q,
            &k,
            &v,
            &mut fast,
            CarryMode::Continue,
            ScanImpl::Fast,
        );
        let on = forward(
            &shape,
            &q,
            &k,
            &v,
            &mut naive,
            CarryMode::Continue,
            ScanImpl::Naive,
        );
        let diff = of
            .iter()
            .zip(&on)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{mode}: output {diff}");
        assert!(carry_diff(&fast, &naive, h, d) < 1e-5, "{mode}: carry");
        // Then one token (the decode step), still with per-head states.
        let (q1, k1, v1) = (&q[..h * d], &k[..hkv * d], &v[..hkv * d]);
        let of = forward(
            &shape,
            q1,
            k1,
            v1,
            &mut fast,
            CarryMode::Continue,
            ScanImpl::Fast,
        );
        let on = forward(
            &shape,
            q1,
            k1,
            v1,
            &mut naive,
            CarryMode::Continue,
            ScanImpl::Naive,
        );
        let diff = of
            .iter()
            .zip(&on)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{mode}: one-token output {diff}");
        assert_eq!(
            fast.stored_states(d),
            h,
            "{mode}: unequal states stay per head"
        );
        assert!(
            carry_diff(&fast, &naive, h, d) < 1e-5,
            "{mode}: one-token carry"
        );
    }
}

#[test]
fn the_fast_sigmoids_saturate_like_libm() {
    for x in [
        -1e30f32, -200.0, -90.0, -20.0, -1.0, 0.0, 0.5, 20.0, 90.0, 200.0, 1e30,
    ] {
        assert!((sigmoid_fast(x) - sigmoid(x)).abs() < 1e-6, "sigmoid({x})");
        assert!(
            (silu_fast(x) - silu(x)).abs() <= 1e-6 * x.abs().max(1.0),
            "silu({x})"
        );
    }
}

/// The baseline (non-AVX2) variants of the fast scan agree too. Other tests running at the
/// same time may take the baseline path while the flag is set; they check the same contract.
#[test]
fn baseline_variants_match_naive() {
    crate::cpu::force_portable(true);
    for &(s, c) in &[(1, 1), (63, 21), (100, 50)] {
        for n in [1, 2] {
            check_scan(3, 60, s, n, c, n == 1);
        }
    }
    check_scan(1, 5, 9, 2, 3, true);
    crate::cpu::force_portable(false);
}
