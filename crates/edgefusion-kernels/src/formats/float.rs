//! Plain float rows: F32, F16 and BF16, one little-endian value per weight. Their activation
//! partner is an F32 row (its bytes, little-endian), so their dots are float dots.

/// Checks that `bytes` holds `n` values of `width` bytes.
///
/// # Panics
/// If it does not (a caller bug).
#[inline]
fn check_len(what: &str, bytes: &[u8], n: usize, width: usize) {
    assert!(
        bytes.len() >= n * width,
        "{what} row of {n} values needs {} bytes, got {}",
        n * width,
        bytes.len()
    );
}

/// f32 number `i` of a little-endian byte row.
#[inline]
pub fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([
        bytes[4 * i],
        bytes[4 * i + 1],
        bytes[4 * i + 2],
        bytes[4 * i + 3],
    ])
}

/// BF16 bits to f32; exact (bf16 is the top half of an f32).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to BF16 bits, round to nearest even, NaN kept quiet (as `GGML_FP32_TO_BF16`).
#[inline]
pub fn f32_to_bf16(value: f32) -> u16 {
    half::bf16::from_f32(value).to_bits()
}

/// Writes `x` as little-endian f32 bytes.
///
/// # Panics
/// If `out` is shorter than `4 · x.len()`.
pub fn quantize_row_f32(x: &[f32], out: &mut [u8]) {
    check_len("F32", out, x.len(), 4);
    for (o, v) in out.chunks_exact_mut(4).zip(x) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// Reads `out.len()` little-endian f32 values from `src`.
///
/// # Panics
/// If `src` is shorter than the row.
pub fn dequantize_row_f32(src: &[u8], out: &mut [f32]) {
    check_len("F32", src, out.len(), 4);
    for (y, b) in out.iter_mut().zip(src.chunks_exact(4)) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Writes `x` as little-endian IEEE halves (round to nearest even).
///
/// # Panics
/// If `out` is shorter than `2 · x.len()`.
pub fn quantize_row_f16(x: &[f32], out: &mut [u8]) {
    check_len("F16", out, x.len(), 2);
    for (o, &v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
    }
}

/// Reads `out.len()` little-endian IEEE halves from `src`.
///
/// # Panics
/// If `src` is shorter than the row.
pub fn dequantize_row_f16(src: &[u8], out: &mut [f32]) {
    check_len("F16", src, out.len(), 2);
    for (y, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        *y = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// Writes `x` as little-endian BF16 (round to nearest even).
///
/// # Panics
/// If `out` is shorter than `2 · x.len()`.
pub fn quantize_row_bf16(x: &[f32], out: &mut [u8]) {
    check_len("BF16", out, x.len(), 2);
    for (o, &v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
    }
}

/// Reads `out.len()` little-endian BF16 values from `src`.
///
/// # Panics
/// If `src` is shorter than the row.
pub fn dequantize_row_bf16(src: &[u8], out: &mut [f32]) {
    check_len("BF16", src, out.len(), 2);
    for (y, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        *y = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

/// Scalar reference of F32 · F32 over `n` values, summed in order.
///
/// # Panics
/// If a row is shorter than `n` values.
pub fn vec_dot_f32_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    check_len("F32", w, n, 4);
    check_len("F32", act, n, 4);
    (0..n).map(|i| f32_at(w, i) * f32_at(act, i)).sum()
}

/// Scalar reference of F16 · F32 over `n` values, summed in order.
///
/// # Panics
/// If a row is shorter than `n` values.
pub fn vec_dot_f16_f32_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    check_len("F16", w, n, 2);
    check_len("F32", act, n, 4);
    (0..n)
        .map(|i| {
            let h = half::f16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]]));
            h.to_f32() * f32_at(act, i)
        })
        .sum()
}

/// Scalar reference of BF16 · F32 over `n` values, summed in order.
///
/// # Panics
/// If a row is shorter than `n` values.
pub fn vec_dot_bf16_f32_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    check_len("BF16", w, n, 2);
    check_len("F32", act, n, 4);
    (0..n)
        .map(|i| bf16_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])) * f32_at(act, i))
        .sum()
}
