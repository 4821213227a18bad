//! `matmul` equals `vec_dot` per (row, token) pair for every type, odd row and token
//! counts, strided outputs, and every ISA this machine has.

mod common;

use common::*;
use edgefusion_kernels::cpu::Isa;
use edgefusion_kernels::{
    matmul, matmul_on, quantize_row, vec_dot_on, vec_dot_type, BatchPart, GgmlType,
};

/// As in the vec_dot tests: the tiled kernels sum exact integer block dots in another
/// order than the scalar reference.
const SUMMATION_REL_TOL: f64 = 1e-5;

/// Row and token counts: odd, smaller than and not multiples of the tile sizes (4×1, 2×4).
const SHAPES: [(usize, usize); 8] = [
    (1, 1),
    (3, 1),
    (7, 1),
    (17, 1),
    (1, 5),
    (3, 2),
    (5, 7),
    (6, 4),
];

struct Case {
    k: usize,
    n_rows: usize,
    n_tok: usize,
    w: Vec<u8>,
    act: Vec<u8>,
    act_row_bytes: usize,
}

fn case(
    ty: GgmlType,
    k: usize,
    n_rows: usize,
    n_tok: usize,
    rng: &mut XorShift,
    exact: bool,
) -> Case {
    let act_ty = vec_dot_type(ty);
    let act_row_bytes = act_ty.row_bytes(k).unwrap();
    let mut w = Vec::new();
    let mut act = Vec::new();
    for _ in 0..n_rows {
        if exact {
            let code_max = if ty == GgmlType::Q8_0 { 31 } else { 127 };
            w.extend(exact_row(ty, k, rng, code_max));
        } else if ty.block_size() == 256 {
            w.extend(quantize(ty, &weight_like(k, rng.next_u64())));
        } else {
            w.extend(random_row(ty, k, rng));
        }
    }
    for _ in 0..n_tok {
        if exact {
            act.extend(exact_act(ty, k, rng));
        } else {
            let mut row = vec![0u8; act_row_bytes];
            quantize_row(act_ty, &activation_like(k, rng.next_u64()), &mut row);
            act.extend(row);
        }
    }
    Case {
        k,
        n_rows,
        n_tok,
        w,
        act,
        act_row_bytes,
    }
}

/// Runs `matmul_on(isa)` into a strided buffer full of NaN sentinels, checks the gaps are
/// untouched, and returns `[t][r]`.
fn run(isa: Isa, ty: GgmlType, c: &Case) -> Vec<Vec<f32>> {
    let stride = c.n_rows + 3;
    let mut out = vec![f32::NAN; (c.n_tok - 1) * stride + c.n_rows];
    let part = BatchPart::whole(c.n_tok);
    matmul_on(
        isa, ty, c.k, &c.w, c.n_rows, &c.act, c.n_tok, &mut out, stride, part,
    );
    for t in 0..c.n_tok.saturating_sub(1) {
        for gap in &out[t * stride + c.n_rows..(t + 1) * stride] {
            assert!(
                gap.is_nan(),
                "{} on {}: wrote outside the rows",
                ty.name(),
                isa.name()
            );
        }
    }
    (0..c.n_tok)
        .map(|t| out[t * stride..t * stride + c.n_rows].to_vec())
        .collect()
}

/// Weight row `r` and activation row `t` of a case.
fn pair(ty: GgmlType, c: &Case, r: usize, t: usize) -> (&[u8], &[u8]) {
    let rb = ty.row_bytes(c.k).unwrap();
    let w = &c.w[r * rb..(r + 1) * rb];
    let a = &c.act[t * c.act_row_bytes..(t + 1) * c.act_row_bytes];
    (w, a)
}

fn reference(ty: GgmlType, c: &Case, r: usize, t: usize) -> (f32, f64) {
    let (w, a) = pair(ty, c, r, t);
    (
        vec_dot_on(Isa::Scalar, ty, c.k, w, a),
        l1_magnitude(ty, c.k, w, a),
    )
}

