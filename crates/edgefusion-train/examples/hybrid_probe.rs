//! Experiment driver for the stage-wise conversion (layer choice + alignment), before it
//! joins `edgefusion train`: `cargo run --release -p edgefusion-train --example hybrid_probe -- KEY=VALUE...`

use std::collections::HashMap;

use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model};
use edgefusion_train::align::{align_layers, AlignEvent, AlignOptions};
use edgefusion_train::choose::{
    copy_windows, greedy_restore_by, kl_to_teacher, teacher_windows, teacher_windows_from,
};
use edgefusion_train::distill::{from_vars, DistillOptions};
use edgefusion_train::finetune::{finetune_kl, finetune_optimizer, FinetuneOptions};
use edgefusion_train::init::{
    hybrid_layout, ssm_from_attention, write_hybrid_tuned, SsmInitSource,
};
use edgefusion_train::student::Student;

fn main() {
    let args: HashMap<String, String> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: &str| get(k, d).parse::<f64>().unwrap();
    let base = get("base", "assets/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = std::fs::read_to_string(get("text", "assets/text/sotu.txt")).unwrap();
    let window = num("window", "64") as usize;
    let sink = num("sink", "4") as usize;
    let threads = num("threads", "2") as usize;
    let out = get("out", "runs/probe.gguf");
    let source = ModelSource::open(&base).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        panic!()
    };
    let tokenizer = edgefusion_runtime::tokenizer::Tokenizer::from_gguf(gguf).unwrap();
    let tokens = tokenizer.encode(&text, false).unwrap();
    if let Some(path) = args.get("dump_tokens") {
        // Tokens of `text` as u32 little-endian (for prototypes outside Rust).
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
        return;
    }
    let teacher = Model::load(&source).unwrap();
    let mut student = Model::load(&source).unwrap();
    student.config.window = window;
    student.config.sink = sink;
    student.config.ssm_d_state = num("d_state", "32") as usize;
    student.config.ssm_d_conv = 4;
    let t0 = std::time::Instant::now();
    let layers: Vec<usize> = match args.get("layers") {
        Some(list) => edgefusion_model::convert::parse_layer_list(list).unwrap(),
        None => {
            let choice_len = num("choice_len", "1024") as usize;
            let choice_windows = num("choice_windows", "2") as usize;
            // The choice reads the end of the text; alignment its start.
            let from = tokens.len() - choice_len * choice_windows;
            let tw = teacher_windows(
                &teacher,
                &tokens[from..],
                choice_len,
                choice_windows,
                64,
                threads,
            )
            .unwrap();
            let n_conv = num("convert", "20") as usize;
            // copy_windows=N copy_weight=W: the score adds W × the KL on N copy windows
            // (a span repeated from far back, taken from before the choice's text).
            let n_copy = num("copy_windows", "0") as usize;
            let copy_weight = num("copy_weight", "1");
            let span = num("copy_span", "32") as usize;
            let copy = (n_copy > 0).then(|| {
                let to = from;
                let start = to - n_copy * (choice_len - span);
                copy_windows(
                    &teacher,
                    &tokens[start..to],
                    choice_len,
                    n_copy,
                    span,
                    64,
                    threads,
                )
                .unwrap()
            });
            let mut calls = 0;
            let choice = greedy_restore_by(
                &mut student,
                n_conv,
                num("candidates", "6") as usize,
                &mut |d, t| eprint!("\rchoice {d}/{t} ({:.0} s)", t0.elapsed().as_secs_f64()),
                &mut |m| {
                    let prose = kl_to_teacher(m, &tw, threads)?;
                    let copied = match &copy {
                        Some(c) => kl_to_teacher(m, c, threads)?,
                        None => 0.0,
                    };
                    calls += 1;
                    if calls == 1 {
                        eprintln!("all converted: prose KL {prose:.4}, copy KL {copied:.4}");
                    }
                    Ok(prose + copy_weight * copied)
                },
            )
            .unwrap();
            if let Some(c) = &copy {
                for l in &choice.converted {
                    student.set_layer(*l, LayerType::Window, None).unwrap();
                }
                for l in (0..student.config.n_layers).filter(|l| !choice.converted.contains(l)) {
                    student.set_layer(l, LayerType::Attention, None).unwrap();
                }
                println!(
                    "chosen: prose KL {:.4}, copy KL {:.4}",
                    kl_to_teacher(&student, &tw, threads).unwrap(),
                    kl_to_teacher(&student, c, threads).unwrap()
                );
            }
            eprintln!();
            println!(
                "choice: KL all {:.4} -> final {:.4}; converted {:?}; {} evaluations, {:.0} s",
                choice.kl_all_converted,
                choice.kl_final,
                choice.converted,
                choice.evaluations,
                t0.elapsed().as_secs_f64()
            );
            for s in &choice.steps {
                println!("  restore {:2} -> kl {:.4}", s.restored, s.kl);
            }
            for l in 0..student.config.n_layers {
                student.set_layer(l, LayerType::Attention, None).unwrap();
            }
            choice.converted
        }
    };
    if args.contains_key("choose_only") {
        return;
    }
    if let Some(steps) = args.get("finetune") {
        // End-to-end KL with LoRA on the feed-forward blocks over the window-only model.
        let steps: usize = steps.parse().unwrap();
        let seq_len = num("seq_len", "512") as usize;
        let tw = teacher_windows_from(
            &teacher,
            &tokens,
            seq_len,
            steps,
            0,
            64,
            threads,
            &mut |d, t| eprint!("\rteacher {d}/{t} ({:.0} s)", t0.elapsed().as_secs_f64()),
        )
        .unwrap();
        eprintln!();
        // ssm=1: converted layers carry an SSM beside the window (output starting at zero),
        // trained with the adapters.
        let with_ssm = args.contains_key("ssm");
        let mut types = vec![LayerType::Attention; student.config.n_layers];
        for &l in &layers {
            types[l] = if with_ssm {
                LayerType::Ssm
            } else {
                LayerType::Window
            };
        }
        let hybrid = hybrid_layout(&teacher.config, &types, 32, 4, window, sink);
        let cfg = hybrid.clone();
        let ssms: Vec<_> = (0..cfg.n_layers)
            .map(|l| {
                let a = teacher.layers[l].mixer.attention().unwrap();
                let mut w = ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo);
                // Beside a window the SSM starts silent; alone (window 0) it starts as
                // the attention-initialised SSM.
                if window > 0 {
                    w.wo.iter_mut().for_each(|v| *v = 0.0);
                }
                w
            })
            .collect();
        let mut st = Student::new(&teacher, &cfg, &ssms, 0.0, seq_len).unwrap();
        st.layer_types = types.clone();
        let rank = num("rank", "8") as usize;
        if rank > 0 {
            st.add_ffn_lora(rank, num("alpha", "8"), 0).unwrap();
        }
        let mut vars = st.lora_vars();
        if with_ssm {
            for &l in &layers {
                vars.extend(st.layers[l].ssm.iter().cloned());
            }
        }
        let opts = FinetuneOptions {
            steps,
            lr: num("lr", "0.001"),
            warmup_steps: 4,
            grad_clip: 1.0,
            betas: [0.9, 0.95],
            window_dropout: num("window_dropout", "0"),
            seed: 0,
        };
        let mut opt = finetune_optimizer(vars, &opts).unwrap();
        finetune_kl(&st, &tw, &mut opt, &opts, &mut |r, _| {
            if r.step % 10 == 0 || r.step + 1 == steps {
                println!(
                    "step {} kl {:.4} grad {:.3} {:.0} tok/s",
                    r.step, r.kl, r.grad_norm, r.tokens_per_s
                );
            }
            Ok(())
        })
        .unwrap();
        let tuned = st.merged_ffn().unwrap();
        let trained: HashMap<usize, _> = layers
            .iter()
            .map(|&l| (l, from_vars(&st.layers[l].ssm).unwrap()))
            .collect();
        write_hybrid_tuned(
            gguf,
            &teacher,
            &hybrid,
            SsmInitSource::Trained(&trained),
            &tuned,
            out.as_ref(),
        )
        .unwrap();
        if with_ssm && window > 0 {
            // The same adapters with the SSMs dropped: what the SSM branch adds.
            let window_types: Vec<LayerType> = types
                .iter()
                .map(|&t| {
                    if t == LayerType::Ssm {
                        LayerType::Window
                    } else {
                        t
                    }
                })
                .collect();
            let no_ssm = hybrid_layout(&teacher.config, &window_types, 32, 4, window, sink);
            let path = out.replace(".gguf", ".no-ssm.gguf");
            write_hybrid_tuned(
                gguf,
                &teacher,
                &no_ssm,
                SsmInitSource::Attention,
                &tuned,
                path.as_ref(),
            )
            .unwrap();
        }
        println!("wrote {out}; total {:.0} s", t0.elapsed().as_secs_f64());
        return;
    }
    let seq_len = num("seq_len", "1024") as usize;
    let opts = AlignOptions {
        seq_len,
        n_windows: num("windows", "64") as usize,
        hidden_alignment: num("beta", "0"),
        fit: DistillOptions {
            seq_len,
            batch_size: num("batch", "4") as usize,
            epochs: num("epochs", "4") as usize,
            lr: num("lr", "0.001"),
            betas: [0.9, 0.95],
            weight_decay: 0.0,
            warmup_steps: 4,
            grad_clip: 1.0,
            chunk: num("chunk", "64") as usize,
            seed: 0,
        },
        threads,
    };
    let cfg = student.config.clone();
    let zero_out = window > 0;
    let init = |l: usize| {
        let a = teacher.layers[l].mixer.attention().unwrap();
        let mut w = ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo);
        if zero_out {
            w.wo.iter_mut().for_each(|v| *v = 0.0);
        }
        w
    };
    let t1 = std::time::Instant::now();
    let results = align_layers(
        &teacher,
        &mut student,
        &tokens,
        &layers,
        &opts,
        &init,
        &mut |e| match e {
            AlignEvent::Targets { layer } => {
                eprint!("\rlayer {layer}: targets ({:.0} s)          ", t1.elapsed().as_secs_f64())
            }
            AlignEvent::Step {
                layer,
                step,
                total,
                loss,
            } => eprint!("\rlayer {layer}: step {step}/{total} loss {loss:.4}   "),
            AlignEvent::Done(r) => {
                eprintln!();
                println!(
                    "layer {:2}: window error {:.4} -> layer error {:.4} (ssm loss {:.4} -> {:.4}) {} steps {:.0} s",
                    r.layer, r.window_error, r.layer_error, r.val_loss_init, r.val_loss, r.steps, r.seconds
                );
            }
        },
    )
    .unwrap();
    println!("align: {:.0} s", t1.elapsed().as_secs_f64());
    let mut types = vec![LayerType::Attention; cfg.n_layers];
    let mut trained = HashMap::new();
    for (l, (w, _)) in layers.iter().zip(results) {
        types[*l] = LayerType::Ssm;
        trained.insert(*l, w);
    }
    let hybrid = hybrid_layout(
        &teacher.config,
        &types,
        cfg.ssm_d_state,
        cfg.ssm_d_conv,
        window,
        sink,
    );
    write_hybrid_tuned(
        gguf,
        &teacher,
        &hybrid,
        SsmInitSource::Trained(&trained),
        &[],
        out.as_ref(),
    )
    .unwrap();
    println!("wrote {out}; total {:.0} s", t0.elapsed().as_secs_f64());
}
