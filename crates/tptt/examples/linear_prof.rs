//! Timing harness for the linear branch's prefill.
//!
//! `cargo run --release -p tptt --example linear_prof` times `linear::forward` (gates, pooling,
//! virtual tokens, scan, merge) and `linear::scan` alone on the SmolLM2-135M shape (H 9, Hkv 3,
//! D 64) at S = 512, for delta_product and delta_rule. With `model DIR [TOKENS]` it times a whole
//! prefill of the model with the branch on (mag 0.125) and off (mag 0) (`GGUF=file`: on that
//! quantized base); `decode DIR [HISTORY]` an in-process decode A/B of the two (`KVS=q8_0,f16`:
//! one weight, its KV cache in each format) and `step` the
//! branch alone at one token; `attend [KV] [f32|f16|q8_0]` one decode token's attention over KV
//! cached positions in 30 layers stored in that format (`LAYERS=1`: one layer, which stays in
//! the caches from one repetition to the next: the kernel's own rate, without the memory's
//! latency; with `RAYON_NUM_THREADS=1`, one core's); env `MAGS`, `MODES` and `REPS` select
//! the weights, operator modes and repetitions. `promptmm [TOKENS] [ROWS] [COLS]` one prompt product with a Q4_K matrix,
//! ours against the widened f32 product; `matvec [ROWS] [COLS]` times one decode product
//! `W·x` (default 2048 × 8192) per weight type, ours (`kernels::matvec_group`) against candle's
//! `QMatMul`, in GB/s of weight bytes (run with `RAYON_NUM_THREADS=1` for one thread: both
//! honour it).
use std::time::Instant;

use tptt::config::{RecurrentConfig, TpttSettings};
use tptt::linear::{self, CarryMode, LinearCarry, LinearShape, ScanImpl, ScanInput};
use tptt::model::{LoadOptions, Logits, Model};
use tptt::state::KvFormat;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// This process's user + system CPU seconds (Linux `/proc/self/stat`, 100 ticks/s), 0 elsewhere.
/// On a shared machine the wall clock mostly measures the neighbours; CPU time much less so.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// (median wall, min wall, CPU seconds per rep).
fn time<F: FnMut()>(reps: usize, mut f: F) -> (f64, f64, f64) {
    f(); // warm-up
    let c0 = cpu_secs();
    let walls: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = (cpu_secs() - c0) / reps as f64;
    let min = walls.iter().copied().fold(f64::INFINITY, f64::min);
    (median(walls), min, cpu)
}

fn branch(s: usize, reps: usize, which: ScanImpl) {
    let (h, hkv, d) = (9, 3, 64);
    let (q, k, v) = (
        rand_vec(s * h * d, 1),
        rand_vec(s * hkv * d, 2),
        rand_vec(s * hkv * d, 3),
    );
    let modes = std::env::var("MODES")
        .unwrap_or_else(|_| "delta_product,delta_rule,delta_rule_gelu".into());
    for mode in modes.split(',') {
        let rc = RecurrentConfig::from_operator_mode(mode).expect("mode");
        let shape = LinearShape {
            heads: h,
            kv_heads: hkv,
            dim: d,
            rc,
            max_chunk: 64,
        };
        let fwd = time(reps, || {
            let mut carry = LinearCarry::new(h, d);
            std::hint::black_box(linear::forward(
                &shape,
                &q,
                &k,
                &v,
                &mut carry,
                CarryMode::Continue,
                which,
            ));
        });
        // The scan alone on inputs of the same shape.
        let n = rc.order;
        let rows = h * s * n;
        let mut qs = rand_vec(rows * d, 4);
        let mut ks = rand_vec(rows * d, 5);
        for r in qs.chunks_mut(d).chain(ks.chunks_mut(d)) {
            let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= nrm);
        }
        let vs: Vec<f32> = rand_vec(rows * d, 6).iter().map(|x| x * 0.1).collect();
        let al: Vec<f32> = rand_vec(rows * d, 7)
            .iter()
            .map(|x| 0.8 + 0.2 * x)
            .collect();
        let be: Vec<f32> = rand_vec(rows * d, 8).iter().map(|x| 0.5 * x).collect();
        let chunk = linear::chunk_size(s, 64);
        let inp = ScanInput {
            heads: h,
            dim: d,
            tokens: s,
            order: n,
            chunk,
            linear: rc.linear,
            q: &qs,
            k: &ks,
            v: &vs,
            alpha: &al,
            beta: &be,
        };
        let sc = time(reps, || {
            let mut st = vec![linear::STATE_INIT; h * d * d];
            std::hint::black_box(linear::scan(&inp, &mut st, which));
        });
        println!(
            "{mode:16} S={s} C={chunk}: forward med {:6.2} min {:6.2} cpu {:6.2} ms | scan med {:6.2} min {:6.2} cpu {:6.2} ms",
            fwd.0 * 1e3,
            fwd.1 * 1e3,
            fwd.2 * 1e3,
            sc.0 * 1e3,
            sc.1 * 1e3,
            sc.2 * 1e3
        );
    }
}

