//! Requests too large for the memory fail with `Error::OutOfMemory` before allocating, and leave
//! the model and the trainer as they were. Runs in its own process: the limit is process-wide.

use rlx::train::{TrainConfig, Trainer};
use rlx::{Error, LoadOptions, Model, SamplingParams};
use rlx_tests::fixture;

fn model() -> Model {
    Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap()
}

#[test]
fn limits_are_checked_before_allocating() {
    let m = model();
    let params = SamplingParams {
        stop_token_ids: Some(Vec::new()),
        ..SamplingParams::greedy(8)
    };
    let prompt = vec![3u32, 5, 7];

    // A cap set by the embedder.
    rlx::set_memory_limit(Some(1024));
    match m.generate(&[&prompt], &params, None) {
        Err(Error::OutOfMemory {
            needed, available, ..
        }) => {
            assert!(needed > available && available <= 1024)
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    let mut trainer = Trainer::new(m.clone(), TrainConfig::default()).unwrap();
    let seq = [1u32, 4, 9, 16, 25, 3];
    let mask = vec![vec![false, true, true, true, true, true]];
    let err = trainer.sft_step(&[&seq[..]], &mask).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert_eq!(trainer.step_count(), 0, "a refused step changes nothing");
    rlx::set_memory_limit(None);

    // Without the cap the same requests run, and the model was not disturbed.
    let out = m.generate(&[&prompt], &params, None).unwrap();
    assert_eq!(out[0].tokens.len(), 8);
    trainer.sft_step(&[&seq[..]], &mask).unwrap();
    assert_eq!(trainer.step_count(), 1);

    // A batch no machine holds: refused from the system's own figures, not by being killed.
    let many: Vec<&[u32]> = vec![&prompt[..]; 20_000_000];
    let big = SamplingParams {
        stop_token_ids: Some(Vec::new()),
        ..SamplingParams::greedy(100)
    };
    let err = m.generate(&many, &big, None).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert!(err.to_string().contains("MiB"), "{err}");
}
