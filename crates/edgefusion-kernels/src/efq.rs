//! EFQ: EdgeFusion's adaptive low-bit matrix format (2- to 8-bit tiles), its 8-bit
//! activation partner and the fused dequantize-and-dot kernels (scalar reference here,
//! AVX-512 VNNI in `x86::efq`, AVX2 in `x86::efq_avx2` for x86 CPUs without VNNI, NEON in
//! `aarch64::efq`).
//!
//! A matrix `(n_out, n_in)` is cut into tiles of 16 rows × 128 columns (the last tile of a
//! row group may be 32, 64 or 96 columns wide). Each tile has one code width from
//! {2, 3, 4, 5, 6, 8} bits ([`WIDTHS`]), chosen by the quantizer; each row's 128-column block
//! inside it has its own 8-bit scale (under the row's f16 scale) and zero point (a nibble in
//! tiles of up to 4 bits, a byte in wider ones):
//!
//! ```text
//! w[r][c] = d_r · s[r][t] · (code[r][c] − z[r][t])  +  outlier[r][c]
//! ```
//!
//! Outliers — a small fraction of weights the quantizer takes out before fitting the
//! blocks (their dense code equals the zero point) — are stored per 16-row group in slots:
//! a slot holds one (column, 6-bit value) pair per row of the group, and a group has as
//! many slots as its row with the most outliers (rows with fewer pad with value 0). Values
//! are `g_scale · v`, v in −31..=31, one f16 scale per group. Slots let the SIMD kernel add
//! 16 rows' outliers with one gather.
//!
//! Codes are stored so that one 64-byte register holds the same four-column quad of all
//! 16 rows (byte `4r + i` = row r, column `4k + i` of quad k), which `vpdpbusd` multiplies
//! with a broadcast 4-byte quad of the activation: see [`code`] for the bit planes. The
//! activation partner, [`ActQ8`], quantizes each 128-column block to i8 with one f32 scale
//! and keeps the block's code sum for the zero-point term.
//!
//! The byte layout of a whole matrix (`docs/FORMAT.md` draws it) is parsed by
//! [`EfqMatrix::parse`], which checks every size and value range, and written by
//! [`EfqParts::to_bytes`].

use crate::cpu::Isa;
use crate::formats::f16_to_f32;

/// Rows per tile (and per row group).
pub const TILE_ROWS: usize = 16;
/// Columns per tile; the last tile of a row may be narrower (a multiple of 32).
pub const TILE_COLS: usize = 128;
/// Columns must be a multiple of this.
pub const COL_ALIGN: usize = 32;
/// Code widths a tile may have: narrow tiles (2–4 bits) serve sub-4-bit budgets, wide ones
/// (5, 6, 8 bits) budgets up to 8 bits per weight in the same format.
pub const WIDTHS: [u8; 6] = [2, 3, 4, 5, 6, 8];
/// Largest outlier magnitude code: values are `scale · v`, |v| ≤ 31 (6 bits with sign).
pub const OUTLIER_MAX: i8 = 31;
/// Magic at the start of a matrix blob.
pub const MAGIC: [u8; 4] = *b"EFQ1";
/// Magic of a version-2 blob: the version-1 layout after a 20-byte header whose last word
/// says how the input dimension is rotated.
pub const MAGIC_V2: [u8; 4] = *b"EFQ2";
/// Bytes of the fixed blob header: magic, n_out, n_in, total outlier slots.
const HEADER_BYTES: usize = 16;
/// Header of a version-2 blob: version 1's plus the rotation word.
const HEADER_BYTES_V2: usize = 20;
/// Rotation word of a version-2 blob whose input dimension is rotated by the randomized
/// Hadamard transform of [`crate::hadamard`] (0: not rotated).
pub const ROTATION_RHT64: u32 = crate::hadamard::BLOCK as u32;
/// Bytes of one outlier slot: 16 u16 columns, then 16 i8 values.
pub const SLOT_BYTES: usize = 3 * TILE_ROWS;

/// What is wrong with a matrix blob or with parts handed to the encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfqFormatError(pub String);

impl std::fmt::Display for EfqFormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EfqFormatError {}

fn bad(msg: impl Into<String>) -> EfqFormatError {
    EfqFormatError(msg.into())
}

/// Whether an `(n_out, n_in)` matrix cuts into whole EFQ tiles: rows in groups of
/// [`TILE_ROWS`], row lengths a multiple of [`COL_ALIGN`].
pub fn tiles(n_out: usize, n_in: usize) -> bool {
    n_out.is_multiple_of(TILE_ROWS) && n_in.is_multiple_of(COL_ALIGN)
}

/// Tiles per row group of a matrix with `n_in` columns.
pub fn n_tiles(n_in: usize) -> usize {
    n_in.div_ceil(TILE_COLS)
}

/// Width in columns of tile `t` of a row with `n_in` columns.
pub fn tile_cols(n_in: usize, t: usize) -> usize {
    (n_in - t * TILE_COLS).min(TILE_COLS)
}

/// Bytes of one tile of `cols` columns with `bits`-bit codes: 16 scales, the zero points
/// ([`zero_bytes`]), then `16 · cols · bits / 8` bytes of codes.
pub fn tile_bytes(bits: u8, cols: usize) -> usize {
    codes_offset(bits) + TILE_ROWS * cols * bits as usize / 8
}

/// Bytes of a tile's zero points: 16 nibbles (row r in nibble r / 8 of byte r % 8) when its
/// codes have at most 4 bits, else one byte per row.
pub fn zero_bytes(bits: u8) -> usize {
    if bits <= 4 {
        TILE_ROWS / 2
    } else {
        TILE_ROWS
    }
}

/// Where a tile's codes start: after its 16 scales and its zero points.
pub fn codes_offset(bits: u8) -> usize {
    TILE_ROWS + zero_bytes(bits)
}

/// Position of `bits` in [`WIDTHS`], if it is a tile width of the format.
pub fn width_index(bits: u8) -> Option<usize> {
    WIDTHS.iter().position(|&w| w == bits)
}

/// Whether `bits` is a tile width of the format.
pub fn is_width(bits: u8) -> bool {
    width_index(bits).is_some()
}

/// Where a tile's codes sit: the one definition of the code planes.
///
/// A tile's codes are a sequence of 64-byte chunks, in column order, each covering every
/// row for a run of quads (4 columns each); byte `4r + i` of a chunk always belongs to row
/// r, column `4k + i` of each quad k it covers:
/// - 2-bit codes: a chunk covers 4 quads; bits `2j..2j+2` of each byte hold quad j.
/// - 3-bit codes: per 8 quads, two 2-bit chunks (low two bits, as above) then one chunk
///   whose bit j holds bit 2 of quad j.
/// - 4-bit codes: a chunk covers 2 quads; the low nibble holds the first, the high nibble
///   the second.
/// - 5-, 6- and 8-bit codes: per 8 quads, the low nibbles as 4 chunks of 4-bit codes, then
///   the high `bits − 4` bits as 1 chunk (bit j: quad j, as 3-bit codes' third bit), 2 chunks
///   of 2-bit codes or 4 chunks of 4-bit codes. A step of 8 quads (32 columns) takes
///   `64 · bits` bytes at every width.
pub mod code {
    use super::TILE_ROWS;