fn model(dir: &str, tokens: usize, reps: usize) -> Result<(), Box<dyn std::error::Error>> {
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|i| (i * 7919) % 40000 + 10)
        .collect();
    let mags = std::env::var("MAGS").unwrap_or_else(|_| "0,0.125".into());
    for mag in mags.split(',').filter_map(|m| m.parse::<f32>().ok()) {
        let t = TpttSettings::injected("delta_product", mag, dir)?;
        // `GGUF=file`: the same injection on that quantized base.
        let m = match std::env::var("GGUF") {
            Ok(g) => Model::load_gguf_plain(std::path::Path::new(&g), t, &LoadOptions::default())?,
            Err(_) => Model::load_plain(std::path::Path::new(dir), t, &LoadOptions::default())?,
        };
        let (med, min, cpu) = time(reps, || {
            let mut st = m.new_state(CarryMode::Continue, Some(8192));
            if let Err(e) = m.forward(&ids, &mut st, Logits::Last) {
                panic!("forward: {e}");
            }
        });
        let tps = |t: f64| tokens as f64 / t;
        println!("model mag {mag}: prefill {tokens}: wall median {:.1} tok/s, best {:.1} tok/s, cpu {:.3} s/prefill", tps(med), tps(min), cpu);
    }
    Ok(())
}

