//! Prints the logits of the last position for a list of token ids, to compare engines.
//! `cargo run --release -p edgefusion-runtime --example dump_logits -- MODEL f16|f32 ID...`

use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::{KvType, Logits, Session, SessionOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, kv, ids @ ..] = args.as_slice() else {
        return Err("usage: dump_logits MODEL f16|f32 ID...".into());
    };
    let ids: Vec<u32> = ids.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let source = ModelSource::open(path)?;
    let model = Model::load(&source)?;
    let mut opts = SessionOptions::new(512, 1);
    opts.kv_type = if kv == "f32" {
        KvType::F32
    } else {
        KvType::F16
    };
    let mut session = Session::new(&model, opts)?;
    let logits = session.forward(&ids, Logits::Last)?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in order.iter().take(8) {
        println!("{i} {:.6}", logits[i]);
    }
    Ok(())
}
