//! The training-side SSM (candle, chunked) against the runtime's f32 scan on the same
//! weights (layer 0 of the tiny hybrid fixture): what is trained is what runs.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use edgefusion_io::ModelSource;
use edgefusion_model::{Linear, Mixer, Model};
use edgefusion_runtime::mixer::ssm::{scan, Projections};
use edgefusion_train::ssm::{forward_chunked, SsmDims, SsmTensors};

fn rows(w: &Linear<'_>) -> Vec<f32> {
    let mut out = vec![0.0f32; w.n_out * w.n_in];
    for (r, row) in out.chunks_mut(w.n_in).enumerate() {
        w.dequantize_row_into(r, row);
    }
    out
}

/// `x (n, k) · wᵀ` for `w (m, k)` row-major.
fn project(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|xr| {
            w.chunks(k)
                .map(|wr| xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn candle_chunked_ssm_equals_runtime_scan() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-hybrid-f32.gguf");
    let source = ModelSource::open(&path).unwrap();
    let model = Model::load(&source).unwrap();
    let cfg = &model.config;
    let Mixer::Ssm { ssm: w, .. } = &model.layers[0].mixer else {
        panic!("layer 0 of the fixture is an SSM")
    };
    let (t, d) = (11usize, cfg.d_model);
    let h: Vec<f32> = (0..t * d)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();

    // The runtime: projections, then the scan, then the output projection.
    let (wc, wb, wx, wdt, wgate, wo) = (
        rows(&w.wc),
        rows(&w.wb),
        rows(&w.wx),
        rows(&w.wdt),
        rows(&w.wgate),
        rows(&w.wo),
    );
    let (mut c, mut b, mut x) = (
        project(&h, &wc, d),
        project(&h, &wb, d),
        project(&h, &wx, d),
    );
    let (dt, gate) = (project(&h, &wdt, d), project(&h, &wgate, d));
    let mut state = vec![0.0f32; cfg.ssm_state_floats()];
    let mut y = vec![0.0f32; t * cfg.q_dim()];
    let p = Projections {
        c: &mut c,
        b: &mut b,
        x: &mut x,
        dt: &dt,
        gate: &gate,
    };
    scan(cfg, w, p, &mut state, t, &mut y);
    let runtime = project(&y, &wo, cfg.q_dim());

    // Candle, in f64 from the same weights.
    let dev = Device::Cpu;
    let m = |v: &[f32], shape: (usize, usize)| {
        Tensor::from_vec(v.to_vec(), shape, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let v = |v: Vec<f32>| {
        let n = v.len();
        Tensor::from_vec(v, n, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (g, n) = (cfg.n_kv_heads, cfg.ssm_d_state);
    let tensors = SsmTensors {
        wc: m(&wc, (cfg.n_heads * n, d)),
        wb: m(&wb, (g * n, d)),
        wx: m(&wx, (cfg.kv_dim(), d)),
        wdt: m(&wdt, (g, d)),
        dt_bias: v(w.dt_bias.clone()),
        a_log: v(w.a_log.clone()),
        d: v(w.d.clone()),
        wgate: m(&wgate, (g, d)),
        conv: m(&w.conv, (cfg.ssm_channels(), cfg.ssm_d_conv)),
        wo: m(&wo, (d, cfg.q_dim())),
    };
    let dims = SsmDims {
        d_model: d,
        n_heads: cfg.n_heads,
        n_kv_heads: g,
        head_dim: cfg.head_dim,
        d_state: n,
        d_conv: cfg.ssm_d_conv,
    };
    let candle = forward_chunked(&tensors, &dims, &m(&h, (t, d)), 4)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let candle: Vec<f32> = candle.iter().map(|&v| v as f32).collect();
    let scale = candle.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    assert!(scale > 1e-2, "outputs too small to compare: {scale}");
    let err = edgefusion_testkit::max_rel_error(&runtime, &candle);
    assert!(err <= 1e-4, "max |candle − runtime| / scale = {err}");
}
