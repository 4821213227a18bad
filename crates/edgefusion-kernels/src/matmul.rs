//! `matmul`: every weight row against every activation row.
//!
//! On x86 the 32-wide integer formats and the float formats run register-tiled kernels over
//! a packed copy of the activations (see `pack`); everything else computes `vec_dot` per
//! (row, token) pair.

use crate::cpu::Isa;
#[cfg(target_arch = "x86_64")]
use crate::formats::QK;
use crate::kquants::KDotOrder;
#[cfg(target_arch = "x86_64")]
use crate::pack::{
    pack_act_scales, pack_byte, pack_nibble, NibbleWeights, BYTE_SCRATCH, NIBBLE_SCRATCH,
    SCALE_SCRATCH,
};
use crate::GgmlType;

/// Checks the buffers of a `matmul` call and returns the weight and activation row bytes.
///
/// # Panics
/// If `k` is not a whole number of blocks or a buffer is too short: caller bugs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_shapes(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &[f32],
    out_stride: usize,
) -> (usize, usize) {
    let act_ty = crate::vec_dot_type(ty);
    let row_bytes = ty.row_bytes(k).unwrap_or_else(|| {
        panic!(
            "matmul: k = {k} is not a whole number of {} blocks",
            ty.name()
        )
    });
    let act_row_bytes = act_ty.row_bytes(k).unwrap_or_else(|| {
        panic!(
            "matmul: k = {k} is not a whole number of {} blocks",
            act_ty.name()
        )
    });
    assert!(
        w.len() >= n_rows * row_bytes,
        "matmul: {n_rows} {} rows of {k} need {} bytes, got {}",
        ty.name(),
        n_rows * row_bytes,
        w.len()
    );
    assert!(
        act.len() >= n_tok * act_row_bytes,
        "matmul: {n_tok} {} activation rows of {k} need {} bytes, got {}",
        act_ty.name(),
        n_tok * act_row_bytes,
        act.len()
    );
    check_out(n_rows, n_tok, out, out_stride);
    (row_bytes, act_row_bytes)
}

/// Checks that `out` holds `n_tok` output rows of `n_rows` values, `out_stride` apart.
///
/// # Panics
/// If it does not: a caller bug.
pub(crate) fn check_out(n_rows: usize, n_tok: usize, out: &[f32], out_stride: usize) {
    if n_tok > 0 && n_rows > 0 {
        assert!(
            n_tok == 1 || out_stride >= n_rows,
            "matmul: out_stride {out_stride} < n_rows {n_rows}"
        );
        let needed = (n_tok - 1) * out_stride + n_rows;
        assert!(
            out.len() >= needed,
            "matmul: output needs {needed} values, got {}",
            out.len()
        );
    }
}

/// Where a call's activation rows sit in the batch of tokens that a step multiplies at once:
/// rows `first..first + n_tok` of `batch`. The runtime splits a batch across threads, and
/// llama.cpp picks its K-quant kernels, so their summation order, by the batch's size and a
/// token's place in it (see [`crate::kquants::KDotOrder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPart {
    /// The batch row of the call's first activation row.
    pub first: usize,
    /// Tokens in the whole batch.
    pub batch: usize,
}

impl BatchPart {
    /// A call that multiplies a whole batch of `n_tok` tokens.
    pub fn whole(n_tok: usize) -> Self {
        BatchPart {
            first: 0,
            batch: n_tok,
        }
    }
}

/// `out[t · out_stride + r] = vec_dot(ty, k, w row r, act row t)` for `r < n_rows`,
/// `t < n_tok` (one whole batch), on the ISA detected at start-up. See [`matmul_on`].
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let part = BatchPart::whole(n_tok);
    matmul_part(ty, k, w, n_rows, act, n_tok, out, out_stride, part);
}

/// [`matmul`] of activation rows that are the part `part` of a batch. See [`matmul_on`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_part(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
    part: BatchPart,
) {
    let isa = crate::cpu::isa();
    matmul_on(isa, ty, k, w, n_rows, act, n_tok, out, out_stride, part);
}