/// Decode A/B in one process: TPTT (mag 0.125) and base (mag 0) step alternately after `history`
/// tokens, and the branch alone (`linear::forward` at S = 1 with its carry) on the same shape.
fn decode(dir: &str, history: usize, reps: usize) -> Result<(), Box<dyn std::error::Error>> {
    let ids: Vec<u32> = (0..history as u32)
        .map(|i| (i * 7919) % 40000 + 10)
        .collect();
    let mode = std::env::var("MODES").unwrap_or_else(|_| "delta_product".into());
    let mut runs = Vec::new();
    // `DECODE_MAGS=a,b`: other weights, in that order (`0,0.125`: the base first in every
    // round; `0.125,0.125`: an A/A run showing the measurement's own bias).
    let mags: Vec<f32> = std::env::var("DECODE_MAGS")
        .unwrap_or_else(|_| "0.125,0".into())
        .split(',')
        .filter_map(|m| m.parse().ok())
        .collect();
    // `KVS=q8_0,f16,f32`: with one weight, the same history (read once, f32) decoded with its
    // KV cache converted to each format, their steps alternating.
    let kvs: Vec<KvFormat> = std::env::var("KVS")
        .unwrap_or_else(|_| "f32".into())
        .split(',')
        .filter_map(KvFormat::parse)
        .collect();
    let mags = if kvs.len() > 1 { &mags[..1] } else { &mags[..] };
    for &mag in mags.iter().take(2) {
        let t = TpttSettings::injected(&mode, mag, dir)?;
        let m = std::sync::Arc::new(Model::load_plain(
            std::path::Path::new(dir),
            t,
            &LoadOptions::default(),
        )?);
        let mut st = m.new_state(CarryMode::Continue, Some(8192));
        for block in ids.chunks(512) {
            m.forward(block, &mut st, Logits::Last)?;
        }
        for &kv in &kvs {
            let mut s = st.try_clone()?;
            s.set_kv_format(kv)?;
            runs.push((
                format!("mag {mag} kv {}", kv.as_str()),
                m.clone(),
                s,
                Vec::new(),
            ));
        }
    }
    // `MSG=n`: also an n-token message read on a copy of each state (a branch's first message).
    if let Some(n) = std::env::var("MSG")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let msg: Vec<u32> = (0..n as u32).map(|i| (i * 131) % 40000 + 10).collect();
        // `PERF_CTL=fifo`: `perf record --control fifo:…` starts sampling here.
        if let Ok(ctl) = std::env::var("PERF_CTL") {
            std::fs::write(ctl, "enable\n")?;
        }
        for (name, m, st, _) in runs.iter() {
            let mut times = Vec::new();
            for _ in 0..reps.max(1) {
                let mut s = st.try_clone()?;
                let t0 = Instant::now();
                m.forward(&msg, &mut s, Logits::Last)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            println!(
                "{name}: a {n}-token message after {history}: median {:.1} ms",
                median(times) * 1e3
            );
        }
    }
    // `PERF_CTL=fifo` without `MSG`: sampling starts with the decode steps.
    if std::env::var("MSG").is_err() {
        if let Ok(ctl) = std::env::var("PERF_CTL") {
            std::fs::write(ctl, "enable\n")?;
        }
    }
    for round in 0..reps * 8 {
        for (_, m, st, times) in runs.iter_mut() {
            let t0 = Instant::now();
            m.forward(&[(round as u32 * 31) % 40000 + 10], st, Logits::Last)?;
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let meds: Vec<f64> = runs.iter().map(|r| median(r.3.clone())).collect();
    for (r, med) in runs.iter().zip(&meds) {
        println!(
            "decode {mode} {} after {history}: median {:.2} ms/token ({:.1} tok/s)",
            r.0,
            med * 1e3,
            1.0 / med
        );
    }
    if meds.len() > 1 {
        println!("second / first tok/s: {:.3}", meds[0] / meds[1]);
    }
    branch_step(&mode, reps);
    Ok(())
}

/// The branch alone at S = 1, 30 layers of the SmolLM2 shape with their carries.
fn branch_step(mode: &str, reps: usize) {
    let (h, hkv, d) = (9, 3, 64);
    let rc = RecurrentConfig::from_operator_mode(mode).expect("mode");
    let shape = LinearShape {
        heads: h,
        kv_heads: hkv,
        dim: d,
        rc,
        max_chunk: 64,
    };
    let mut carries: Vec<LinearCarry> = (0..30).map(|_| LinearCarry::grouped(hkv, d)).collect();
    let (q, k, v) = (
        rand_vec(h * d, 1),
        rand_vec(hkv * d, 2),
        rand_vec(hkv * d, 3),
    );
    let br = time(reps * 8, || {
        for c in carries.iter_mut() {
            std::hint::black_box(linear::forward(
                &shape,
                &q,
                &k,
                &v,
                c,
                CarryMode::Continue,
                ScanImpl::Fast,
            ));
        }
    });
    println!(
        "branch alone, 30 layers at S=1: median {:.3} ms, min {:.3} ms",
        br.0 * 1e3,
        br.1 * 1e3
    );
}

/// One decode token's attention over `kv` cached positions in 30 layers of the SmolLM2 shape
/// (H 9, Hkv 3, D 64), each layer's keys and values in their own buffers (together larger than
/// the caches) stored as `format` (`f32`, `f16`, `q8_0`), on a step team as in decoding: time
/// per token and the bytes it reads per second.
fn attend(kv: usize, format: &str, reps: usize) {
    use tptt::kernels::{attend_one, AttendOne, KvSlice};
    /// Every layer's keys and values in one allocation on huge pages, as the engine holds them
    /// (`state/arena.rs`).
    enum Stored {
        F32(Vec<f32>),
        F16(Vec<half::f16>),
        Q8(Vec<u8>),
    }
    impl Stored {
        /// Buffer `i` of `n` equal ones.
        fn slice(&self, i: usize, n: usize) -> KvSlice<'_> {
            fn part<T>(x: &[T], i: usize, n: usize) -> &[T] {
                let len = x.len() / n;
                &x[i * len..(i + 1) * len]
            }
            match self {
                Stored::F32(x) => KvSlice::F32(part(x, i, n)),
                Stored::F16(x) => KvSlice::F16(part(x, i, n)),
                Stored::Q8(x) => KvSlice::Q8_0(part(x, i, n)),
            }
        }
        fn bytes(&self) -> usize {
            match self {
                Stored::F32(x) => x.len() * 4,
                Stored::F16(x) => x.len() * 2,
                Stored::Q8(x) => x.len(),
            }
        }
    }
    fn huge<T>(n: usize) -> Vec<T> {
        let mut v = Vec::with_capacity(n);
        tptt::alloc::advise_huge_pages(&mut v);
        v
    }
    let layers: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let (h, hkv, d) = (9, 3, 64);
    let per = hkv * kv * d;
    let buffers = (0..2 * layers).map(|i| rand_vec(per, 10 + i as u64));
    let store = match format {
        "f16" => {
            let mut v = huge(2 * layers * per);
            buffers.for_each(|x| v.extend(x.iter().map(|&v| half::f16::from_f32(v))));
            Stored::F16(v)
        }
        "q8_0" => {
            let mut v = huge(2 * layers * per / 32 * 34);
            buffers.for_each(|x| tptt::kernels::kv::quantize_q8_0(&x, &mut v));
            Stored::Q8(v)
        }
        _ => {
            let mut v = huge(2 * layers * per);
            buffers.for_each(|x| v.extend_from_slice(&x));
            Stored::F32(v)
        }
    };
    let q = rand_vec(h * d, 3);
    let visible = vec![true; kv];
    let threads = rayon::current_num_threads();
    // `ATTEND_SCALE=2.5`: a peaked softmax (scores spread over tens), where many groups of 16
    // slots have weights that round to nothing; the default is a flat one.
    let scale: f32 = std::env::var("ATTEND_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.125);
    let t = time(reps, || {
        tptt::team::with_team(threads, || {
            for l in 0..layers {
                let a = AttendOne {
                    q: &q,
                    k: store.slice(2 * l, 2 * layers),
                    v: store.slice(2 * l + 1, 2 * layers),
                    visible: &visible,
                    heads: h,
                    kv_heads: hkv,
                    dim: d,
                    capacity: kv,
                    scale,
                };
                std::hint::black_box(attend_one(&a));
            }
        })
    });
    println!(
        "attend KV {kv} ({format}): median {:.2} ms/token, min {:.2} ms ({:.1} GB/s at the median)",
        t.0 * 1e3,
        t.1 * 1e3,
        store.bytes() as f64 / t.0 / 1e9
    );
}

/// One `rows × cols` product per weight type: ours and candle's, in GB/s of the weights read.
fn matvec(rows: usize, cols: usize, reps: usize) -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use tptt::kernels::{matvec_group, MatVec, Rows};
    let dev = Device::Cpu;
    let w = Tensor::from_vec(rand_vec(rows * cols, 1), (rows, cols), &dev)?;
    let x = rand_vec(cols, 2);
    let xt = Tensor::from_slice(&x, (1, cols), &dev)?;
    let dense = rand_vec(rows * cols, 1);
    println!(
        "matvec {rows}x{cols}, {} thread(s): type, bytes/weight, ours GB/s (ms), candle GB/s (ms)",
        rayon::current_num_threads()
    );
    for dtype in [
        GgmlDType::F32,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, dtype)?;
        let bytes = q.data()?.into_owned();
        let size = if dtype == GgmlDType::F32 {
            rows * cols * 4
        } else {
            bytes.len()
        };
        let mut out = vec![0f32; rows];
        let ours = |out: &mut [f32]| {
            let w = match dtype {
                GgmlDType::Q8_0 => Rows::Q8_0(&bytes),
                GgmlDType::Q4_0 => Rows::Q4_0(&bytes),
                GgmlDType::Q4_1 => Rows::Q4_1(&bytes),
                GgmlDType::Q5_0 => Rows::Q5_0(&bytes),
                GgmlDType::Q5_1 => Rows::Q5_1(&bytes),
                GgmlDType::Q4K => Rows::Q4K(&bytes),
                GgmlDType::Q5K => Rows::Q5K(&bytes),
                GgmlDType::Q6K => Rows::Q6K(&bytes),
                _ => Rows::F32(&dense),
            };
            matvec_group(vec![MatVec { w, bias: None, out }], &x);
        };
        let (t_ours, _, _) = time(reps, || ours(&mut out));
        // The same matrix repacked 16 rows to a group (kernels::q4k_x16, kernels::q32_x16).
        let packed = match dtype {
            GgmlDType::Q4K => Some(("Q4K x16", tptt::kernels::q4k_x16::pack(&bytes, rows, cols))),
            GgmlDType::Q4_1 | GgmlDType::Q8_0 => {
                use tptt::kernels::q32_x16::{pack, Format};
                let f = match dtype {
                    GgmlDType::Q4_1 => Format::Q4_1,
                    _ => Format::Q8_0,
                };
                Some((
                    match f {
                        Format::Q4_1 => "Q4_1 x16",
                        Format::Q8_0 => "Q8_0 x16",
                    },
                    pack(f, &bytes, rows, cols),
                ))
            }
            _ => None,
        };
        if let (Some((name, packed)), true) = (&packed, rows.is_multiple_of(16)) {
            let w = match dtype {
                GgmlDType::Q4K => Rows::Q4KX16(packed),
                GgmlDType::Q4_1 => Rows::X16(tptt::kernels::q32_x16::Format::Q4_1, packed),
                _ => Rows::X16(tptt::kernels::q32_x16::Format::Q8_0, packed),
            };
            let (t, _, _) = time(reps, || {
                matvec_group(
                    vec![MatVec {
                        w,
                        bias: None,
                        out: &mut out,
                    }],
                    &x,
                )
            });
            println!(
                "{name}\t{:.3}\t{:.1} ({:.2})",
                packed.len() as f64 / (rows * cols) as f64,
                packed.len() as f64 / t / 1e9,
                t * 1e3
            );
        }
        let mm = QMatMul::from_qtensor(q)?;
        let (t_candle, _, _) = time(reps, || {
            let _ = mm.forward(&xt);
        });
        let gbs = |t: f64| size as f64 / t / 1e9;
        println!(
            "{dtype:?}\t{:.3}\t{:.1} ({:.2})\t{:.1} ({:.2})",
            size as f64 / (rows * cols) as f64,
            gbs(t_ours),
            t_ours * 1e3,
            gbs(t_candle),
            t_candle * 1e3
        );
    }
    Ok(())
}

