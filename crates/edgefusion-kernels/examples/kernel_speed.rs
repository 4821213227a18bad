//! Single-thread kernel throughput: GB/s of weights streamed by `matmul` (one token, the
//! decode shape) and by `vec_dot` per row, for Q4_0 / Q4_1 / Q8_0 / F16 at k = 576 and 1536,
//! on every ISA this machine has; then prefill (64 tokens) throughput in GMAC/s.
//!
//! Decode runs twice: over 2 048 rows (weights resident in L2: the kernels' compute speed)
//! and over 49 152 rows (SmolLM2-135M's vocabulary: streamed from memory). Timings are the
//! best of many repetitions, which filters out preemption on a shared machine.
//!
//! `cargo run --release -p edgefusion-kernels --example kernel_speed [-- --types Q5_0,Q8_0
//! --k 640 --rows 262144]`: other formats, widths, and the streamed row count (Gemma 3's
//! vocabulary is 262 144).

use std::time::Instant;

use edgefusion_kernels::cpu::{self, Isa};
use edgefusion_kernels::{matmul_on, quantize_row, vec_dot_on, vec_dot_type, BatchPart, GgmlType};

/// Row count and repetitions of the L2-resident decode run.
const RESIDENT_ROWS: (usize, usize) = (2_048, 200);

/// What to measure: the command line's `--types`, `--k` and `--rows` (streamed rows).
struct Options {
    types: Vec<GgmlType>,
    widths: Vec<usize>,
    streamed_rows: usize,
}

fn options() -> Options {
    let mut opts = Options {
        types: vec![
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::F16,
        ],
        widths: vec![576, 1536],
        streamed_rows: 49_152,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            panic!("kernel_speed: {} needs a value", pair[0])
        };
        match flag.as_str() {
            "--types" => {
                opts.types = value
                    .split(',')
                    .map(|name| {
                        GgmlType::ALL
                            .into_iter()
                            .find(|t| t.name().eq_ignore_ascii_case(name))
                            .unwrap_or_else(|| panic!("kernel_speed: unknown type {name}"))
                    })
                    .collect()
            }
            "--k" => {
                opts.widths = value
                    .split(',')
                    .map(|k| k.parse().expect("--k: widths"))
                    .collect()
            }
            "--rows" => opts.streamed_rows = value.parse().expect("--rows: a row count"),
            _ => panic!("kernel_speed: unknown option {flag} (--types, --k, --rows)"),
        }
    }
    opts
}

fn weights(ty: GgmlType, k: usize, rows: usize) -> Vec<u8> {
    let row: Vec<f32> = (0..k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.001)
        .collect();
    let rb = ty.row_bytes(k).expect("whole blocks");
    let mut w = vec![0u8; rb * rows];
    for (r, chunk) in w.chunks_exact_mut(rb).enumerate() {
        let shifted: Vec<f32> = row.iter().map(|v| v + r as f32 * 1e-6).collect();
        edgefusion_kernels::quantize_row_ref(ty, &shifted, chunk);
    }
    w
}

fn activation(ty: GgmlType, k: usize, n_tok: usize) -> Vec<u8> {
    let act_ty = vec_dot_type(ty);
    let rb = act_ty.row_bytes(k).expect("whole blocks");
    let mut act = vec![0u8; rb * n_tok];
    for (t, chunk) in act.chunks_exact_mut(rb).enumerate() {
        let x: Vec<f32> = (0..k).map(|i| ((i + t) as f32 * 0.37).sin()).collect();
        quantize_row(act_ty, &x, chunk);
    }
    act
}

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let opts = options();
    println!("detected ISA: {}", cpu::isa().name());
    let streamed = (
        opts.streamed_rows,
        (400_000 / opts.streamed_rows).clamp(3, 20),
    );
    for (rows, reps) in [RESIDENT_ROWS, streamed] {
        println!("\ndecode: one token × {rows} rows, single thread, GB/s of weights (ns/row)");
        println!(
            "{:<6} {:>5} {:<11} {:>16} {:>16}",
            "type", "k", "isa", "matmul", "vec_dot"
        );
        for &ty in &opts.types {
            for &k in &opts.widths {
                decode_line(ty, k, rows, reps);
            }
        }
    }
    let (n_rows, n_tok, k) = (1536, 64, opts.widths[0]);
    println!("\nprefill: {n_tok} tokens × {n_rows} rows, k = {k}, single thread, GMAC/s");
    for &ty in &opts.types {
        let w = weights(ty, k, n_rows);
        let act = activation(ty, k, n_tok);
        let mut out = vec![0.0f32; n_rows * n_tok];
        for isa in cpu::available_isas()
            .into_iter()
            .filter(|&i| i != Isa::Scalar)
        {
            let t = best_of(20, || {
                matmul_on(
                    isa,
                    ty,
                    k,
                    &w,
                    n_rows,
                    &act,
                    n_tok,
                    &mut out,
                    n_rows,
                    BatchPart::whole(n_tok),
                )
            });
            let gmac = (n_rows * n_tok * k) as f64 / 1e9;
            println!("{:<6} {:<11} {:>8.1}", ty.name(), isa.name(), gmac / t);
        }
    }
}

/// One decode measurement per ISA: `matmul` over all rows, and `vec_dot` row by row.
fn decode_line(ty: GgmlType, k: usize, rows: usize, reps: usize) {
    let w = weights(ty, k, rows);
    let act = activation(ty, k, 1);
    let rb = ty.row_bytes(k).expect("whole blocks");
    let mut out = vec![0.0f32; rows];
    for isa in cpu::available_isas() {
        let t_mm = best_of(reps, || {
            matmul_on(
                isa,
                ty,
                k,
                &w,
                rows,
                &act,
                1,
                &mut out,
                rows,
                BatchPart::whole(1),
            )
        });
        let t_vd = best_of(reps, || {
            for (r, o) in out.iter_mut().enumerate() {
                *o = vec_dot_on(isa, ty, k, &w[r * rb..(r + 1) * rb], &act);
            }
        });
        let gb = w.len() as f64 / 1e9;
        let ns_per_row = 1e9 / rows as f64;
        println!(
            "{:<6} {:>5} {:<11} {:>8.2} ({:>5.1}) {:>8.2} ({:>5.1})",
            ty.name(),
            k,
            isa.name(),
            gb / t_mm,
            t_mm * ns_per_row,
            gb / t_vd,
            t_vd * ns_per_row
        );
    }
}
