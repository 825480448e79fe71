//! Training gradients against PyTorch (`tests/gen_grad_fixtures.py`): the SFT loss and the
//! gradient of every parameter on the tiny fixture models. Tolerance: loss within 1e-5
//! relative; each gradient tensor within 1e-4 relative to its largest entry (f32), reported as
//! max |Δ| / max |g|.

use std::collections::HashMap;

use rlx::{LoadOptions, Model};
use rlx_tests::fixture;

/// (sequences, masks, loss, gradients by name as (shape, values)).
type GradReference = (
    Vec<Vec<u32>>,
    Vec<Vec<bool>>,
    f64,
    HashMap<String, (Vec<usize>, Vec<f32>)>,
);

fn load_reference(name: &str) -> GradReference {
    let dir = fixture(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grads.json")).unwrap()).unwrap();
    let seqs = meta["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let masks = meta["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect()
        })
        .collect();
    let bytes = std::fs::read(dir.join("grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let grads = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect();
    (seqs, masks, meta["loss"].as_f64().unwrap(), grads)
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff / scale <= 1e-4,
        "{name}: max |Δ| = {diff:e}, max |g| = {scale:e}"
    );
}

#[test]
fn llama_sft_gradients_match_pytorch() {
    let (seqs, masks, want_loss, want) = load_reference("llama-f32");
    let model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let (loss, grads) = model.sft_gradients(&seqs, &masks).unwrap();
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "loss {loss} vs {want_loss}"
    );
    let named = grads.named_llama();
    assert_eq!(named.len(), want.len(), "every parameter has a gradient");
    for (name, g) in named {
        assert_close(&name, g, &want[&name].1);
    }
}

/// `(rows, cols)` → `(cols, rows)`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

#[test]
fn gpt2_sft_gradients_match_pytorch() {
    let (seqs, masks, want_loss, want) = load_reference("gpt2-f32");
    let model = Model::load(fixture("gpt2-f32"), LoadOptions::default()).unwrap();
    let (loss, g) = model.sft_gradients(&seqs, &masks).unwrap();
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "loss {loss} vs {want_loss}"
    );
    let c = model.config().hidden_size;
    let f = model.config().intermediate_size;
    let w = |n: &str| &want[&format!("transformer.{n}")].1;
    assert_close("wte (incl. tied head)", &g.tok_emb, w("wte.weight"));
    assert_close("wpe", g.pos_emb.as_ref().unwrap(), w("wpe.weight"));
    assert_close("ln_f.weight", &g.final_norm.w, w("ln_f.weight"));
    assert_close(
        "ln_f.bias",
        g.final_norm.b.as_ref().unwrap(),
        w("ln_f.bias"),
    );
    for (i, l) in g.layers.iter().enumerate() {
        let p = format!("h.{i}");
        assert_close(
            &format!("{p}.ln_1.weight"),
            &l.attn_norm.w,
            w(&format!("{p}.ln_1.weight")),
        );
        assert_close(
            &format!("{p}.ln_2.bias"),
            l.mlp_norm.b.as_ref().unwrap(),
            w(&format!("{p}.ln_2.bias")),
        );
        // c_attn: our q, k, v rows stacked, then back to Conv1D's (in, out).
        let qkv: Vec<f32> = [&l.q, &l.k, &l.v]
            .iter()
            .flat_map(|x| x.w.iter().copied())
            .collect();
        assert_close(
            &format!("{p}.attn.c_attn.weight"),
            &transpose(&qkv, 3 * c, c),
            w(&format!("{p}.attn.c_attn.weight")),
        );
        let qkv_b: Vec<f32> = [&l.q, &l.k, &l.v]
            .iter()
            .flat_map(|x| x.b.as_ref().unwrap().iter().copied())
            .collect();
        assert_close(
            &format!("{p}.attn.c_attn.bias"),
            &qkv_b,
            w(&format!("{p}.attn.c_attn.bias")),
        );
        assert_close(
            &format!("{p}.attn.c_proj.weight"),
            &transpose(&l.o.w, c, c),
            w(&format!("{p}.attn.c_proj.weight")),
        );
        assert_close(
            &format!("{p}.mlp.c_fc.weight"),
            &transpose(&l.mlp[0].w, f, c),
            w(&format!("{p}.mlp.c_fc.weight")),
        );
        assert_close(
            &format!("{p}.mlp.c_proj.weight"),
            &transpose(&l.mlp[1].w, c, f),
            w(&format!("{p}.mlp.c_proj.weight")),
        );
        assert_close(
            &format!("{p}.mlp.c_proj.bias"),
            l.mlp[1].b.as_ref().unwrap(),
            w(&format!("{p}.mlp.c_proj.bias")),
        );
    }
}

#[test]
fn masks_that_select_nothing_and_empty_batches_are_errors() {
    let model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let seqs = vec![vec![1u32, 5, 6]];
    assert!(model.sft_gradients(&seqs, &[vec![false; 3]]).is_err());
    assert!(model
        .sft_gradients(&seqs, &[vec![true, true, true]])
        .is_err());
    assert!(model.sft_gradients(&seqs, &[vec![false; 2]]).is_err());
    assert!(model.sft_gradients::<Vec<u32>>(&[], &[]).is_err());
    assert!(model
        .sft_gradients(&[vec![1u32, 9999]], &[vec![false, true]])
        .is_err());
}