/// One prompt product `X·Wᵀ` (`tokens` rows of input) with a Q4_K `rows × cols` matrix: ours
/// in 8-bit integers against the matrix widened to f32 for candle's dense product, in GMAC/s.
fn promptmm(
    tokens: usize,
    rows: usize,
    cols: usize,
    reps: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let w = Tensor::from_vec(rand_vec(rows * cols, 1), (rows, cols), &dev)?;
    let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
    let bytes = q.data()?.into_owned();
    let x = rand_vec(tokens * cols, 2);
    let xt = Tensor::from_slice(&x, (tokens, cols), &dev)?;
    let (t_ours, _, _) = time(reps, || {
        let _ = tptt::kernels::prompt_k::matmul(
            tptt::kernels::prompt_k::KType::Q4K,
            &bytes,
            rows,
            cols,
            &x,
        );
    });
    let (t_wide, _, _) = time(reps, || {
        let wf = q.dequantize(&dev).expect("dequantize");
        let _ = xt.matmul(&wf.t().expect("t")).expect("matmul");
    });
    let gmac = (tokens * rows * cols) as f64 / 1e9;
    println!(
        "prompt Q4_K {tokens}x{rows}x{cols}, {} thread(s): ours {:.1} GMAC/s ({:.1} ms), widened f32 {:.1} GMAC/s ({:.1} ms)",
        rayon::current_num_threads(),
        gmac / t_ours,
        t_ours * 1e3,
        gmac / t_wide,
        t_wide * 1e3
    );
    Ok(())
}

