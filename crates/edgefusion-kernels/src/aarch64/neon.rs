//! NEON kernels: f32 ops and the Q4_0 · Q8_0, Q4_1 · Q8_1, Q8_0 · Q8_0 dots. Integer dots
//! widen with `vmull_s8` (i8·i8 fits i16) and pairwise-accumulate into i32 lanes, so each
//! block's integer sum is exact; the block scale is applied once per block in f32.

use std::arch::aarch64::*;

use crate::formats::f16_to_f32;

/// The f16 at `p` (any alignment) as f32.
///
/// # Safety
/// `p` must be readable for 2 bytes.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees `p` is readable for 2 bytes (`p` and `p + 1`).
    unsafe { f16_to_f32([*p, *p.add(1)]) }
}

/// Σ a[i]·b[i] over `n` floats (any alignment).
///
/// # Safety
/// `a` and `b` readable for `n` floats.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: NEON is guaranteed by the caller (it is always present on aarch64; dispatch
    // checks `Isa::Neon`); `a` and `b` are readable for `n` floats and every load is below
    // `n` (`i + 4·j + 4 ≤ i + 16 ≤ n`, then `i + 4 ≤ n`, then `i < n`).
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (j, lane) in acc.iter_mut().enumerate() {
                *lane = vfmaq_f32(
                    *lane,
                    vld1q_f32(a.add(i + 4 * j)),
                    vld1q_f32(b.add(i + 4 * j)),
                );
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(a.add(i)), vld1q_f32(b.add(i)));
            i += 4;
        }
        let mut sum = vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
        while i < n {
            sum = a
                .add(i)
                .read_unaligned()
                .mul_add(b.add(i).read_unaligned(), sum);
            i += 1;
        }
        sum
    }
}

/// y[i] += alpha · x[i] over `n` floats.
///
/// # Safety
/// `x` readable and `y` writable for `n` floats.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn axpy_f32(alpha: f32, x: *const f32, y: *mut f32, n: usize) {
    // SAFETY: NEON is guaranteed by the caller (it is always present on aarch64; dispatch checks
    // `Isa::Neon`); `x` is readable and `y` writable for `n` floats, and every access is below `n`
    // (`i + 4 ≤ n` in the vector loop, `i < n` in the tail).
    unsafe {
        let mut i = 0;
        while i + 4 <= n {
            vst1q_f32(
                y.add(i),
                vfmaq_n_f32(vld1q_f32(y.add(i)), vld1q_f32(x.add(i)), alpha),
            );
            i += 4;
        }
        while i < n {
            *y.add(i) = alpha.mul_add(*x.add(i), *y.add(i));
            i += 1;
        }
    }
}

/// x[i] *= s over `n` floats.
///
/// # Safety
/// `x` writable for `n` floats.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn scale_f32(x: *mut f32, s: f32, n: usize) {
    // SAFETY: NEON is guaranteed by the caller (it is always present on aarch64; dispatch checks
    // `Isa::Neon`); `x` is writable for `n` floats and every access is below `n` (`i + 4 ≤ n`, then
    // `i < n`).
    unsafe {
        let mut i = 0;
        while i + 4 <= n {
            vst1q_f32(x.add(i), vmulq_n_f32(vld1q_f32(x.add(i)), s));
            i += 4;
        }
        while i < n {
            *x.add(i) *= s;
            i += 1;
        }
    }
}

/// Σ x·y over 16 signed byte pairs, into four i32 lanes.
///
/// # Safety
/// NEON must be available (always true on aarch64); callers are this module's
/// `#[target_feature(enable = "neon")]` kernels.
#[inline(always)]
unsafe fn dot16(x: int8x16_t, y: int8x16_t) -> int32x4_t {
    // SAFETY: the caller guarantees NEON (this fn's contract); only registers are touched.
    unsafe {
        let low = vmull_s8(vget_low_s8(x), vget_low_s8(y));
        let high = vmull_high_s8(x, y);
        vpadalq_s16(vpaddlq_s16(low), high)
    }
}

