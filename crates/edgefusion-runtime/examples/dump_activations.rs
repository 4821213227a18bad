//! Writes every linear layer's input for a prompt as raw little-endian f32 files, to find the
//! first operation where two engines part (scripts/compare-activations-llamacpp.py).
//! `cargo run --release -p edgefusion-runtime --example dump_activations -- MODEL OUTDIR ID,ID,...`
//!
//! Files: `attn_norm-L`, `kqv_out-L`, `ffn_norm-L`, `ffn_swiglu-L`, `result_norm` (llama.cpp's
//! names for the same tensors), each `(n_tok, width)`, and `logits` of the last position.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::{LinearInput, Logits, Session, SessionOptions};

fn write(dir: &std::path::Path, name: &str, x: &[f32]) -> std::io::Result<()> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.f32")), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, out, ids] = args.as_slice() else {
        return Err("usage: dump_activations MODEL OUTDIR ID,ID,...".into());
    };
    let ids: Vec<u32> = ids
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let source = ModelSource::open(path)?;
    let model = Model::load(&source)?;
    let mut opts = SessionOptions::new(512, 2);
    opts.adapt_threads = false;
    let mut session = Session::new(&model, opts)?;
    let failed = Rc::new(RefCell::new(None));
    let dir = out.clone();
    let failed_ref = Rc::clone(&failed);
    session.set_observer(Some(Box::new(move |site, x: &[f32], _n| {
        let name = match site {
            LinearInput::Attention { layer } => format!("attn_norm-{layer}"),
            LinearInput::AttentionOutput { layer } => format!("kqv_out-{layer}"),
            LinearInput::FeedForward { layer } => format!("ffn_norm-{layer}"),
            LinearInput::FeedForwardDown { layer } => format!("ffn_swiglu-{layer}"),
            LinearInput::Head => "result_norm".to_string(),
            LinearInput::Ssm { layer } => format!("ssm_in-{layer}"),
            LinearInput::SsmOutput { layer } => format!("ssm_out-{layer}"),
        };
        if let Err(e) = write(&dir, &name, x) {
            failed_ref.borrow_mut().get_or_insert(e);
        }
    })));
    let logits = session.forward(&ids, Logits::Last)?.to_vec();
    session.set_observer(None);
    if let Some(e) = failed.borrow_mut().take() {
        return Err(format!("writing into {}: {e}", out.display()).into());
    }
    write(&out, "logits", &logits)?;
    Ok(())
}