    /// Byte offset inside the code area, and shift, of bit plane `plane` of (row, col)'s
    /// code, for `bits`-bit codes: returns `(byte, shift, mask)` such that the plane's bits
    /// are `(area[byte] >> shift) & mask`, and how many bits up they go in the code.
    pub fn position(bits: u8, row: usize, col: usize, plane: usize) -> (usize, u32, u8, u32) {
        let (quad, i) = (col / 4, col % 4);
        let lane = 4 * row + i;
        debug_assert!(row < TILE_ROWS);
        match (bits, plane) {
            (2, 0) => (64 * (quad / 4) + lane, 2 * (quad % 4) as u32, 0b11, 0),
            (3, 0) => (
                192 * (quad / 8) + 64 * ((quad % 8) / 4) + lane,
                2 * (quad % 4) as u32,
                0b11,
                0,
            ),
            (3, 1) => (192 * (quad / 8) + 128 + lane, (quad % 8) as u32, 0b1, 2),
            (4, 0) => (64 * (quad / 2) + lane, 4 * (quad % 2) as u32, 0b1111, 0),
            (5 | 6 | 8, _) => {
                // Step of 8 quads: 256 bytes of low nibbles, then the high plane.
                let (step, j) = (64 * bits as usize * (quad / 8), quad % 8);
                match (bits, plane) {
                    (_, 0) => (step + 64 * (j / 2) + lane, 4 * (j % 2) as u32, 0b1111, 0),
                    (5, 1) => (step + 256 + lane, j as u32, 0b1, 4),
                    (6, 1) => (
                        step + 256 + 64 * (j / 4) + lane,
                        2 * (j % 4) as u32,
                        0b11,
                        4,
                    ),
                    (8, 1) => (
                        step + 256 + 64 * (j / 2) + lane,
                        4 * (j % 2) as u32,
                        0b1111,
                        4,
                    ),
                    _ => panic!("no plane {plane} for {bits}-bit codes"),
                }
            }
            _ => panic!("no plane {plane} for {bits}-bit codes"),
        }
    }

    /// Bit planes of `bits`-bit codes.
    pub fn planes(bits: u8) -> usize {
        match bits {
            2 | 4 => 1,
            _ => 2,
        }
    }
}

/// A matrix in EFQ as plain arrays: what the quantizer produces and the tests compare.
#[derive(Debug, Clone, PartialEq)]
pub struct EfqParts {
    pub n_out: usize,
    pub n_in: usize,
    /// (n_out / 16, n_tiles): code bits of each tile, one of [`WIDTHS`].
    pub widths: Vec<u8>,
    /// (n_out): f16 bits of each row's scale `d_r`.
    pub row_scales: Vec<u16>,
    /// (n_out, n_tiles): 8-bit block scales `s`.
    pub block_scales: Vec<u8>,
    /// (n_out, n_tiles): zero points, each < 2^bits of its tile.
    pub zeros: Vec<u8>,
    /// (n_out, n_in): one code per weight, each < 2^bits of its tile.
    pub codes: Vec<u8>,
    /// (n_out / 16): f16 bits of each group's outlier scale.
    pub outlier_scales: Vec<u16>,
    /// Outliers as (row, col, v), at most one per position; v in −31..=31, nonzero.
    pub outliers: Vec<(u32, u32, i8)>,
    /// 0, or [`ROTATION_RHT64`]: everything above describes `W·R` (`crate::hadamard`), and
    /// the kernels read `x·R`.
    pub rotation: u32,
}

