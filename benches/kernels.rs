//! Criterion benchmarks of Crystalline's hot kernels and of one whole
//! training step. Run from the repo root with `cargo bench` (or
//! `cargo bench -- matmul` etc. to pick a group).
//!
//! Units: criterion reports `Throughput::Elements` as "elem/s". For the
//! matmul group one element is one floating-point operation (2*m*n*k per
//! GEMM), so **Melem/s = MFLOP/s and Gelem/s = GFLOP/s**. Before the matmul
//! group runs, a quick timing prints one `GFLOP/s` summary line per case.
//! For the training step one element is one token (B*T per step), so
//! elem/s = tokens/s.
//!
//! Sample sizes are kept small so the whole suite finishes in a few minutes
//! on a 2-core machine.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use crystalline::kernels::adamw::AdamW;
use crystalline::kernels::attention::{attention_backward, attention_forward};
use crystalline::kernels::crossentropy::crossentropy_fused;
use crystalline::kernels::bf16::{bf16_gemm, bf16_hardware, to_bf16, Operand, Precision};
use crystalline::kernels::matmul::{product, sgemm};
use crystalline::model::{Activations, Config, Gpt2, WeightUse};
use crystalline::optim::Optimizer;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Deterministic pseudo-random 64-bit values (xorshift), so the benches need
/// no RNG setup and every run sees the same data.
fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    std::iter::repeat_with(move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    })
}

/// `n` floats in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    xorshift(seed).take(n).map(|s| ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect()
}

/// `n` token ids below `v`.
fn rand_ids(n: usize, v: usize, seed: u64) -> Vec<u32> {
    xorshift(seed).take(n).map(|s| (s % v as u64) as u32).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon pool")
}

/// Run `f` on the calling thread (threads = 1) or inside `pool`.
fn run_with<R: Send>(pool: &rayon::ThreadPool, threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads <= 1 {
        f()
    } else {
        pool.install(f)
    }
}

const THREADS: [usize; 2] = [1, 2];

/// (label, m, n, k): c[m,n] = a[m,k] @ b[k,n]
const MATMUL_SHAPES: [(&str, usize, usize, usize); 2] =
    [("2048x2048x2048", 2048, 2048, 2048), ("4096x384@384x1152", 4096, 1152, 384)];

