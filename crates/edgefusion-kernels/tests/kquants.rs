//! K-quant formats against an independent reference (gguf-py, via a committed fixture) and
//! property tests of the quantizers and dot products through the public API.

use edgefusion_kernels::kquants::{self, QK_K};
use edgefusion_kernels::{cpu, GgmlType};
use proptest::prelude::*;

type Dequantize = fn(&[u8], &mut [f32]);
type Quantize = fn(&[f32], &mut [u8]);
type VecDotOn = fn(cpu::Isa, usize, &[u8], &[u8]) -> f32;

fn dequantizer(ty: GgmlType) -> Dequantize {
    match ty {
        GgmlType::Q2K => kquants::dequantize_row_q2k,
        GgmlType::Q3K => kquants::dequantize_row_q3k,
        GgmlType::Q4K => kquants::dequantize_row_q4k,
        GgmlType::Q5K => kquants::dequantize_row_q5k,
        GgmlType::Q6K => kquants::dequantize_row_q6k,
        GgmlType::Q8K => kquants::dequantize_row_q8k,
        other => panic!("{} is not a k-quant", other.name()),
    }
}

/// Every weight format with its reference quantizer, per-ISA dot product, and the
/// largest quantize→dequantize error allowed, as a fraction of the super-block's largest
/// magnitude. The limits sit about 1.5× above the worst error seen over 3000 random blocks
/// (Q2_K 0.43, Q3_K 0.16, Q4_K 0.072, Q5_K 0.043, Q6_K 0.017):
/// asymmetric formats spend `nmax - 1 .. nmax + 1` steps over a sub-block range of up to
/// 2·amax, symmetric ones `nmax` steps over amax, and 4-/6-bit sub-block scales add up to
/// `nmax · step_of_scale / 2` more.
const WEIGHT_FORMATS: [(GgmlType, Quantize, VecDotOn, f32); 5] = [
    (
        GgmlType::Q2K,
        kquants::quantize_row_q2k_ref,
        kquants::vec_dot_q2k_q8k_on,
        Q2K_MAX_ERR,
    ),
    (
        GgmlType::Q3K,
        kquants::quantize_row_q3k_ref,
        kquants::vec_dot_q3k_q8k_on,
        Q3K_MAX_ERR,
    ),
    (
        GgmlType::Q4K,
        kquants::quantize_row_q4k_ref,
        kquants::vec_dot_q4k_q8k_on,
        Q4K_MAX_ERR,
    ),
    (
        GgmlType::Q5K,
        kquants::quantize_row_q5k_ref,
        kquants::vec_dot_q5k_q8k_on,
        Q5K_MAX_ERR,
    ),
    (
        GgmlType::Q6K,
        kquants::quantize_row_q6k_ref,
        kquants::vec_dot_q6k_q8k_on,
        Q6K_MAX_ERR,
    ),
];

const Q2K_MAX_ERR: f32 = 0.64;
const Q3K_MAX_ERR: f32 = 0.24;
const Q4K_MAX_ERR: f32 = 0.11;
const Q5K_MAX_ERR: f32 = 0.065;
const Q6K_MAX_ERR: f32 = 0.026;
/// What rounding the f16 super-block scale `d` can add to any value, in absolute terms: for
/// blocks of magnitude ~1e-3 and below `d` is an f16 subnormal, whose step is 2^-24, so it
/// is off by up to 2^-25, times the largest `|sub-block scale · code|` of any format
/// (Q6_K's 128 · 32). (A Q6_K block peaking at 0.008 missed the relative bound by 6%.)
const F16_SCALE_ERR: f32 = 128.0 * 32.0 / (1u32 << 25) as f32;

/// Float-order slack of a dot product relative to Σ|w_i x_i|.
const DOT_FLOAT_REL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------
// Fixture: tests/fixtures/kquants_dequant.json, written by scripts/make-kquant-fixture.py.

/// Just enough JSON for the fixture: objects, arrays, strings without escapes, numbers.
#[derive(Debug)]
enum Json {
    Object(Vec<(String, Json)>),
    Array(Vec<Json>),
    String(String),
    Number(f64),
}

