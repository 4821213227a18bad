//! `quantize` end to end on the tiny fixture model: the EFQ file loads, its bits per weight
//! are what was asked, and its logits stay near the float model's.

use edgefusion_io::ModelSource;
use edgefusion_model::{Layout, Model};
use edgefusion_quant::pipeline::{quantize, Calibration, Method, QuantizeOptions};
use edgefusion_runtime::{Logits, Session, SessionOptions};
use edgefusion_testkit::fixture;

fn logits(path: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let source = ModelSource::open(path).unwrap();
    let model = Model::load(&source).unwrap();
    let opts = SessionOptions {
        max_logits: tokens.len(),
        ..SessionOptions::new(64, 1)
    };
    let mut session = Session::new(&model, opts).unwrap();
    session.forward(tokens, Logits::From(0)).unwrap().to_vec()
}

/// Relative RMS distance between two logit sets.
fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn quantized_tiny_model_loads_and_stays_close() {
    let dir = std::env::temp_dir().join(format!("ef-quant-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-f32.gguf");
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 512).collect();
    let reference = logits(&input, &tokens);
    // (method, bits, bpw, named tolerance on relative RMS logit error). The tiny model's
    // random weights amplify weight error: llama.cpp's own Q4_0 of it (the q4_0 fixture)
    // is 0.36 away from the f32 logits. Measured (embedding at 4 bits, outside the
    // budget): rtn-4 0.46, efq-3.6 0.63, efq-3.1 0.67 (no calibration).
    for (method, bits, bpw, tolerance) in [
        (Method::Rtn, 4, 0.0, 0.55),
        (Method::Efq, 4, 3.6, 0.72),
        (Method::Efq, 4, 3.1, 0.77),
    ] {
        let out = dir.join(format!("{}-{bits}-{bpw}.gguf", method.name()));
        let opts = QuantizeOptions {
            method,
            bpw,
            bits,
            outliers: if method == Method::Efq { 0.005 } else { 0.0 },
            calibration: None,
            act_order: false,
            sensitivity: false,
            embedding_bits: 4,
            rotate: true,
            max_bits: None,
            refit: true,
            keep_source: true,
        };
        let report = quantize(
            &ModelSource::open(&input).unwrap(),
            &out,
            &opts,
            &mut |_, _, _| {},
        )
        .unwrap();
        if method == Method::Efq {
            assert!(
                report.linear_bpw <= bpw,
                "{} bpw asked, {} reached",
                bpw,
                report.linear_bpw
            );
        }
        let source = ModelSource::open(&out).unwrap();
        let model = Model::load(&source).unwrap();
        assert_eq!(model.layers[0].ffn.up.layout(), Layout::Efq);
        let got = logits(&out, &tokens);
        let err = rel_rms(&got, &reference);
        eprintln!(
            "{} bits {bits} bpw {bpw}: {:.3} bits/weight, relative logit RMS error {err:.4}",
            method.name(),
            report.linear_bpw
        );
        assert!(
            err < tolerance,
            "{}: relative logit error {err} ≥ {tolerance}",
            method.name()
        );
        // An EFQ file is not quantized again.
        let again = quantize(&source, &dir.join("again.gguf"), &opts, &mut |_, _, _| {});
        assert!(again
            .unwrap_err()
            .to_string()
            .contains("already an EFQ model"));
        assert!(!dir.join("again.gguf").exists());
    }
    // A budget below what 2-bit tiles take is refused before anything is written.
    let out = dir.join("too-small.gguf");
    let opts = QuantizeOptions {
        method: Method::Efq,
        bpw: 2.0,
        bits: 3,
        outliers: 0.005,
        calibration: None,
        act_order: false,
        sensitivity: false,
        embedding_bits: 4,
        rotate: true,
        max_bits: None,
        refit: true,
        keep_source: true,
    };
    let err = quantize(
        &ModelSource::open(&input).unwrap(),
        &out,
        &opts,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("--bpw"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Calibration + GPTQ lower the logit error of the same widths against plain rounding.
#[test]
fn calibration_and_gptq_lower_the_error() {
    let dir = std::env::temp_dir().join(format!("ef-quant-calib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-f32.gguf");
    // Evaluate on text like the calibration text (a different sentence): GPTQ fits the
    // distribution it was calibrated on.
    let tokens = {
        let source = ModelSource::open(&input).unwrap();
        let ModelSource::Gguf(gguf) = &source else {
            unreachable!()
        };
        let tokenizer = edgefusion_runtime::tokenizer::Tokenizer::from_gguf(gguf).unwrap();
        tokenizer
            .encode(
                "A lazy brown dog sleeps by the sea while the quick fox jumps.",
                false,
            )
            .unwrap()
    };
    let reference = logits(&input, &tokens);
    let text = "The quick brown fox jumps over the lazy dog while the sea rolls on. ".repeat(40);
    let calibration = Calibration {
        name: "test text".into(),
        text,
        n_tokens: 512,
        ctx: 64,
        threads: 1,
        seed: 0,
    };
    let mut errors = Vec::new();
    for (method, calib) in [(Method::Rtn, None), (Method::Gptq, Some(calibration))] {
        let out = dir.join(format!("{}.gguf", method.name()));
        let opts = QuantizeOptions {
            method,
            bpw: 0.0,
            bits: 3,
            outliers: 0.0,
            calibration: calib,
            act_order: false,
            sensitivity: false,
            embedding_bits: 4,
            rotate: true,
            max_bits: None,
            refit: true,
            keep_source: true,
        };
        quantize(
            &ModelSource::open(&input).unwrap(),
            &out,
            &opts,
            &mut |_, _, _| {},
        )
        .unwrap();
        let err = rel_rms(&logits(&out, &tokens), &reference);
        eprintln!("{} 3-bit: relative logit RMS error {err:.4}", method.name());
        errors.push(err);
    }
    assert!(
        errors[1] < errors[0],
        "gptq {} vs rtn {}",
        errors[1],
        errors[0]
    );
    // A calibration text shorter than asked is an error naming it.
    let short = Calibration {
        name: "short.txt".into(),
        text: "too short".into(),
        n_tokens: 512,
        ctx: 64,
        threads: 1,
        seed: 0,
    };
    let opts = QuantizeOptions {
        method: Method::Gptq,
        bpw: 0.0,
        bits: 3,
        outliers: 0.0,
        calibration: Some(short),
        act_order: false,
        sensitivity: false,
        embedding_bits: 4,
        rotate: true,
        max_bits: None,
        refit: true,
        keep_source: true,
    };
    let err = quantize(
        &ModelSource::open(&input).unwrap(),
        &dir.join("x.gguf"),
        &opts,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("short.txt"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The sensitivity-weighted allocation (the CLI's default with calibration) runs end to
/// end, keeps the budget, and keeps the model near the float one.
#[test]
fn sensitivity_allocation_keeps_the_budget() {
    let dir = std::env::temp_dir().join(format!("ef-quant-sens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-f32.gguf");
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 512).collect();
    let reference = logits(&input, &tokens);
    let text = "The quick brown fox jumps over the lazy dog while the sea rolls on. ".repeat(40);
    let mut errors = Vec::new();
    for sensitivity in [false, true] {
        let out = dir.join(format!("sens-{sensitivity}.gguf"));
        let opts = QuantizeOptions {
            method: Method::Efq,
            bpw: 3.1,
            bits: 3,
            outliers: 0.005,
            calibration: Some(Calibration {
                name: "test text".into(),
                text: text.clone(),
                n_tokens: 512,
                ctx: 64,
                threads: 1,
                seed: 0,
            }),
            act_order: false,
            sensitivity,
            embedding_bits: 4,
            rotate: true,
            max_bits: None,
            refit: true,
            keep_source: true,
        };
        let mut stages = Vec::new();
        let report = quantize(
            &ModelSource::open(&input).unwrap(),
            &out,
            &opts,
            &mut |_, _, what| stages.push(what.to_string()),
        )
        .unwrap();
        assert!(report.linear_bpw <= 3.1, "{}", report.linear_bpw);
        assert_eq!(
            stages.iter().any(|s| s == "measuring sensitivity"),
            sensitivity
        );
        let err = rel_rms(&logits(&out, &tokens), &reference);
        eprintln!("efq-3.1 sensitivity {sensitivity}: relative logit RMS error {err:.4}");
        errors.push(err);
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Measured: 0.88 by relative error, 0.71 by sensitivity (calibrated on one repeated
    // sentence, evaluated on other tokens). The measured cost must help, and stay within
    // the uncalibrated efq-3.1 tolerance of quantized_tiny_model_loads_and_stays_close.
    assert!(errors[1] < errors[0], "{errors:?}");
    assert!(errors[1] < 0.77, "{errors:?}");
}

/// Matrices stored rotated carry the rotation in their blobs and run to logits as close as
/// unrotated ones; a version-1 file (blobs "EFQ1", `edgefusion.efq.version` 1) of the same
/// matrices still loads and gives the same logits bit for bit.
#[test]
fn rotated_files_run_and_version_1_files_still_load() {
    use edgefusion_io::gguf::{GgufWriter, MetaValue};
    use edgefusion_kernels::efq::{EfqMatrix, ROTATION_RHT64};
    use edgefusion_kernels::GgmlType;

    let dir = std::env::temp_dir().join(format!("ef-quant-v1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-f32.gguf");
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 512).collect();
    let reference = logits(&input, &tokens);
    let mut errors = Vec::new();
    for rotate in [false, true] {
        let out = dir.join(format!("rotate-{rotate}.gguf"));
        let opts = QuantizeOptions {
            method: Method::Rtn,
            bits: 4,
            rotate,
            ..QuantizeOptions::default()
        };
        quantize(
            &ModelSource::open(&input).unwrap(),
            &out,
            &opts,
            &mut |_, _, _| {},
        )
        .unwrap();
        let source = ModelSource::open(&out).unwrap();
        let ModelSource::Gguf(gguf) = &source else {
            unreachable!("quantize writes GGUF")
        };
        let mut blobs = 0;
        for t in gguf.tensors.iter().filter(|t| t.dtype == GgmlType::I8) {
            let m = EfqMatrix::parse(gguf.view(t).data).unwrap();
            let expected = if rotate && m.n_in.is_multiple_of(64) {
                ROTATION_RHT64
            } else {
                0
            };
            assert_eq!(m.rotation, expected, "{}", t.name);
            blobs += 1;
        }
        assert!(blobs > 0);
        let got = logits(&out, &tokens);
        errors.push(rel_rms(&got, &reference));
        if rotate {
            continue;
        }
        // The unrotated file written as version 1.
        let v1 = dir.join("v1.gguf");
        let mut writer = GgufWriter::new().with_alignment(64);
        for (key, value) in &gguf.metadata {
            let value = if key == "edgefusion.efq.version" {
                MetaValue::U32(1)
            } else {
                value.clone()
            };
            if key != "general.alignment" && key != "edgefusion.efq.rotation" {
                writer.add_metadata(key.clone(), value);
            }
        }
        let mut v1_blobs = Vec::new();
        for t in &gguf.tensors {
            let view = gguf.view(t);
            if view.dtype == GgmlType::I8 {
                let bytes = EfqMatrix::parse(view.data)
                    .unwrap()
                    .to_parts()
                    .to_bytes_v1()
                    .unwrap();
                assert_eq!(&bytes[..4], b"EFQ1");
                v1_blobs.push((t.name.clone(), bytes));
            }
        }
        for t in &gguf.tensors {
            let view = gguf.view(t);
            match v1_blobs.iter().find(|(name, _)| *name == t.name) {
                Some((_, bytes)) => writer.add_tensor(
                    t.name.clone(),
                    GgmlType::I8,
                    &[bytes.len()],
                    bytes.as_slice(),
                ),
                None => writer.add_tensor(t.name.clone(), view.dtype, view.shape, view.data),
            };
        }
        writer.write(&v1).unwrap();
        assert_eq!(
            logits(&v1, &tokens),
            got,
            "a version-1 file reads differently"
        );
    }
    eprintln!(
        "relative logit RMS error: plain {:.4}, rotated {:.4}",
        errors[0], errors[1]
    );
    // Random weights are already incoherent: rotation must not make them worse (beyond noise).
    assert!(errors[1] < 1.15 * errors[0], "{errors:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Where the budget holds the source's own encoding, the allocator writes it unchanged: a
/// Q4_1 source at 5.0 bits per weight (embedding and head at 6 bits, where Q4_1 is
/// smaller) comes back as itself, logits bit-equal; at 4.7 bits the file mixes kept layer
/// matrices with rotated EFQ ones within the budget and runs close to the source; with
/// `keep_source` off nothing is kept.
#[test]
fn the_source_encoding_is_kept_where_the_budget_holds_it() {
    let dir = std::env::temp_dir().join(format!("ef-quant-keep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-q4_1.gguf");
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 512).collect();
    let reference = logits(&input, &tokens);
    let types = |path: &std::path::Path| {
        let source = ModelSource::open(path).unwrap();
        let ModelSource::Gguf(gguf) = &source else {
            unreachable!()
        };
        gguf.tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype))
            .collect::<Vec<_>>()
    };
    let source_types = types(&input);
    for (bpw, keep_source) in [(5.0, true), (4.7, true), (5.0, false)] {
        let out = dir.join(format!("{bpw}-{keep_source}.gguf"));
        let opts = QuantizeOptions {
            bpw,
            calibration: None,
            sensitivity: false,
            embedding_bits: 6,
            keep_source,
            ..QuantizeOptions::default()
        };
        let report = quantize(
            &ModelSource::open(&input).unwrap(),
            &out,
            &opts,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(report.linear_bpw <= bpw, "{bpw}: {}", report.linear_bpw);
        let kept = report.matrices.iter().filter(|m| m.kept.is_some()).count();
        let got = logits(&out, &tokens);
        let written = types(&out);
        // Every matrix reported kept is written as the source's tensor, the rest as EFQ.
        for m in &report.matrices {
            let dtype = written.iter().find(|(n, _)| *n == m.name).unwrap().1;
            let want = match m.kept {
                Some(t) => t,
                None => edgefusion_kernels::GgmlType::I8,
            };
            assert_eq!(dtype, want, "{bpw} {keep_source}: {}", m.name);
        }
        match (bpw, keep_source) {
            (5.0, true) => {
                assert_eq!(kept, report.matrices.len());
                assert_eq!(written, source_types);
                assert_eq!(got, reference, "a file of kept tensors is its source");
            }
            (4.7, true) => {
                let kept_layers = report
                    .matrices
                    .iter()
                    .filter(|m| m.kept.is_some() && !m.role.is_embedding_or_head())
                    .count();
                let layers = report
                    .matrices
                    .iter()
                    .filter(|m| !m.role.is_embedding_or_head())
                    .count();
                assert!(
                    kept_layers > 0 && kept_layers < layers,
                    "{kept_layers} of {layers} layer matrices kept"
                );
                let err = rel_rms(&got, &reference);
                eprintln!("4.7 bpw, {kept_layers} of {layers} kept: relative logit RMS {err:.4}");
                assert!(err < 0.6, "{err}");
            }
            _ => {
                assert_eq!(kept, 0);
                assert!(rel_rms(&got, &reference) < 0.6);
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