/// Q4_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// `w` readable for `18·nb` bytes, `act` for `34·nb`.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn vec_dot_q4_0_q8_0(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: NEON is guaranteed by the caller (it is always present on aarch64; dispatch checks
    // `Isa::Neon`); `w` holds `nb` 18-byte blocks and `act` `nb` 34-byte blocks, and block `b < nb`
    // is read only within `w[18b..18(b+1)]` and `act[34b..34(b+1)]`.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        let low4 = vdupq_n_u8(0x0F);
        let eight = vdupq_n_s8(8);
        for b in 0..nb {
            let wb = w.add(18 * b);
            let ab = act.add(34 * b);
            let codes = vld1q_u8(wb.add(2));
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(codes, low4)), eight);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(codes)), eight);
            let y_lo = vld1q_s8(ab.add(2).cast());
            let y_hi = vld1q_s8(ab.add(18).cast());
            let sums = vaddq_s32(dot16(lo, y_lo), dot16(hi, y_hi));
            let scale = f16_at(wb) * f16_at(ab);
            acc[b % 2] = vfmaq_n_f32(acc[b % 2], vcvtq_f32_s32(sums), scale);
        }
        vaddvq_f32(vaddq_f32(acc[0], acc[1]))
    }
}

/// Q4_1 · Q8_1 over `nb` blocks.
///
/// # Safety
/// `w` readable for `20·nb` bytes, `act` for `36·nb`.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn vec_dot_q4_1_q8_1(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: NEON is guaranteed by the caller (it is always present on aarch64; dispatch checks
    // `Isa::Neon`); `w` holds `nb` 20-byte blocks and `act` `nb` 36-byte blocks, and block `b < nb`
    // is read only within `w[20b..20(b+1)]` and `act[36b..36(b+1)]`.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut offsets = 0.0f32;
        let low4 = vdupq_n_u8(0x0F);
        for b in 0..nb {
            let wb = w.add(20 * b);
            let ab = act.add(36 * b);
            let codes = vld1q_u8(wb.add(4));
            let lo = vreinterpretq_s8_u8(vandq_u8(codes, low4));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(codes));
            let y_lo = vld1q_s8(ab.add(4).cast());
            let y_hi = vld1q_s8(ab.add(20).cast());
            let sums = vaddq_s32(dot16(lo, y_lo), dot16(hi, y_hi));
            let scale = f16_at(wb) * f16_at(ab);
            acc[b % 2] = vfmaq_n_f32(acc[b % 2], vcvtq_f32_s32(sums), scale);
            offsets = f16_at(wb.add(2)).mul_add(f16_at(ab.add(2)), offsets);
        }
        vaddvq_f32(vaddq_f32(acc[0], acc[1])) + offsets
    }
}

/// Q8_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// `w` and `act` readable for `34·nb` bytes.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn vec_dot_q8_0_q8_0(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: NEON is guaranteed by the caller (it is always present on aarch64; dispatch checks
    // `Isa::Neon`); `w` holds `nb` 34-byte blocks and `act` `nb` 34-byte blocks, and block `b < nb`
    // is read only within `w[34b..34(b+1)]` and `act[34b..34(b+1)]`.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        for b in 0..nb {
            let wb = w.add(34 * b);
            let ab = act.add(34 * b);
            let x0 = vld1q_s8(wb.add(2).cast());
            let x1 = vld1q_s8(wb.add(18).cast());
            let y0 = vld1q_s8(ab.add(2).cast());
            let y1 = vld1q_s8(ab.add(18).cast());
            let sums = vaddq_s32(dot16(x0, y0), dot16(x1, y1));
            let scale = f16_at(wb) * f16_at(ab);
            acc[b % 2] = vfmaq_n_f32(acc[b % 2], vcvtq_f32_s32(sums), scale);
        }
        vaddvq_f32(vaddq_f32(acc[0], acc[1]))
    }
}