/// `qdecode REPO VARIANT GGUF|- [TOKENS]`: decode `TOKENS` (default 200) single tokens after a
/// 128-token prompt on a variant over a GGUF base, or (`-`) its own base with half matrices kept
/// as stored (for a profiler; `REPACK=0` keeps quantized matrices as stored).
/// Peak memory of one prompt through a GGUF base with the demo's injection: `qrss GGUF DIR N`
/// loads like the bench's quantized child, then feeds `N` tokens in one call and prints the
/// resident memory's peak while loading, after loading, and its peak during the prompt.
fn qrss(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let status = |key: &str| -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    };
    let gguf = args.first().ok_or("qrss GGUF DIR N")?;
    let dir = args.get(1).ok_or("qrss GGUF DIR N")?;
    let n: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(512);
    tptt::alloc::tune_for_inference();
    let settings = TpttSettings::injected("delta_product", 0.125, dir)?;
    let m = Model::load_gguf_plain(
        std::path::Path::new(gguf),
        settings,
        &LoadOptions::default(),
    )?;
    let load_peak = status("VmHWM:");
    tptt::alloc::release_free_memory();
    let loaded = status("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5")?;
    let mut st = m.new_state(CarryMode::Continue, None);
    st.set_kv_format(KvFormat::Q8_0)?;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % 30000 + 10).collect();
    m.forward(&ids, &mut st, Logits::Last)?;
    println!(
        "qrss {n} tokens: load peak {:.1} MB, after load {:.1} MB, peak {:.1} MB (+{:.1} MB), KV {:.1} MB",
        load_peak as f64 / 1024.0,
        loaded as f64 / 1024.0,
        status("VmHWM:") as f64 / 1024.0,
        (status("VmHWM:") - loaded) as f64 / 1024.0,
        st.kv_bytes() as f64 / 1e6
    );
    Ok(())
}

