//! `ModelSource`: one lookup by role over a GGUF file or a Hugging Face folder.

use edgefusion_io::gguf::{GgufWriter, MetaValue};
use edgefusion_io::{IoError, ModelSource, TensorRole};
use edgefusion_kernels::GgmlType;
use safetensors::tensor::TensorView as StView;
use safetensors::Dtype;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn gguf_source_by_role() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let embd = f32_bytes(&[0.5; 4 * 6]);
    let q = f32_bytes(&[1.5; 4 * 4]);
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("llama".into()))
        .add_tensor(
            TensorRole::TokenEmbd.gguf_name(None),
            GgmlType::F32,
            &[4, 6],
            &embd[..],
        )
        .add_tensor(
            TensorRole::AttnQ.gguf_name(Some(0)),
            GgmlType::F32,
            &[4, 4],
            &q[..],
        )
        .add_tensor(
            "rope_freqs.weight",
            GgmlType::F32,
            &[4],
            f32_bytes(&[1.0; 4]),
        );
    writer.write(&path).unwrap();

    let source = ModelSource::open(&path).unwrap();
    assert!(matches!(source, ModelSource::Gguf(_)));
    assert_eq!(source.path(), path);
    let embd_view = source.tensor(TensorRole::TokenEmbd, None).unwrap();
    assert_eq!(embd_view.shape, [4, 6]);
    assert_eq!(embd_view.data, &embd[..]);
    assert_eq!(
        source.tensor(TensorRole::AttnQ, Some(0)).unwrap().data,
        &q[..]
    );
    assert!(source.try_tensor(TensorRole::AttnQBias, Some(0)).is_none());
    assert!(source.try_tensor(TensorRole::Output, None).is_none());
    assert_eq!(source.tensors().len(), 3);
    assert_eq!(
        source.role_of("blk.0.attn_q.weight"),
        Some((TensorRole::AttnQ, Some(0)))
    );

    let err = source.tensor(TensorRole::AttnQ, Some(1)).unwrap_err();
    assert!(matches!(err, IoError::MissingTensor { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("tiny.gguf") && msg.contains("blk.1.attn_q.weight"),
        "{msg}"
    );
}

#[test]
fn hf_source_by_role() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 4}"#).unwrap();
    let embd = f32_bytes(&[0.25; 6 * 4]);
    let bias = f32_bytes(&[2.0; 4]);
    let tensors = vec![
        (
            TensorRole::TokenEmbd.hf_name(None),
            StView::new(Dtype::F32, vec![6, 4], &embd).unwrap(),
        ),
        (
            TensorRole::AttnQBias.hf_name(Some(0)),
            StView::new(Dtype::F32, vec![4], &bias).unwrap(),
        ),
    ];
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(tensors, None).unwrap(),
    )
    .unwrap();

    let source = ModelSource::open(dir.path()).unwrap();
    assert!(matches!(source, ModelSource::HfDir(_)));
    let embd_view = source.tensor(TensorRole::TokenEmbd, None).unwrap();
    // (vocab, d_model) in safetensors order becomes (d_model, vocab) in ggml order.
    assert_eq!(embd_view.shape, [4, 6]);
    assert_eq!(embd_view.row_len(), 4);
    assert_eq!(embd_view.n_rows(), 6);
    assert_eq!(embd_view.data, &embd[..]);
    assert_eq!(
        source
            .try_tensor(TensorRole::AttnQBias, Some(0))
            .unwrap()
            .data,
        &bias[..]
    );
    assert!(source.try_tensor(TensorRole::Output, None).is_none());
    assert_eq!(source.tensors().len(), 2);

    let err = source.tensor(TensorRole::Output, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().display().to_string()) && msg.contains("lm_head.weight"),
        "{msg}"
    );
}

#[test]
fn missing_path_and_odd_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = ModelSource::open(dir.path().join("absent")).unwrap_err();
    assert!(matches!(err, IoError::NotFound { .. }));
    assert!(err.to_string().contains("absent"), "{err}");

    // A file that is not GGUF goes to the GGUF reader and says so.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let msg = ModelSource::open(&text).unwrap_err().to_string();
    assert!(
        msg.contains("notes.txt") && msg.contains("not a GGUF file"),
        "{msg}"
    );

    #[cfg(unix)]
    {
        let err = ModelSource::open("/dev/null").unwrap_err();
        assert!(matches!(err, IoError::NotAModel { .. }), "{err}");
    }
}
