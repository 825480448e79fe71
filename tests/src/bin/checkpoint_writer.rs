//! Test helper for crash-safety: trains the model at `argv[1]` one step, then writes
//! checkpoints `argv[2]/checkpoint-<n>` in a loop (numbering after the ones already there)
//! until it is killed.

use std::path::PathBuf;

use rlx::{LoadOptions, Model, TrainConfig, Trainer};

fn main() -> Result<(), rlx::Error> {
    let args: Vec<String> = std::env::args().collect();
    let (model_dir, out) = match (args.get(1), args.get(2)) {
        (Some(m), Some(o)) => (PathBuf::from(m), PathBuf::from(o)),
        _ => return Err(rlx::Error::invalid("usage: checkpoint_writer MODEL OUT")),
    };
    let model = Model::load(&model_dir, LoadOptions::default())?;
    let mut trainer = Trainer::new(model, TrainConfig::default())?;
    let seq = [1u32, 5, 9, 2, 7, 3];
    trainer.sft_step(&[seq], &[vec![false, false, true, true, true, true]])?;
    let mut n = std::fs::read_dir(&out)
        .map_err(|e| rlx::Error::io(&out, e))?
        .count();
    loop {
        trainer.save_checkpoint(
            &out.join(format!("checkpoint-{n}")),
            &serde_json::json!({"n": n}),
        )?;
        n += 1;
    }
}