fn qdecode(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (repo, variant, gguf) = match args {
        [r, v, g, ..] => (r, v, g),
        _ => return Err("qdecode REPO VARIANT GGUF|- [TOKENS]".into()),
    };
    let n: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(200);
    // `-`: the repository's own base, its f16 / bf16 matrices kept as stored (as the app loads).
    let base = (gguf != "-").then(|| std::path::Path::new(gguf.as_str()));
    let files =
        tptt::repo::TpttRepo::open(std::path::Path::new(repo))?.variant(Some(variant), base)?;
    let opts = LoadOptions {
        repack: std::env::var("REPACK").map_or(true, |v| v != "0"),
        half_weights: base.is_none(),
        ..LoadOptions::default()
    };
    let m = Model::load(&files, &opts)?;
    let mut st = m.new_state(CarryMode::Continue, None);
    st.set_kv_format(KvFormat::Q8_0)?;
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 7919) % 30000 + 10).collect();
    m.forward(&prompt, &mut st, Logits::Last)?;
    let t0 = Instant::now();
    for i in 0..n as u32 {
        m.forward(&[(i * 31) % 30000 + 10], &mut st, Logits::Last)?;
    }
    let t = t0.elapsed().as_secs_f64();
    println!("qdecode: {n} tokens in {t:.2} s, {:.1} tok/s", n as f64 / t);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tptt::alloc::tune_for_inference();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    match args.first().map(String::as_str) {
        Some("model") => {
            let dir = args
                .get(1)
                .map(String::as_str)
                .unwrap_or("/work/main/models/smollm2-135m-instruct");
            let tokens = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(512);
            model(dir, tokens, reps)?;
        }
        Some("decode") => {
            let dir = args
                .get(1)
                .map(String::as_str)
                .unwrap_or("/work/main/models/smollm2-135m-instruct");
            let history = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(128);
            decode(dir, history, reps)?;
        }
        Some("attend") => attend(
            args.get(1).and_then(|t| t.parse().ok()).unwrap_or(8192),
            args.get(2).map_or("f32", String::as_str),
            reps,
        ),
        Some("matvec") => matvec(
            args.get(1).and_then(|t| t.parse().ok()).unwrap_or(2048),
            args.get(2).and_then(|t| t.parse().ok()).unwrap_or(8192),
            reps,
        )?,
        Some("qdecode") => qdecode(&args[1..])?,
        Some("qrss") => qrss(&args[1..])?,
        Some("promptmm") => promptmm(
            args.get(1).and_then(|t| t.parse().ok()).unwrap_or(512),
            args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2048),
            args.get(3).and_then(|t| t.parse().ok()).unwrap_or(8192),
            reps,
        )?,
        Some("step") => branch_step(
            &std::env::var("MODES").unwrap_or_else(|_| "delta_product".into()),
            reps,
        ),
        Some("naive") => branch(
            args.get(1).and_then(|t| t.parse().ok()).unwrap_or(512),
            reps,
            ScanImpl::Naive,
        ),
        other => branch(
            other.and_then(|t| t.parse().ok()).unwrap_or(512),
            reps,
            ScanImpl::Fast,
        ),
    }
    Ok(())
}