/// [`matmul_part`] with the kernels of `isa`.
///
/// `w` holds `n_rows` rows of `k` weights in `ty`; `act` holds `n_tok` rows of `k` values in
/// `vec_dot_type(ty)`, rows `part.first..` of a batch of `part.batch` tokens. Q4_0, Q4_1,
/// Q5_0, Q5_1, Q8_0, F32, F16 and BF16 weights run tiled SIMD kernels on x86 (AVX2,
/// AVX-512); other types and ISAs compute `vec_dot` per pair (K-quants in the order llama.cpp
/// runs for the token's place in the batch, [`crate::kquants::KDotOrder`]). Results equal
/// `vec_dot` per pair up to float summation order.
///
/// # Panics
/// If `isa` cannot run on this machine, `k` is not a whole number of blocks of `ty`, or a
/// buffer is shorter than the shapes require (`out` needs `(n_tok − 1) · out_stride + n_rows`
/// values and, for `n_tok > 1`, `out_stride ≥ n_rows`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    isa: Isa,
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
    part: BatchPart,
) {
    assert!(
        crate::cpu::is_runnable(isa),
        "matmul_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    let (row_bytes, act_row_bytes) = check_shapes(ty, k, w, n_rows, act, n_tok, out, out_stride);
    debug_assert!(
        part.first + n_tok <= part.batch,
        "matmul: rows {}..{} outside a batch of {}",
        part.first,
        part.first + n_tok,
        part.batch
    );
    if n_rows == 0 || n_tok == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2()
        && tiled_x86(
            isa,
            ty,
            k,
            w,
            n_rows,
            act,
            act_row_bytes,
            n_tok,
            out,
            out_stride,
        )
    {
        return;
    }
    let act_row = |t: usize| &act[t * act_row_bytes..(t + 1) * act_row_bytes];
    let w_row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    let mut t = 0;
    while t < n_tok {
        let order = KDotOrder::for_token(ty, part.first + t, part.batch);
        // Four tokens in the same order at once where a kernel takes them (each order holds
        // a contiguous run of a batch's tokens, so the first and the last decide).
        if t + 4 <= n_tok
            && KDotOrder::for_token(ty, part.first + t + 3, part.batch) == order
            && crate::kquants::takes_four(isa, ty, order)
        {
            let acts = [0, 1, 2, 3].map(|i| act_row(t + i));
            for r in 0..n_rows {
                let sums = crate::kquants::vec_dot4_in_order_on(isa, ty, order, k, w_row(r), acts);
                for (i, s) in sums.into_iter().enumerate() {
                    out[(t + i) * out_stride + r] = s;
                }
            }
            t += 4;
            continue;
        }
        for r in 0..n_rows {
            out[t * out_stride + r] =
                crate::kquants::vec_dot_in_order_on(isa, ty, order, k, w_row(r), act_row(t));
        }
        t += 1;
    }
}

/// Runs the x86 tiled kernel for `ty` if there is one; returns false otherwise.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tiled_x86(
    isa: Isa,
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    act_row_bytes: usize,
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) -> bool {
    use crate::x86::{avx2, avx512};
    let nb = k / QK;
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let weights = match ty {
                GgmlType::Q4_0 => NibbleWeights::Q4_0,
                GgmlType::Q4_1 => NibbleWeights::Q4_1,
                GgmlType::Q5_0 => NibbleWeights::Q5_0,
                _ => NibbleWeights::Q5_1,
            };
            if isa == Isa::Avx2 && weights != NibbleWeights::Q4_0 {
                // On AVX2, Q4_1, Q5_0 and Q5_1 sum in llama.cpp's order, to agree with it to
                // the last bit (its Q4_0 runs repacked kernels of another order).
                SCALE_SCRATCH.with_borrow_mut(|scales| {
                    pack_act_scales(weights.act(), act, act_row_bytes, n_tok, nb, scales);
                    // SAFETY: AVX2 is runnable (checked by the caller); `check_shapes` checked
                    // that `w` holds `n_rows` rows of `nb` blocks, `act` `n_tok` rows of
                    // `act_row_bytes` (blocks of `vec_dot_type(ty)`) and `out` the rows at
                    // `out_stride`; `scales` holds those rows' scales.
                    unsafe {
                        avx2::matmul_nibble_ggml(
                            weights,
                            w,
                            nb,
                            n_rows,
                            act,
                            act_row_bytes,
                            scales,
                            n_tok,
                            out,
                            out_stride,
                        )
                    }
                });
                return true;
            }
            NIBBLE_SCRATCH.with_borrow_mut(|packed| {
                pack_nibble(weights.act(), act, act_row_bytes, n_tok, nb, packed);
                // SAFETY: `isa` is runnable (checked by the caller), shapes were checked by
                // `check_shapes`, and `packed` holds `n_tok · ⌈nb/4⌉` groups of these rows.
                unsafe {
                    match isa {
                        Isa::Avx512Vnni => avx512::matmul_nibble_vnni(
                            weights, w, nb, n_rows, packed, n_tok, out, out_stride,
                        ),
                        Isa::Avx512 => avx512::matmul_nibble_bw(
                            weights, w, nb, n_rows, packed, n_tok, out, out_stride,
                        ),
                        _ => avx2::matmul_nibble(
                            weights, w, nb, n_rows, packed, n_tok, out, out_stride,
                        ),
                    }
                }
            });
            true
        }
        GgmlType::Q8_0 => {
            BYTE_SCRATCH.with_borrow_mut(|packed| {
                pack_byte(act, act_row_bytes, n_tok, nb, packed);
                // SAFETY: as above, with `packed` holding `n_tok · ⌈nb/2⌉` pairs.
                unsafe {
                    match isa {
                        Isa::Avx512Vnni => {
                            avx512::matmul_byte_vnni(w, nb, n_rows, packed, n_tok, out, out_stride)
                        }
                        Isa::Avx512 => {
                            avx512::matmul_byte_bw(w, nb, n_rows, packed, n_tok, out, out_stride)
                        }
                        _ => avx2::matmul_byte(w, nb, n_rows, packed, n_tok, out, out_stride),
                    }
                }
            });
            true
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            // SAFETY: `isa` is runnable and the shapes were checked: `w` holds `n_rows` rows
            // of `k` values of `ty`, `act` `n_tok` f32 rows of `k`.
            unsafe {
                if isa.has_avx512() {
                    avx512::matmul_float(ty, k, w, n_rows, act, n_tok, out, out_stride);
                } else {
                    avx2::matmul_float(ty, k, w, n_rows, act, n_tok, out, out_stride);
                }
            }
            true
        }
        _ => false,
    }
}