impl Json {
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Object(fields) => {
                &fields
                    .iter()
                    .find(|(k, _)| k == key)
                    .unwrap_or_else(|| panic!("missing key {key}"))
                    .1
            }
            other => panic!("expected object, got {other:?}"),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Json::String(s) => s,
            other => panic!("expected string, got {other:?}"),
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.pos < self.bytes.len() && self.bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) {
        self.skip_space();
        assert_eq!(self.bytes[self.pos], byte, "at byte {}", self.pos);
        self.pos += 1;
    }

    fn string(&mut self) -> String {
        self.expect(b'"');
        let start = self.pos;
        while self.bytes[self.pos] != b'"' {
            assert_ne!(
                self.bytes[self.pos], b'\\',
                "escapes are not used by the fixture"
            );
            self.pos += 1;
        }
        self.pos += 1;
        String::from_utf8(self.bytes[start..self.pos - 1].to_vec()).expect("utf-8")
    }

    fn value(&mut self) -> Json {
        self.skip_space();
        match self.bytes[self.pos] {
            b'{' => {
                self.pos += 1;
                let mut fields = Vec::new();
                loop {
                    self.skip_space();
                    if self.bytes[self.pos] == b'}' {
                        self.pos += 1;
                        return Json::Object(fields);
                    }
                    if !fields.is_empty() {
                        self.expect(b',');
                    }
                    let key = self.string();
                    self.expect(b':');
                    fields.push((key, self.value()));
                }
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_space();
                    if self.bytes[self.pos] == b']' {
                        self.pos += 1;
                        return Json::Array(items);
                    }
                    if !items.is_empty() {
                        self.expect(b',');
                    }
                    items.push(self.value());
                }
            }
            b'"' => Json::String(self.string()),
            _ => {
                let start = self.pos;
                while self.pos < self.bytes.len()
                    && matches!(
                        self.bytes[self.pos],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.pos]).expect("ascii");
                Json::Number(text.parse().unwrap_or_else(|_| panic!("bad number {text}")))
            }
        }
    }
}

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn type_named(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

#[test]
fn dequantize_matches_gguf_py_fixture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/kquants_dequant.json"
    );
    let text = std::fs::read_to_string(path).expect("run scripts/make-kquant-fixture.py");
    let root = Parser {
        bytes: text.as_bytes(),
        pos: 0,
    }
    .value();
    let Json::Array(cases) = root.get("cases") else {
        panic!("cases must be an array")
    };
    let mut seen = Vec::new();
    for case in cases {
        let ty = type_named(case.get("type").as_str());
        let Json::Number(n_blocks) = case.get("n_blocks") else {
            panic!("n_blocks must be a number")
        };
        let n = *n_blocks as usize * QK_K;
        let blocks = from_hex(case.get("blocks_hex").as_str());
        assert_eq!(Some(blocks.len()), ty.row_bytes(n), "{}", ty.name());
        let expected: Vec<f32> = from_hex(case.get("expected_f32_le_hex").as_str())
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(expected.len(), n);

        let mut got = vec![f32::NAN; n];
        dequantizer(ty)(&blocks, &mut got);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            // Same products in the same order as gguf-py: exact, but allow 1e-6 relative in
            // case numpy ever fuses a multiply-add.
            assert!(
                g == e || (g - e).abs() <= 1e-6 * e.abs(),
                "{} weight {i}: {g} vs gguf-py {e}",
                ty.name()
            );
        }
        seen.push(ty);
    }
    for ty in [
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ] {
        assert!(seen.contains(&ty), "fixture lacks {}", ty.name());
    }
}

// ---------------------------------------------------------------------------------------
// Property tests.

/// A row of `blocks` super-blocks: values in ±`scale`, some exact zeros and outliers.
fn row_strategy() -> impl Strategy<Value = Vec<f32>> {
    (1usize..=3, -3i32..=3).prop_flat_map(|(blocks, exponent)| {
        let scale = 10f32.powi(exponent);
        proptest::collection::vec(
            prop_oneof![
                8 => -1.0f32..1.0,
                1 => Just(0.0f32),
                1 => -8.0f32..8.0,
            ],
            blocks * QK_K,
        )
        .prop_map(move |v| v.into_iter().map(|x| x * scale).collect())
    })
}

fn block_amax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn quantize_dequantize_error_within_bound(x in row_strategy()) {
        for (ty, quantize, _, max_err) in WEIGHT_FORMATS {
            let mut packed = vec![0u8; ty.row_bytes(x.len()).unwrap()];
            quantize(&x, &mut packed);
            let mut y = vec![0f32; x.len()];
            dequantizer(ty)(&packed, &mut y);
            for (xb, yb) in x.chunks(QK_K).zip(y.chunks(QK_K)) {
                let limit = max_err * block_amax(xb) + F16_SCALE_ERR;
                for (a, b) in xb.iter().zip(yb) {
                    prop_assert!((a - b).abs() <= limit, "{}: {} -> {} (limit {})", ty.name(), a, b, limit);
                }
            }
        }
    }

    #[test]
    fn q8k_round_trip_within_half_step(x in row_strategy()) {
        let mut packed = vec![0u8; GgmlType::Q8K.row_bytes(x.len()).unwrap()];
        kquants::quantize_row_q8k(&x, &mut packed);
        let mut y = vec![0f32; x.len()];
        kquants::dequantize_row_q8k(&packed, &mut y);
        for (xb, yb) in x.chunks(QK_K).zip(y.chunks(QK_K)) {
            let half_step = block_amax(xb) / 254.0 * 1.001;
            for (a, b) in xb.iter().zip(yb) {
                prop_assert!((a - b).abs() <= half_step, "{} -> {}", a, b);
            }
        }
    }

    /// `vec_dot(w, q8k(x))` against `Σ ŵ_i x_i` in f64: the only difference is the Q8_K
    /// rounding of x (≤ half a step per element) plus float summation order.
    #[test]
    fn vec_dot_matches_dot_of_dequantized_weights(w in row_strategy(), seed in any::<u64>()) {
        let n = w.len();
        let mut state = seed | 1;
        let x: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * 3.0
            })
            .collect();
        let mut act = vec![0u8; GgmlType::Q8K.row_bytes(n).unwrap()];
        kquants::quantize_row_q8k(&x, &mut act);
        for (ty, quantize, vec_dot_on, _) in WEIGHT_FORMATS {
            let mut packed = vec![0u8; ty.row_bytes(n).unwrap()];
            quantize(&w, &mut packed);
            let mut w_hat = vec![0f32; n];
            dequantizer(ty)(&packed, &mut w_hat);
            let exact: f64 = w_hat.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mut bound = 0.0f64;
            for (wb, xb) in w_hat.chunks(QK_K).zip(x.chunks(QK_K)) {
                let half_step = (block_amax(xb) / 254.0 * 1.001) as f64;
                bound += half_step * wb.iter().map(|v| v.abs() as f64).sum::<f64>();
                bound += DOT_FLOAT_REL * wb.iter().zip(xb).map(|(a, b)| (a * b).abs() as f64).sum::<f64>();
            }
            for isa in cpu::available_isas() {
                let got = vec_dot_on(isa, n, &packed, &act) as f64;
                prop_assert!(
                    (got - exact).abs() <= bound,
                    "{} on {}: {} vs {} (bound {})", ty.name(), isa.name(), got, exact, bound
                );
            }
        }
    }
}