impl EfqParts {
    /// Checks shapes and ranges; the encoder and tests rely on it.
    pub fn validate(&self) -> Result<(), EfqFormatError> {
        let (n_out, n_in) = (self.n_out, self.n_in);
        if n_out == 0 || !n_out.is_multiple_of(TILE_ROWS) {
            return Err(bad(format!(
                "EFQ matrices have a positive multiple of {TILE_ROWS} rows, got {n_out}"
            )));
        }
        if n_in == 0 || !n_in.is_multiple_of(COL_ALIGN) {
            return Err(bad(format!(
                "EFQ rows hold a positive multiple of {COL_ALIGN} weights, got {n_in}"
            )));
        }
        match self.rotation {
            0 => {}
            ROTATION_RHT64 if crate::hadamard::fits(n_in) => {}
            r => {
                return Err(bad(format!(
                    "rotation {r} for rows of {n_in}: EFQ rotates 64-column blocks (rotation {ROTATION_RHT64}) of rows in multiples of 64, or nothing (0)"
                )))
            }
        }
        let (n_groups, nt) = (n_out / TILE_ROWS, n_tiles(n_in));
        let lens = [
            ("widths", self.widths.len(), n_groups * nt),
            ("row_scales", self.row_scales.len(), n_out),
            ("block_scales", self.block_scales.len(), n_out * nt),
            ("zeros", self.zeros.len(), n_out * nt),
            ("codes", self.codes.len(), n_out * n_in),
            ("outlier_scales", self.outlier_scales.len(), n_groups),
        ];
        for (what, got, want) in lens {
            if got != want {
                return Err(bad(format!(
                    "{what}: expected {want} values for ({n_out}, {n_in}), got {got}"
                )));
            }
        }
        if let Some(i) = self.widths.iter().position(|&w| !is_width(w)) {
            return Err(bad(format!(
                "tile {i} has width {} bits; EFQ tiles have {WIDTHS:?}",
                self.widths[i]
            )));
        }
        for r in 0..n_out {
            for t in 0..nt {
                let limit = 1u16 << self.widths[(r / TILE_ROWS) * nt + t];
                let z = self.zeros[r * nt + t];
                if z as u16 >= limit {
                    return Err(bad(format!(
                        "row {r} tile {t}: zero point {z} does not fit {} bits",
                        limit.trailing_zeros()
                    )));
                }
                let cols = t * TILE_COLS..t * TILE_COLS + tile_cols(n_in, t);
                if let Some(c) = self.codes[r * n_in..][cols.clone()]
                    .iter()
                    .position(|&q| q as u16 >= limit)
                {
                    return Err(bad(format!(
                        "row {r} column {}: code does not fit {} bits",
                        cols.start + c,
                        limit.trailing_zeros()
                    )));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for &(r, c, v) in &self.outliers {
            if r as usize >= n_out || c as usize >= n_in || c > u16::MAX as u32 {
                return Err(bad(format!(
                    "outlier at ({r}, {c}) is outside ({n_out}, {n_in}) or past column 65535"
                )));
            }
            if v == 0 || v.unsigned_abs() > OUTLIER_MAX as u8 {
                return Err(bad(format!("outlier at ({r}, {c}) has value {v}; values are nonzero and within ±{OUTLIER_MAX}")));
            }
            if !seen.insert((r, c)) {
                return Err(bad(format!("two outliers at ({r}, {c})")));
            }
        }
        Ok(())
    }

    /// Slots per group: the most outliers any row of the group has.
    fn slots(&self) -> Vec<usize> {
        let mut per_row = vec![0usize; self.n_out];
        for &(r, _, _) in &self.outliers {
            per_row[r as usize] += 1;
        }
        per_row
            .chunks(TILE_ROWS)
            .map(|g| g.iter().copied().max().unwrap_or(0))
            .collect()
    }

    /// Bytes the blob of these parts takes: every code, scale, zero, outlier and index.
    pub fn stored_bytes(&self) -> usize {
        Layout::new(
            HEADER_BYTES_V2,
            self.n_out,
            self.n_in,
            &self.widths,
            &self.slots(),
        )
        .total
    }

    /// The matrix blob (see the module docs and `docs/FORMAT.md`).
    ///
    /// # Errors
    /// If [`EfqParts::validate`] fails or a group has more than 255 outlier slots.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EfqFormatError> {
        self.encode(HEADER_BYTES_V2)
    }

    /// The blob in version 1 (magic "EFQ1", 16-byte header, no rotation): what files of
    /// `edgefusion.efq.version` 1 hold. Kept so that tests can prove those still load.
    ///
    /// # Errors
    /// As [`EfqParts::to_bytes`], and if the parts are rotated.
    pub fn to_bytes_v1(&self) -> Result<Vec<u8>, EfqFormatError> {
        if self.rotation != 0 {
            return Err(bad("version-1 EFQ blobs cannot be rotated"));
        }
        self.encode(HEADER_BYTES)
    }

    fn encode(&self, header: usize) -> Result<Vec<u8>, EfqFormatError> {
        self.validate()?;
        let slots = self.slots();
        if let Some(g) = slots.iter().position(|&s| s > u8::MAX as usize) {
            return Err(bad(format!(
                "row group {g} has {} outlier slots; at most 255 fit",
                slots[g]
            )));
        }
        let (n_out, n_in) = (self.n_out, self.n_in);
        let nt = n_tiles(n_in);
        let layout = Layout::new(header, n_out, n_in, &self.widths, &slots);
        let mut out = vec![0u8; layout.total];
        out[4..8].copy_from_slice(&(n_out as u32).to_le_bytes());
        out[8..12].copy_from_slice(&(n_in as u32).to_le_bytes());
        out[12..16].copy_from_slice(&(layout.total_slots as u32).to_le_bytes());
        if header == HEADER_BYTES_V2 {
            out[..4].copy_from_slice(&MAGIC_V2);
            out[16..20].copy_from_slice(&self.rotation.to_le_bytes());
        } else {
            out[..4].copy_from_slice(&MAGIC);
        }
        out[layout.widths..][..self.widths.len()].copy_from_slice(&self.widths);
        for (i, &s) in self.row_scales.iter().enumerate() {
            out[layout.row_scales + 2 * i..][..2].copy_from_slice(&s.to_le_bytes());
        }
        for (g, &s) in slots.iter().enumerate() {
            out[layout.slot_counts + g] = s as u8;
        }
        for (g, &s) in self.outlier_scales.iter().enumerate() {
            out[layout.outlier_scales + 2 * g..][..2].copy_from_slice(&s.to_le_bytes());
        }
        for g in 0..n_out / TILE_ROWS {
            for t in 0..nt {
                let bits = self.widths[g * nt + t];
                let cols = tile_cols(n_in, t);
                let tile = &mut out[layout.tiles + layout.tile_offsets[g * nt + t]..]
                    [..tile_bytes(bits, cols)];
                for r in 0..TILE_ROWS {
                    let row = g * TILE_ROWS + r;
                    tile[r] = self.block_scales[row * nt + t];
                    let z = self.zeros[row * nt + t];
                    if bits <= 4 {
                        tile[TILE_ROWS + r % 8] |= z << (4 * (r / 8));
                    } else {
                        tile[TILE_ROWS + r] = z;
                    }
                    let codes_at = &mut tile[codes_offset(bits)..];
                    for c in 0..cols {
                        let q = self.codes[row * n_in + t * TILE_COLS + c];
                        let mut low = 0;
                        for plane in 0..code::planes(bits) {
                            let (byte, shift, mask, up) = code::position(bits, r, c, plane);
                            codes_at[byte] |= ((q >> up) & mask) << shift;
                            low += mask.count_ones();
                        }
                        debug_assert_eq!(low, bits as u32);
                    }
                }
            }
        }
        // Outliers: per group, slot j holds each row's j-th outlier (in column order).
        let mut by_row: Vec<Vec<(u32, i8)>> = vec![Vec::new(); n_out];
        for &(r, c, v) in &self.outliers {
            by_row[r as usize].push((c, v));
        }
        for row in &mut by_row {
            row.sort_unstable();
        }
        for g in 0..n_out / TILE_ROWS {
            for j in 0..slots[g] {
                let slot = &mut out[layout.outliers + (layout.slot_offsets[g] + j) * SLOT_BYTES..]
                    [..SLOT_BYTES];
                for r in 0..TILE_ROWS {
                    if let Some(&(c, v)) = by_row[g * TILE_ROWS + r].get(j) {
                        slot[2 * r..2 * r + 2].copy_from_slice(&(c as u16).to_le_bytes());
                        slot[2 * TILE_ROWS + r] = v as u8;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Byte offsets of a blob's sections.
struct Layout {
    widths: usize,
    row_scales: usize,
    slot_counts: usize,
    outlier_scales: usize,
    tiles: usize,
    /// (n_groups · n_tiles + 1): offset of each tile inside the tile section.
    tile_offsets: Vec<usize>,
    outliers: usize,
    /// (n_groups + 1): first slot of each group.
    slot_offsets: Vec<usize>,
    total_slots: usize,
    total: usize,
}

impl Layout {
    fn new(header: usize, n_out: usize, n_in: usize, widths: &[u8], slots: &[usize]) -> Layout {
        let (n_groups, nt) = (n_out / TILE_ROWS, n_tiles(n_in));
        let widths_at = header;
        let row_scales = (widths_at + n_groups * nt).next_multiple_of(2);
        let slot_counts = row_scales + 2 * n_out;
        let outlier_scales = (slot_counts + n_groups).next_multiple_of(2);
        let tiles = (outlier_scales + 2 * n_groups).next_multiple_of(64);
        let mut tile_offsets = Vec::with_capacity(n_groups * nt + 1);
        let mut at = 0;
        for g in 0..n_groups {
            for t in 0..nt {
                tile_offsets.push(at);
                at += tile_bytes(widths[g * nt + t], tile_cols(n_in, t));
            }
        }
        tile_offsets.push(at);
        let outliers = tiles + at;
        let mut slot_offsets = Vec::with_capacity(n_groups + 1);
        let mut total_slots = 0;
        for &s in slots {
            slot_offsets.push(total_slots);
            total_slots += s;
        }
        slot_offsets.push(total_slots);
        Layout {
            widths: widths_at,
            row_scales,
            slot_counts,
            outlier_scales,
            tiles,
            tile_offsets,
            outliers,
            slot_offsets,
            total_slots,
            total: outliers + total_slots * SLOT_BYTES,
        }
    }
}

/// A matrix blob, checked and indexed for the kernels.
#[derive(Debug, Clone)]
pub struct EfqMatrix<'a> {
    pub n_out: usize,
    pub n_in: usize,
    bytes: &'a [u8],
    widths: &'a [u8],
    tiles: &'a [u8],
    outliers: &'a [u8],
    /// 0, or [`ROTATION_RHT64`]: the kernels read `x·R` (see [`EfqParts::rotation`]).
    pub rotation: u32,
    row_scales_at: usize,
    outlier_scales_at: usize,
    tile_offsets: Vec<usize>,
    slot_offsets: Vec<usize>,
}

impl<'a> EfqMatrix<'a> {
    /// Checks a blob from a file: magic, sizes, widths, zero points. Every later access is
    /// in bounds once this succeeds.
    pub fn parse(bytes: &'a [u8]) -> Result<EfqMatrix<'a>, EfqFormatError> {
        if bytes.len() < HEADER_BYTES {
            return Err(bad(format!(
                "EFQ matrix blob of {} bytes is shorter than its {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        let header = if bytes[..4] == MAGIC {
            HEADER_BYTES
        } else if bytes[..4] == MAGIC_V2 {
            HEADER_BYTES_V2
        } else {
            return Err(bad(format!(
                "EFQ matrix blob starts with {:?}, not \"EFQ1\" or \"EFQ2\"",
                String::from_utf8_lossy(&bytes[..4])
            )));
        };
        if bytes.len() < header {
            return Err(bad(format!(
                "EFQ matrix blob of {} bytes is shorter than its {header}-byte header",
                bytes.len()
            )));
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        let (n_out, n_in, total_slots) = (word(4), word(8), word(12));
        let rotation = if header == HEADER_BYTES_V2 {
            word(16) as u32
        } else {
            0
        };
        if n_out == 0
            || !n_out.is_multiple_of(TILE_ROWS)
            || n_in == 0
            || !n_in.is_multiple_of(COL_ALIGN)
        {
            return Err(bad(format!(
                "EFQ matrix shape ({n_out}, {n_in}) is not (16k, 32m)"
            )));
        }
        if rotation != 0 && (rotation != ROTATION_RHT64 || !crate::hadamard::fits(n_in)) {
            return Err(bad(format!(
                "EFQ rotation {rotation} for rows of {n_in}: only {ROTATION_RHT64} (64-column Hadamard blocks, rows in multiples of 64) or 0"
            )));
        }
        let (n_groups, nt) = (n_out / TILE_ROWS, n_tiles(n_in));
        // Sizes of the fixed sections must fit before anything is indexed.
        let fixed = header + n_groups * nt + 2 * n_out + 3 * n_groups + 64;
        if bytes.len() < fixed {
            return Err(bad(format!(
                "EFQ matrix blob of {} bytes is too short for ({n_out}, {n_in})",
                bytes.len()
            )));
        }
        let widths = &bytes[header..header + n_groups * nt];
        if let Some(i) = widths.iter().position(|&w| !is_width(w)) {
            return Err(bad(format!(
                "EFQ tile {i} has width {} bits; tiles have {WIDTHS:?}",
                widths[i]
            )));
        }
        let probe = Layout::new(header, n_out, n_in, widths, &vec![0; n_groups]);
        let slots: Vec<usize> = bytes[probe.slot_counts..probe.slot_counts + n_groups]
            .iter()
            .map(|&s| s as usize)
            .collect();
        let layout = Layout::new(header, n_out, n_in, widths, &slots);
        if layout.total_slots != total_slots {
            return Err(bad(format!(
                "EFQ header says {total_slots} outlier slots, the groups' counts add up to {}",
                layout.total_slots
            )));
        }
        if bytes.len() != layout.total {
            return Err(bad(format!(
                "EFQ matrix blob holds {} bytes, its layout needs {}",
                bytes.len(),
                layout.total
            )));
        }
        let tiles = &bytes[layout.tiles..layout.outliers];
        for g in 0..n_groups {
            for t in 0..nt {
                let bits = widths[g * nt + t];
                let zeros =
                    &tiles[layout.tile_offsets[g * nt + t] + TILE_ROWS..][..zero_bytes(bits)];
                let too_wide = |z: u8| bits < 8 && z >> bits != 0;
                if zeros.iter().any(|&z| {
                    if bits <= 4 {
                        too_wide(z & 0xF) || too_wide(z >> 4)
                    } else {
                        too_wide(z)
                    }
                }) {
                    return Err(bad(format!(
                        "EFQ group {g} tile {t}: a zero point does not fit {bits} bits"
                    )));
                }
            }
        }
        let outliers = &bytes[layout.outliers..];
        for (s, slot) in outliers.chunks_exact(SLOT_BYTES).enumerate() {
            for r in 0..TILE_ROWS {
                let c = u16::from_le_bytes([slot[2 * r], slot[2 * r + 1]]) as usize;
                let v = slot[2 * TILE_ROWS + r] as i8;
                if c >= n_in || v.unsigned_abs() > OUTLIER_MAX as u8 {
                    return Err(bad(format!(
                        "EFQ outlier slot {s} row {r}: column {c} or value {v} out of range"
                    )));
                }
            }
        }
        Ok(EfqMatrix {
            n_out,
            n_in,
            bytes,
            widths,
            tiles,
            outliers,
            rotation,
            row_scales_at: layout.row_scales,
            outlier_scales_at: layout.outlier_scales,
            tile_offsets: layout.tile_offsets,
            slot_offsets: layout.slot_offsets,
        })
    }

    /// Tiles per row group.
    pub fn n_tiles(&self) -> usize {
        n_tiles(self.n_in)
    }

    /// Code bits of tile `t` of group `g`.
    pub fn width(&self, g: usize, t: usize) -> u8 {
        self.widths[g * self.n_tiles() + t]
    }

    /// Tile `t` of group `g`: scales, zero points, codes.
    pub(crate) fn tile(&self, g: usize, t: usize) -> &'a [u8] {
        let i = g * self.n_tiles() + t;
        &self.tiles[self.tile_offsets[i]..self.tile_offsets[i + 1]]
    }

    /// Row `r`'s scale `d_r`.
    pub fn row_scale(&self, r: usize) -> f32 {
        let at = self.row_scales_at + 2 * r;
        f16_to_f32([self.bytes[at], self.bytes[at + 1]])
    }

    /// The f16 bits of group `g`'s 16 row scales (for SIMD loads).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn row_scale_bytes(&self, g: usize) -> &'a [u8] {
        &self.bytes[self.row_scales_at + 2 * TILE_ROWS * g..][..2 * TILE_ROWS]
    }

    /// Group `g`'s outlier scale.
    pub fn outlier_scale(&self, g: usize) -> f32 {
        let at = self.outlier_scales_at + 2 * g;
        f16_to_f32([self.bytes[at], self.bytes[at + 1]])
    }

    /// Group `g`'s outlier slots, `SLOT_BYTES` each.
    pub(crate) fn slots(&self, g: usize) -> &'a [u8] {
        &self.outliers[self.slot_offsets[g] * SLOT_BYTES..self.slot_offsets[g + 1] * SLOT_BYTES]
    }

    /// Code of row `r` (0..16 in its group), column `c` (in its tile) of a tile.
    fn code(tile: &[u8], bits: u8, r: usize, c: usize) -> u8 {
        let codes = &tile[codes_offset(bits)..];
        (0..code::planes(bits))
            .map(|plane| {
                let (byte, shift, mask, up) = code::position(bits, r, c, plane);
                ((codes[byte] >> shift) & mask) << up
            })
            .sum()
    }

    fn zero(tile: &[u8], bits: u8, r: usize) -> u8 {
        if bits <= 4 {
            (tile[TILE_ROWS + r % 8] >> (4 * (r / 8))) & 0xF
        } else {
            tile[TILE_ROWS + r]
        }
    }

    /// The plain arrays back (tests, inspection, re-encoding).
    pub fn to_parts(&self) -> EfqParts {
        let (n_out, n_in, nt) = (self.n_out, self.n_in, self.n_tiles());
        let mut parts = EfqParts {
            n_out,
            n_in,
            widths: self.widths.to_vec(),
            row_scales: (0..n_out)
                .map(|r| {
                    u16::from_le_bytes([
                        self.bytes[self.row_scales_at + 2 * r],
                        self.bytes[self.row_scales_at + 2 * r + 1],
                    ])
                })
                .collect(),
            block_scales: vec![0; n_out * nt],
            zeros: vec![0; n_out * nt],
            codes: vec![0; n_out * n_in],
            outlier_scales: (0..n_out / TILE_ROWS)
                .map(|g| {
                    let at = self.outlier_scales_at + 2 * g;
                    u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
                })
                .collect(),
            outliers: Vec::new(),
            rotation: self.rotation,
        };
        for g in 0..n_out / TILE_ROWS {
            for t in 0..nt {
                let (tile, bits) = (self.tile(g, t), self.width(g, t));
                for r in 0..TILE_ROWS {
                    let row = g * TILE_ROWS + r;
                    parts.block_scales[row * nt + t] = tile[r];
                    parts.zeros[row * nt + t] = Self::zero(tile, bits, r);
                    for c in 0..tile_cols(n_in, t) {
                        parts.codes[row * n_in + t * TILE_COLS + c] = Self::code(tile, bits, r, c);
                    }
                }
            }
            for slot in self.slots(g).chunks_exact(SLOT_BYTES) {
                for r in 0..TILE_ROWS {
                    let v = slot[2 * TILE_ROWS + r] as i8;
                    if v != 0 {
                        let c = u16::from_le_bytes([slot[2 * r], slot[2 * r + 1]]);
                        parts
                            .outliers
                            .push(((g * TILE_ROWS + r) as u32, c as u32, v));
                    }
                }
            }
        }
        parts.outliers.sort_unstable();
        parts
    }

    /// Row `row` as `n_in` floats: dense codes plus outliers.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (g, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let d = self.row_scale(row);
        for t in 0..self.n_tiles() {
            let (tile, bits) = (self.tile(g, t), self.width(g, t));
            let scale = d * tile[r] as f32;
            let z = Self::zero(tile, bits, r) as f32;
            for c in 0..tile_cols(self.n_in, t) {
                out[t * TILE_COLS + c] = scale * (Self::code(tile, bits, r, c) as f32 - z);
            }
        }
        let gs = self.outlier_scale(g);
        for slot in self.slots(g).chunks_exact(SLOT_BYTES) {
            let v = slot[2 * TILE_ROWS + r] as i8;
            if v != 0 {
                let c = u16::from_le_bytes([slot[2 * r], slot[2 * r + 1]]) as usize;
                out[c] += gs * v as f32;
            }
        }
        if self.rotation != 0 {
            crate::hadamard::unrotate(&mut out[..self.n_in], 0);
        }
    }
}

/// Activation rows quantized for EFQ: per 128-column block an f32 scale, the i32 sum of
/// its codes, and 128 i8 codes (a narrower last block is zero-padded).
pub struct ActQ8;

impl ActQ8 {
    /// Bytes of one block.
    pub const BLOCK_BYTES: usize = 8 + TILE_COLS;

    /// Bytes of a row of `n_in` values.
    pub fn row_bytes(n_in: usize) -> usize {
        n_tiles(n_in) * Self::BLOCK_BYTES
    }

    /// Quantizes `x` (one row) into `out` (`row_bytes(x.len())`): per block `d = amax / 127`,
    /// codes rounded half to even.
    pub fn quantize_row(x: &[f32], out: &mut [u8]) {
        for (block, dst) in x
            .chunks(TILE_COLS)
            .zip(out.chunks_exact_mut(Self::BLOCK_BYTES))
        {
            Self::quantize_block(block, dst);
        }
    }

    /// [`ActQ8::quantize_row`] of `x · R` (`crate::hadamard`), for matrices stored rotated;
    /// `x.len()` is a multiple of 64.
    pub fn quantize_row_rotated(x: &[f32], out: &mut [u8]) {
        let mut rotated = [0.0f32; TILE_COLS];
        for (b, (block, dst)) in x
            .chunks(TILE_COLS)
            .zip(out.chunks_exact_mut(Self::BLOCK_BYTES))
            .enumerate()
        {
            let rotated = &mut rotated[..block.len()];
            rotated.copy_from_slice(block);
            crate::hadamard::rotate(rotated, b * TILE_COLS);
            Self::quantize_block(rotated, dst);
        }
    }

    /// One block of at most 128 values into its `BLOCK_BYTES`.
    fn quantize_block(block: &[f32], dst: &mut [u8]) {
        {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in dst[8..].iter_mut().zip(block) {
                let code = crate::f32ops::nearest_int(v * id);
                sum += code;
                *q = code as i8 as u8;
            }
            dst[8 + block.len()..].fill(0);
            dst[..4].copy_from_slice(&d.to_le_bytes());
            dst[4..8].copy_from_slice(&sum.to_le_bytes());
        }
    }

    /// Block `b`'s scale, code sum and codes.
    pub(crate) fn block(row: &[u8], b: usize) -> (f32, i32, &[u8]) {
        let block = &row[b * Self::BLOCK_BYTES..(b + 1) * Self::BLOCK_BYTES];
        (
            f32::from_le_bytes(block[..4].try_into().unwrap()),
            i32::from_le_bytes(block[4..8].try_into().unwrap()),
            &block[8..],
        )
    }

    /// Value `c` of a row as the kernels see it: `d · code`.
    pub(crate) fn value(row: &[u8], c: usize) -> f32 {
        let (d, _, codes) = Self::block(row, c / TILE_COLS);
        d * codes[c % TILE_COLS] as i8 as f32
    }

    /// The row's values as the kernels see them, `d · code`, into `out (n_in)`.
    pub(crate) fn dequantize_row(row: &[u8], out: &mut [f32]) {
        for (c, o) in out.iter_mut().enumerate() {
            *o = Self::value(row, c);
        }
    }
}

/// `out[t · out_stride + (r − r0)] = Σ_c w[r][c] · x_t[c]` for rows `r0..r1` (multiples of
/// 16) and `n_tok` rows of [`ActQ8`] activations, on the detected ISA.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: &EfqMatrix<'_>,
    r0: usize,
    r1: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    matmul_on(crate::cpu::isa(), m, r0, r1, act, n_tok, out, out_stride);
}

/// [`matmul`] with the kernels of `isa` (the scalar reference where `isa` has none).
///
/// Float operations run in one order on every ISA, so results agree bit for bit: per tile
/// `acc = fma((isum − z·Σa) · d_a, d_r · s, acc)`, then per outlier slot
/// `acc = fma(g_scale · v, d_a · a_c, acc)`.
///
/// # Panics
/// If `isa` cannot run here, the row range is not 16-aligned inside the matrix, or a buffer
/// is shorter than the shapes need.
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    isa: Isa,
    m: &EfqMatrix<'_>,
    r0: usize,
    r1: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        crate::cpu::is_runnable(isa),
        "efq::matmul_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    assert!(
        r0 <= r1 && r1 <= m.n_out && r0.is_multiple_of(TILE_ROWS) && r1.is_multiple_of(TILE_ROWS),
        "efq::matmul: rows {r0}..{r1} are not 16-aligned inside {}",
        m.n_out
    );
    let act_row = ActQ8::row_bytes(m.n_in);
    assert!(
        act.len() >= n_tok * act_row,
        "efq::matmul: {n_tok} activation rows need {} bytes",
        n_tok * act_row
    );
    crate::matmul::check_out(r1 - r0, n_tok, out, out_stride);
    if r1 == r0 || n_tok == 0 {
        return;
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if isa != Isa::Scalar {
        with_outlier_activations(m, r0, r1, act, n_tok, |x_deq| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the ISA is runnable (asserted: AVX-512 F/BW/VL/VNNI and F16C), the
            // matrix was checked by `parse`, the row range, activation and output sizes were
            // asserted above, and `x_deq` holds the dequantized activations whenever a group
            // has outlier slots.
            Isa::Avx512Vnni => unsafe {
                crate::x86::efq::matmul_vnni(m, r0, r1, act, n_tok, x_deq, out, out_stride)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; `Avx2` and `Avx512` both imply AVX2, FMA and F16C.
            Isa::Avx2 | Isa::Avx512 => unsafe {
                crate::x86::efq_avx2::matmul_avx2(m, r0, r1, act, n_tok, x_deq, out, out_stride)
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above, with NEON (always present on aarch64) runnable.
            Isa::Neon => unsafe {
                crate::aarch64::efq::matmul_neon(m, r0, r1, act, n_tok, x_deq, out, out_stride)
            },
            _ => matmul_scalar(m, r0, r1, act, n_tok, out, out_stride),
        });
        return;
    }
    matmul_scalar(m, r0, r1, act, n_tok, out, out_stride);
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
std::thread_local! {
    /// `d · code` activation rows `(n_tok, n_in)` for the SIMD kernels' outlier gathers,
    /// reused across calls.
    static DEQUANTIZED_ACT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with the activations dequantized `(n_tok, n_in)` when any row group in
/// `r0..r1` has outlier slots (empty otherwise): what every SIMD kernel gathers from.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn with_outlier_activations<R>(
    m: &EfqMatrix<'_>,
    r0: usize,
    r1: usize,
    act: &[u8],
    n_tok: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    let has_outliers = (r0 / TILE_ROWS..r1 / TILE_ROWS).any(|g| !m.slots(g).is_empty());
    if !has_outliers {
        return f(&[]);
    }
    let act_row = ActQ8::row_bytes(m.n_in);
    DEQUANTIZED_ACT.with_borrow_mut(|x_deq| {
        x_deq.resize(n_tok * m.n_in, 0.0);
        for t in 0..n_tok {
            ActQ8::dequantize_row(
                &act[t * act_row..(t + 1) * act_row],
                &mut x_deq[t * m.n_in..(t + 1) * m.n_in],
            );
        }
        f(&x_deq[..n_tok * m.n_in])
    })
}

/// The scalar reference: each tile's codes are decoded once per row group and used for
/// every token; `out` holds the accumulators, so each (row, token) sums its tiles in order.
#[allow(clippy::too_many_arguments)]
fn matmul_scalar(
    m: &EfqMatrix<'_>,
    r0: usize,
    r1: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let act_row = ActQ8::row_bytes(m.n_in);
    // (16, 128): one tile's codes, row-major.
    let mut codes = [0u8; TILE_ROWS * TILE_COLS];
    for g in r0 / TILE_ROWS..r1 / TILE_ROWS {
        let row_scales: [f32; TILE_ROWS] = std::array::from_fn(|r| m.row_scale(g * TILE_ROWS + r));
        let base = g * TILE_ROWS - r0;
        for t in 0..n_tok {
            out[t * out_stride + base..][..TILE_ROWS].fill(0.0);
        }
        for tile_i in 0..m.n_tiles() {
            let (tile, bits) = (m.tile(g, tile_i), m.width(g, tile_i));
            let cols = tile_cols(m.n_in, tile_i);
            for r in 0..TILE_ROWS {
                for c in 0..cols {
                    codes[r * TILE_COLS + c] = EfqMatrix::code(tile, bits, r, c);
                }
            }
            for t in 0..n_tok {
                let (d_a, sum_a, a) = ActQ8::block(&act[t * act_row..], tile_i);
                let acc = &mut out[t * out_stride + base..][..TILE_ROWS];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let dot: i32 = codes[r * TILE_COLS..][..cols]
                        .iter()
                        .zip(a)
                        .map(|(&q, &x)| q as i32 * x as i8 as i32)
                        .sum();
                    let isum = dot
                        .wrapping_sub((EfqMatrix::zero(tile, bits, r) as i32).wrapping_mul(sum_a));
                    let scale = tile[r] as f32 * row_scales[r];
                    *acc = (isum as f32 * d_a).mul_add(scale, *acc);
                }
            }
        }
        let slots = m.slots(g);
        if slots.is_empty() {
            continue;
        }
        let gs = m.outlier_scale(g);
        for t in 0..n_tok {
            let a_row = &act[t * act_row..(t + 1) * act_row];
            let acc = &mut out[t * out_stride + base..][..TILE_ROWS];
            for slot in slots.chunks_exact(SLOT_BYTES) {
                for (r, a) in acc.iter_mut().enumerate() {
                    let c = u16::from_le_bytes([slot[2 * r], slot[2 * r + 1]]) as usize;
                    let v = slot[2 * TILE_ROWS + r] as i8 as f32;
                    *a = (v * gs).mul_add(ActQ8::value(a_row, c), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::f16_bits;
    use proptest::prelude::*;

    /// Random but valid parts: widths, codes and zeros in range, some outliers.
    fn parts(n_groups: usize, n_in: usize, seed: u64, outlier_every: usize) -> EfqParts {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (n_out, nt) = (n_groups * TILE_ROWS, n_tiles(n_in));
        let widths: Vec<u8> = (0..n_groups * nt)
            .map(|_| WIDTHS[next() as usize % WIDTHS.len()])
            .collect();
        let mut codes = vec![0u8; n_out * n_in];
        let mut zeros = vec![0u8; n_out * nt];
        for r in 0..n_out {
            for t in 0..nt {
                let limit = 1u64 << widths[(r / TILE_ROWS) * nt + t];
                zeros[r * nt + t] = (next() % limit) as u8;
                for c in 0..tile_cols(n_in, t) {
                    codes[r * n_in + t * TILE_COLS + c] = (next() % limit) as u8;
                }
            }
        }
        let mut outliers = Vec::new();
        if outlier_every > 0 {
            for r in 0..n_out {
                for c in 0..n_in {
                    if (next() as usize).is_multiple_of(outlier_every) {
                        let v = (next() % 62) as i8 - 31;
                        outliers.push((r as u32, c as u32, if v == 0 { 5 } else { v }));
                    }
                }
            }
        }
        EfqParts {
            n_out,
            n_in,
            widths,
            row_scales: (0..n_out)
                .map(|r| f16_bits(0.001 + r as f32 * 1e-4))
                .collect(),
            block_scales: (0..n_out * nt).map(|_| (next() % 256) as u8).collect(),
            zeros,
            codes,
            outlier_scales: (0..n_groups)
                .map(|g| f16_bits(0.05 + g as f32 * 0.01))
                .collect(),
            outliers,
            rotation: 0,
        }
    }

    proptest! {
        /// parts → bytes → parse → parts is the identity, for every width and partial
        /// last tiles (n_in not a multiple of 128), with and without outliers.
        #[test]
        fn blob_round_trips(n_groups in 1usize..3, cols32 in 1usize..10, seed in any::<u64>(), every in prop_oneof![Just(0usize), Just(7), Just(200)]) {
            let p = parts(n_groups, 32 * cols32, seed, every);
            let mut sorted = p.clone();
            sorted.outliers.sort_unstable();
            let bytes = p.to_bytes().unwrap();
            prop_assert_eq!(bytes.len(), p.stored_bytes());
            let m = EfqMatrix::parse(&bytes).unwrap();
            prop_assert_eq!(m.to_parts(), sorted);
        }

        /// Every truncation and single-byte corruption of a blob parses to an error or to a
        /// matrix whose kernels run in bounds — never a panic.
        #[test]
        fn hostile_blobs_never_panic(cut in 0usize..2000, flip_at in 0usize..2000, flip in 1u8..=255) {
            let p = parts(1, 96, 3, 11);
            let mut bytes = p.to_bytes().unwrap();
            let at = flip_at % bytes.len();
            bytes[at] ^= flip;
            bytes.truncate(bytes.len() - cut.min(bytes.len()));
            if let Ok(m) = EfqMatrix::parse(&bytes) {
                let mut act = vec![0u8; ActQ8::row_bytes(m.n_in)];
                ActQ8::quantize_row(&vec![0.5; m.n_in], &mut act);
                let mut out = vec![0.0; m.n_out];
                matmul_on(Isa::Scalar, &m, 0, m.n_out, &act, 1, &mut out, m.n_out);
                let mut row = vec![0.0; m.n_in];
                m.dequantize_row(0, &mut row);
            }
        }
    }

    /// `out[t · stride + r]` equals row r of `m` dequantized, dotted in f64 with token t of
    /// `act` dequantized, to float rounding.
    fn assert_matches_f64_dot(
        m: &EfqMatrix<'_>,
        act: &[u8],
        n_tok: usize,
        out: &[f32],
        stride: usize,
        what: &str,
    ) {
        let act_row = ActQ8::row_bytes(m.n_in);
        let (mut w, mut x) = (vec![0.0f32; m.n_in], vec![0.0f32; m.n_in]);
        for t in 0..n_tok {
            ActQ8::dequantize_row(&act[t * act_row..], &mut x);
            for r in 0..m.n_out {
                m.dequantize_row(r, &mut w);
                let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                let got = out[t * stride + r] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-6,
                    "{what} token {t} row {r}: {got} vs {exact}"
                );
            }
        }
    }

    /// The scalar matmul equals dequantize-then-dot in f64 (to float rounding), and every
    /// SIMD kernel equals the scalar one bit for bit.
    #[test]
    fn matmul_matches_dequantized_dot_and_scalar_twin() {
        let mut widths_seen = std::collections::BTreeSet::new();
        for (n_groups, n_in, every) in [(1, 32, 0), (2, 576, 50), (3, 1536, 0), (1, 224, 9)] {
            let p = parts(n_groups, n_in, n_in as u64, every);
            widths_seen.extend(p.widths.iter().copied());
            let bytes = p.to_bytes().unwrap();
            let m = EfqMatrix::parse(&bytes).unwrap();
            let n_out = m.n_out;
            let act_row = ActQ8::row_bytes(n_in);
            for n_tok in [1usize, 2, 3, 4, 5, 9, 15, 17] {
                let mut act = vec![0u8; n_tok * act_row];
                for t in 0..n_tok {
                    let x: Vec<f32> = (0..n_in)
                        .map(|c| ((c * 7 + t * 13) % 23) as f32 / 11.0 - 1.0)
                        .collect();
                    ActQ8::quantize_row(&x, &mut act[t * act_row..(t + 1) * act_row]);
                }
                let stride = n_out + 5;
                let mut scalar = vec![f32::NAN; n_tok * stride];
                matmul_on(Isa::Scalar, &m, 0, n_out, &act, n_tok, &mut scalar, stride);
                assert_matches_f64_dot(&m, &act, n_tok, &scalar, stride, &format!("n_in {n_in}"));
                for isa in crate::cpu::available_isas() {
                    let mut got = vec![f32::NAN; n_tok * stride];
                    matmul_on(isa, &m, 0, n_out, &act, n_tok, &mut got, stride);
                    for t in 0..n_tok {
                        let a: Vec<u32> = got[t * stride..t * stride + n_out]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let b: Vec<u32> = scalar[t * stride..t * stride + n_out]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        assert_eq!(a, b, "{} n_in {n_in} n_tok {n_tok} token {t}", isa.name());
                    }
                }
                // A 16-aligned sub-range of rows writes only its own outputs.
                if n_groups > 1 {
                    let mut part = vec![f32::NAN; n_tok * stride];
                    matmul_on(
                        crate::cpu::isa(),
                        &m,
                        16,
                        32,
                        &act,
                        n_tok,
                        &mut part,
                        stride,
                    );
                    for t in 0..n_tok {
                        assert_eq!(
                            &part[t * stride..t * stride + 16],
                            &scalar[t * stride + 16..t * stride + 32]
                        );
                    }
                }
            }
        }
        // Every code width went through every kernel (each case draws widths per tile).
        assert_eq!(widths_seen.into_iter().collect::<Vec<_>>(), WIDTHS);
    }

    /// Version-1 blobs (16-byte header, magic "EFQ1") parse to the same matrix as the
    /// version-2 blob of the same parts, and refuse to carry a rotation.
    #[test]
    fn version_1_blobs_still_parse() {
        for (n_in, every) in [(576, 50), (224, 0)] {
            let p = parts(2, n_in, 5, every);
            let v1 = p.to_bytes_v1().unwrap();
            let v2 = p.to_bytes().unwrap();
            assert_eq!((&v1[..4], &v2[..4]), (&b"EFQ1"[..], &b"EFQ2"[..]));
            let (m1, m2) = (
                EfqMatrix::parse(&v1).unwrap(),
                EfqMatrix::parse(&v2).unwrap(),
            );
            assert_eq!(m1.to_parts(), m2.to_parts());
            assert_eq!(m1.rotation, 0);
            let act_row = ActQ8::row_bytes(n_in);
            let mut act = vec![0u8; act_row];
            let x: Vec<f32> = (0..n_in).map(|c| (c % 13) as f32 / 6.0 - 1.0).collect();
            ActQ8::quantize_row(&x, &mut act);
            let (mut o1, mut o2) = (vec![0.0; m1.n_out], vec![0.0; m2.n_out]);
            matmul(&m1, 0, m1.n_out, &act, 1, &mut o1, m1.n_out);
            matmul(&m2, 0, m2.n_out, &act, 1, &mut o2, m2.n_out);
            assert_eq!(o1, o2);
        }
        let mut rotated = parts(1, 128, 1, 0);
        rotated.rotation = ROTATION_RHT64;
        assert!(rotated.to_bytes_v1().is_err());
    }

    /// A rotated blob stores `W·R`: its rows dequantize to `W` (the original basis), and its
    /// matmul on rotated activations gives `W·x` — on every ISA, bit for bit the scalar's.
    #[test]
    fn rotated_blobs_read_rotated_inputs() {
        for n_in in [576, 128, 64] {
            let mut p = parts(2, n_in, 9, 40);
            p.rotation = ROTATION_RHT64;
            let bytes = p.to_bytes().unwrap();
            let m = EfqMatrix::parse(&bytes).unwrap();
            assert_eq!(m.rotation, ROTATION_RHT64);
            let x: Vec<f32> = (0..n_in)
                .map(|c| ((c * 5) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let act_row = ActQ8::row_bytes(n_in);
            let mut act = vec![0u8; act_row];
            ActQ8::quantize_row_rotated(&x, &mut act);
            let mut scalar = vec![0.0; m.n_out];
            matmul_on(Isa::Scalar, &m, 0, m.n_out, &act, 1, &mut scalar, m.n_out);
            let (mut w, mut xr) = (vec![0.0f32; n_in], vec![0.0f32; n_in]);
            ActQ8::dequantize_row(&act, &mut xr);
            let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            for (r, &got) in scalar.iter().enumerate() {
                m.dequantize_row(r, &mut w);
                // W·x in the original basis, up to the activations' 8-bit codes.
                let plain: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let got = got as f64;
                assert!(
                    (got - plain).abs() <= 0.01 * norm(&w) * norm(&x),
                    "n_in {n_in} row {r}: {got} vs W·x {plain}"
                );
                // Exactly (W·R)·(x·R as coded), to float rounding.
                crate::hadamard::rotate(&mut w, 0);
                let exact: f64 = w.iter().zip(&xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = w
                    .iter()
                    .zip(&xr)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-6,
                    "n_in {n_in} row {r}: {got} vs {exact}"
                );
            }
            for isa in crate::cpu::available_isas() {
                let mut got = vec![0.0; m.n_out];
                matmul_on(isa, &m, 0, m.n_out, &act, 1, &mut got, m.n_out);
                assert_eq!(got, scalar, "{}", isa.name());
            }
        }
        // Rows that are not whole Hadamard blocks cannot be rotated.
        let mut p = parts(1, 96, 1, 0);
        p.rotation = ROTATION_RHT64;
        assert!(p.to_bytes().unwrap_err().0.contains("multiples of 64"));
        p.rotation = 32;
        assert!(p.to_bytes().is_err());
    }

    /// The largest sums the integer paths can meet: every code at its width's maximum and
    /// every activation at ±127 (all the same sign, then alternating), on every ISA, against
    /// the scalar reference bit for bit and against an f64 dot.
    #[test]
    fn extreme_codes_and_activations_do_not_overflow() {
        for bits in WIDTHS {
            let n_in = 288;
            let mut p = parts(1, n_in, bits as u64, 0);
            p.widths.fill(bits);
            p.codes.fill(((1u16 << bits) - 1) as u8);
            p.zeros.fill(0);
            p.block_scales.fill(255);
            let bytes = p.to_bytes().unwrap();
            let m = EfqMatrix::parse(&bytes).unwrap();
            let act_row = ActQ8::row_bytes(n_in);
            let mut act = vec![0u8; 2 * act_row];
            let same: Vec<f32> = vec![1.0; n_in];
            let alternating: Vec<f32> = (0..n_in)
                .map(|c| if c % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            ActQ8::quantize_row(&same, &mut act[..act_row]);
            ActQ8::quantize_row(&alternating, &mut act[act_row..]);
            let mut scalar = vec![0.0f32; 2 * TILE_ROWS];
            matmul_on(
                Isa::Scalar,
                &m,
                0,
                TILE_ROWS,
                &act,
                2,
                &mut scalar,
                TILE_ROWS,
            );
            assert_matches_f64_dot(&m, &act, 2, &scalar, TILE_ROWS, &format!("{bits} bits"));
            for isa in crate::cpu::available_isas() {
                let mut got = vec![0.0f32; 2 * TILE_ROWS];
                matmul_on(isa, &m, 0, TILE_ROWS, &act, 2, &mut got, TILE_ROWS);
                assert_eq!(got, scalar, "{} at {bits} bits", isa.name());
            }
        }
    }

    #[test]
    fn invalid_parts_are_refused_with_the_rule() {
        let mut p = parts(1, 64, 1, 0);
        p.widths[0] = 7;
        assert!(p.to_bytes().unwrap_err().0.contains("[2, 3, 4, 5, 6, 8]"));
        // A wide tile's zero point is a byte, still bounded by its width.
        let mut p = parts(1, 64, 1, 0);
        p.widths[0] = 5;
        p.zeros[0] = 32;
        assert!(p.to_bytes().unwrap_err().0.contains("does not fit 5 bits"));
        let mut p = parts(1, 64, 1, 0);
        p.n_out = 8;
        assert!(p.to_bytes().unwrap_err().0.contains("multiple of 16"));
        let mut p = parts(1, 64, 1, 0);
        p.outliers = vec![(0, 3, 40)];
        assert!(p.to_bytes().unwrap_err().0.contains("±31"));
        assert!(EfqMatrix::parse(b"GGUF\0\0\0\0\0\0\0\0\0\0\0\0")
            .unwrap_err()
            .0
            .contains("EFQ1"));
    }
}