#[test]
fn matmul_matches_vec_dot_per_pair_for_every_type() {
    let mut rng = XorShift(0xA11);
    for ty in GgmlType::ALL {
        let ks: &[usize] = if ty.block_size() == 256 {
            &[256, 512]
        } else {
            &[32, 96, 160, 576]
        };
        for &k in ks {
            for (n_rows, n_tok) in SHAPES {
                let c = case(ty, k, n_rows, n_tok, &mut rng, false);
                for isa in isas() {
                    let got = run(isa, ty, &c);
                    for (t, got_t) in got.iter().enumerate() {
                        for (r, &got_tr) in got_t.iter().enumerate() {
                            let (want, l1) = reference(ty, &c, r, t);
                            let tol = SUMMATION_REL_TOL * l1 + 1e-30;
                            assert!(
                                (got_tr as f64 - want as f64).abs() <= tol,
                                "{} on {} k={k} {n_rows}x{n_tok} [t{t} r{r}]: {} vs {want}",
                                ty.name(),
                                isa.name(),
                                got_tr
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn tiled_matmul_is_exact_when_every_partial_sum_is_an_integer() {
    let mut rng = XorShift(0xB0B);
    for ty in OWN_TYPES {
        for k in [32, 96, 128, 160, 224, 576, 1536] {
            for (n_rows, n_tok) in [(5, 1), (9, 1), (3, 5), (4, 4)] {
                let c = case(ty, k, n_rows, n_tok, &mut rng, true);
                for isa in isas() {
                    let got = run(isa, ty, &c);
                    for (t, got_t) in got.iter().enumerate() {
                        for (r, &got_tr) in got_t.iter().enumerate() {
                            let (want, _) = reference(ty, &c, r, t);
                            assert_eq!(
                                got_tr,
                                want,
                                "{} on {} k={k} {n_rows}x{n_tok} [t{t} r{r}]",
                                ty.name(),
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn large_prefill_crosses_row_chunks() {
    // More rows than one L1 row chunk (16 KiB of weights) and more tokens than one tile.
    let mut rng = XorShift(0xC4);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::F16,
    ] {
        let c = case(ty, 576, 70, 9, &mut rng, true);
        let got = run(edgefusion_kernels::cpu::isa(), ty, &c);
        for (t, got_t) in got.iter().enumerate() {
            for (r, &got_tr) in got_t.iter().enumerate() {
                assert_eq!(
                    got_tr,
                    reference(ty, &c, r, t).0,
                    "{} [t{t} r{r}]",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn empty_shapes_write_nothing() {
    let mut out = vec![1.5f32; 4];
    matmul(GgmlType::Q4_0, 32, &[], 0, &[0u8; 34], 1, &mut out, 0);
    matmul(GgmlType::Q4_0, 32, &[0u8; 18], 1, &[], 0, &mut out, 1);
    assert!(out.iter().all(|&v| v == 1.5));
}

#[test]
#[should_panic(expected = "output needs")]
fn short_output_is_rejected() {
    let mut out = vec![0.0f32; 3];
    matmul(
        GgmlType::Q8_0,
        32,
        &[0u8; 68],
        2,
        &[0u8; 68],
        2,
        &mut out,
        2,
    );
}

/// llama.cpp's AVX2 dot product of one Q4_1 / Q5_0 / Q5_1 / Q8_0 row with one activation row,
/// written out lane by lane: integer lane `l` of a block sums its weights `4l..4l + 4`; each
/// lane adds `fma(d_w · d_a, lane, acc)` block after block; the lanes are added as its
/// `hsum_float_8`; the min term `m_w · s_a` (Q4_1, Q5_1) runs on its own fused chain, added
/// last.
fn llama_cpp_avx2_dot(ty: GgmlType, k: usize, w: &[u8], act: &[u8]) -> f32 {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let (w_bytes, a_bytes) = match ty {
        GgmlType::Q4_1 => (20, 36),
        GgmlType::Q5_0 => (22, 34),
        GgmlType::Q5_1 => (24, 36),
        _ => (34, 34),
    };
    let with_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    let mut lanes = [0.0f32; 8];
    let mut min_chain = 0.0f32;
    for b in 0..k / 32 {
        let wb = &w[b * w_bytes..(b + 1) * w_bytes];
        let ab = &act[b * a_bytes..(b + 1) * a_bytes];
        let codes: Vec<i32> = match ty {
            GgmlType::Q8_0 => wb[2..34].iter().map(|&c| c as i8 as i32).collect(),
            _ => {
                let (qh, qs) = match ty {
                    GgmlType::Q4_1 => (0u32, &wb[4..20]),
                    GgmlType::Q5_0 => {
                        (u32::from_le_bytes(wb[2..6].try_into().unwrap()), &wb[6..22])
                    }
                    _ => (u32::from_le_bytes(wb[4..8].try_into().unwrap()), &wb[8..24]),
                };
                (0..32)
                    .map(|i| {
                        let nibble = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 } as i32;
                        let fifth = ((qh >> i) & 1) as i32 * 16;
                        let code = nibble + if ty == GgmlType::Q4_1 { 0 } else { fifth };
                        if ty == GgmlType::Q5_0 {
                            code - 16
                        } else {
                            code
                        }
                    })
                    .collect()
            }
        };
        let a_codes = &ab[a_bytes - 32..];
        let scale = f16(&wb[0..2]) * f16(&ab[0..2]);
        for (l, lane) in lanes.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|i| codes[i] * a_codes[i] as i8 as i32)
                .sum();
            *lane = scale.mul_add(sum as f32, *lane);
        }
        if with_min {
            min_chain = f16(&wb[2..4]).mul_add(f16(&ab[2..4]), min_chain);
        }
    }
    let x: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    let sum = (x[0] + x[2]) + (x[1] + x[3]);
    if with_min {
        sum + min_chain
    } else {
        sum
    }
}

/// On AVX2, the formats llama.cpp does not repack sum in its order: `matmul` (every tile
/// shape, prompt and decode) and `vec_dot` both equal [`llama_cpp_avx2_dot`] bit for bit.
#[test]
fn avx2_dots_follow_llama_cpp_order_bit_for_bit() {
    if !isas().contains(&Isa::Avx2) {
        eprintln!("SKIPPED: no AVX2 on this machine");
        return;
    }
    let mut rng = XorShift(0x31);
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        for k in [32, 576, 1536] {
            for (n_rows, n_tok) in SHAPES {
                let c = case(ty, k, n_rows, n_tok, &mut rng, false);
                let got = run(Isa::Avx2, ty, &c);
                for (t, got_t) in got.iter().enumerate() {
                    for (r, &got_tr) in got_t.iter().enumerate() {
                        let (w, a) = pair(ty, &c, r, t);
                        let want = llama_cpp_avx2_dot(ty, k, w, a);
                        let single = vec_dot_on(Isa::Avx2, ty, k, w, a);
                        assert_eq!(
                            got_tr.to_bits(),
                            want.to_bits(),
                            "{ty:?} k {k} matmul [{t}][{r}]"
                        );
                        assert_eq!(
                            single.to_bits(),
                            want.to_bits(),
                            "{ty:?} k {k} vec_dot [{t}][{r}]"
                        );
                    }
                }
            }
        }
    }
}

/// K-quant matmuls give each token the order llama.cpp runs for its place in the batch, as
/// `kquants::vec_dot_in_order_on` computes it for that token alone, bit for bit, whatever
/// part of the batch a call holds (so through the four-token kernels and the single ones).
#[test]
fn kquant_matmul_gives_each_token_its_batch_order() {
    use edgefusion_kernels::kquants::{vec_dot_in_order_on, KDotOrder};
    let mut rng = XorShift(0x4B);
    for ty in [GgmlType::Q4K, GgmlType::Q6K] {
        let (k, n_rows, batch) = (512, 5, 11);
        let c = case(ty, k, n_rows, batch, &mut rng, false);
        for isa in isas() {
            for (first, n_tok) in [(0, 11), (0, 9), (2, 7), (8, 3), (0, 4), (5, 1)] {
                let act = &c.act[first * c.act_row_bytes..(first + n_tok) * c.act_row_bytes];
                let mut out = vec![f32::NAN; n_tok * n_rows];
                let part = BatchPart { first, batch };
                matmul_on(isa, ty, k, &c.w, n_rows, act, n_tok, &mut out, n_rows, part);
                for t in 0..n_tok {
                    let order = KDotOrder::for_token(ty, first + t, batch);
                    for r in 0..n_rows {
                        let (w, a) = pair(ty, &c, r, first + t);
                        let want = vec_dot_in_order_on(isa, ty, order, k, w, a);
                        assert_eq!(
                            out[t * n_rows + r].to_bits(),
                            want.to_bits(),
                            "{ty:?} on {} part {first}+{n_tok} of {batch} [t{t} r{r}]",
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}