fn bench_matmul(c: &mut Criterion) {
    let pool2 = pool(2);
    // One-line GFLOP/s summaries from a quick timing (median of 5).
    for &(label, m, n, k) in &MATMUL_SHAPES {
        let a = rand_vec(m * k, 1);
        let b = rand_vec(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        for threads in THREADS {
            let mut times: Vec<f64> = (0..6)
                .map(|_| {
                    let t0 = Instant::now();
                    run_with(&pool2, threads, || sgemm(m, n, k, &a, false, &b, false, &mut out, false, threads));
                    t0.elapsed().as_secs_f64()
                })
                .skip(1) // first run warms caches and the pool
                .collect();
            times.sort_by(|x, y| x.partial_cmp(y).unwrap());
            let gflops = 2.0 * (m * n * k) as f64 / times[times.len() / 2] / 1e9;
            println!("sgemm {label} threads={threads}: {gflops:.1} GFLOP/s (quick timing, median of 5)");
        }
    }

    let mut group = c.benchmark_group("matmul");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    group.sampling_mode(SamplingMode::Flat);
    for &(label, m, n, k) in &MATMUL_SHAPES {
        let a = rand_vec(m * k, 1);
        let b = rand_vec(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        // One element = one FLOP: Gelem/s reads as GFLOP/s.
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for threads in THREADS {
            group.bench_with_input(BenchmarkId::new(format!("sgemm_{label}_flops"), format!("threads={threads}")), &threads, |bch, &threads| {
                bch.iter(|| {
                    run_with(&pool2, threads, || {
                        sgemm(m, n, k, black_box(&a), false, black_box(&b), false, &mut out, false, threads)
                    });
                    black_box(&out);
                })
            });
        }
        if !bf16_hardware() {
            continue;
        }
        // b rounded once beforehand, as training does with the weights
        let b16: Vec<u16> = b.iter().map(|&x| to_bf16(x)).collect();
        for threads in THREADS {
            group.bench_with_input(BenchmarkId::new(format!("bf16_{label}_flops"), format!("threads={threads}")), &threads, |bch, &threads| {
                bch.iter(|| {
                    run_with(&pool2, threads, || {
                        bf16_gemm(m, n, k, Operand::F32(black_box(&a)), false, Operand::Bf16(black_box(&b16)), false, &mut out, false, threads)
                    });
                    black_box(&out);
                })
            });
        }
    }
    if !bf16_hardware() {
        println!("bf16 matmul benchmarks skipped: this CPU lacks avx512_bf16");
    }
    group.finish();
}

/// The seed config's output layer while decoding: rows of x times wte^T,
/// [m, 384] @ [30000, 384]^T, through `product` (the few-rows path where
/// the CPU has AVX-512) against the general `sgemm`. One element is one
/// byte of weight read, so Gelem/s reads as GB/s of w.
fn bench_decode_head(c: &mut Criterion) {
    let (n, k) = (30000, 384);
    let w = rand_vec(n * k, 3);
    let w16: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
    let pool2 = pool(2);
    let mut group = c.benchmark_group("decode_head_30000x384");
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for m in [1, 4, 16] {
        let x = rand_vec(m * k, 4);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((4 * n * k) as u64));
        group.bench_function(BenchmarkId::new("sgemm_f32", format!("rows={m}")), |bch| {
            bch.iter(|| run_with(&pool2, 2, || sgemm(m, n, k, black_box(&x), false, black_box(&w), true, &mut out, false, 2)))
        });
        group.bench_function(BenchmarkId::new("product_f32", format!("rows={m}")), |bch| {
            bch.iter(|| run_with(&pool2, 2, || product(m, n, k, black_box(&x), false, Operand::F32(black_box(&w)), true, &mut out, false, 2)))
        });
        group.throughput(Throughput::Elements((2 * n * k) as u64));
        group.bench_function(BenchmarkId::new("product_bf16", format!("rows={m}")), |bch| {
            bch.iter(|| run_with(&pool2, 2, || product(m, n, k, black_box(&x), false, Operand::Bf16(black_box(&w16)), true, &mut out, false, 2)))
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let (ch, nh) = (384usize, 12usize);
    let pool2 = pool(2);
    // 4096 tokens at every length, as in training at equal tokens per step
    for (b, t) in [(32usize, 128usize), (4, 1024), (1, 4096)] {
        let qkv = rand_vec(b * t * 3 * ch, 3);
        let dout = rand_vec(b * t * ch, 4);
        let mut out = vec![0.0f32; b * t * ch];
        let mut lse = vec![0.0f32; b * nh * t];
        let mut dqkv = vec![0.0f32; b * t * 3 * ch];
        let mut group = c.benchmark_group(format!("attention_B{b}_T{t}_C384_NH12"));
        group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        // One element = one token: elem/s = tokens/s.
        group.throughput(Throughput::Elements((b * t) as u64));
        for threads in THREADS {
            group.bench_with_input(BenchmarkId::new("forward+backward", format!("threads={threads}")), &threads, |bch, &threads| {
                bch.iter(|| {
                    run_with(&pool2, threads, || {
                        attention_forward(&mut out, &mut lse, black_box(&qkv), b, t, ch, nh, threads);
                        dqkv.fill(0.0);
                        attention_backward(&mut dqkv, black_box(&dout), &qkv, &out, &lse, b, t, ch, nh, threads);
                    });
                    black_box(&dqkv);
                })
            });
        }
        group.finish();
    }
}

fn bench_crossentropy(c: &mut Criterion) {
    let (n, v) = (256usize, 30000usize);
    let logits0 = rand_vec(n * v, 5);
    let targets = rand_ids(n, v, 6);

    let mut group = c.benchmark_group("crossentropy_fused_N256_V30000");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    // One element = one logit.
    group.throughput(Throughput::Elements((n * v) as u64));
    group.bench_function("fused", |bch| {
        // The kernel overwrites logits with gradients: each iteration gets a
        // fresh copy, made outside the timed routine.
        bch.iter_batched_ref(
            || logits0.clone(),
            |logits| black_box(crossentropy_fused(logits, black_box(&targets), 1.0 / n as f32, n, v)),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_train_step(c: &mut Criterion) {
    let config = Config { vocab_size: 4096, n_embd: 128, n_layer: 4, n_head: 4, block_size: 128 };
    let (b, t) = (8usize, 128usize);
    let pool2 = pool(2);
    let x = rand_ids(b * t, config.vocab_size, 7);
    let y = rand_ids(b * t, config.vocab_size, 8);
    let hp = AdamW::default();

    let mut group = c.benchmark_group("train_step_V4096_C128_L4_NH4_B8_T128");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    group.sampling_mode(SamplingMode::Flat);
    // One element = one token: elem/s = tokens/s.
    group.throughput(Throughput::Elements((b * t) as u64));
    // float32, then bf16 where the CPU has it (the weights rounded and
    // packed after each update, as the trainer does)
    let precisions = if bf16_hardware() { &[Precision::Fp32, Precision::Bf16][..] } else { &[Precision::Fp32][..] };
    for &precision in precisions {
        for threads in THREADS {
            let mut model = Gpt2::new(config, 0).expect("valid config");
            model.set_precision(precision, WeightUse::Training);
            let mut acts = Activations::new(&config, b, t);
            let mut grads = vec![0.0f32; model.layout.total];
            let mut opt = Optimizer::new(&model.layout);
            let name = match precision {
                Precision::Fp32 => "step_tokens",
                Precision::Bf16 => "step_tokens_bf16",
            };
            group.bench_with_input(BenchmarkId::new(name, format!("threads={threads}")), &threads, |bch, &threads| {
                bch.iter(|| {
                    run_with(&pool2, threads, || {
                        grads.fill(0.0);
                        let loss = model.loss_sum(&mut acts, &x, &y, Some(&mut grads), 1.0 / (b * t) as f32, threads);
                        opt.update(&model.layout, &mut model.params, &grads, &hp);
                        model.cast_weights();
                        black_box(loss)
                    })
                })
            });
        }
    }
    if !bf16_hardware() {
        println!("bf16 training step skipped: this CPU lacks avx512_bf16");
    }
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_decode_head, bench_attention, bench_crossentropy, bench_train_step);
criterion_main!(benches);
