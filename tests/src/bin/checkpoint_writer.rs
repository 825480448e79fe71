//! Test helper for checkpoints: trains the model at `argv[1]` one SFT step, then writes
//! checkpoints `argv[2]/checkpoint-<n>` in a loop (numbering after the folders already there)
//! until it is killed. With a third argument `lora`, it trains LoRA adapters (r 2 on q_proj
//! and v_proj) instead and first writes the merged model to `argv[2]/merged`.

use std::path::PathBuf;

use rlx::convert::{save_hf_folder, SaveDtype};
use rlx::{LoadOptions, LoraConfig, Model, TrainConfig, Trainer};

fn main() -> Result<(), rlx::Error> {
    let args: Vec<String> = std::env::args().collect();
    let (model_dir, out) = match (args.get(1), args.get(2)) {
        (Some(m), Some(o)) => (PathBuf::from(m), PathBuf::from(o)),
        _ => {
            return Err(rlx::Error::invalid(
                "usage: checkpoint_writer MODEL OUT [lora]",
            ))
        }
    };
    let lora = args.get(3).is_some_and(|a| a == "lora");
    let mut model = Model::load(&model_dir, LoadOptions::default())?;
    if lora {
        model.attach_lora(&LoraConfig::new(2, 4.0))?;
    }
    let config = TrainConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    let seq = [1u32, 5, 9, 2, 7, 3];
    trainer.sft_step(&[seq], &[vec![false, false, true, true, true, true]])?;
    if lora {
        let mut merged = trainer.model().clone();
        merged.merge_lora()?;
        save_hf_folder(&merged, &out.join("merged"), SaveDtype::F32)?;
    }
    let mut n = std::fs::read_dir(&out)
        .map_err(|e| rlx::Error::io(&out, e))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        })
        .count();
    loop {
        let extra = serde_json::json!({ "n": n });
        trainer.save_checkpoint(&out.join(format!("checkpoint-{n}")), &extra)?;
        n += 1;
    }
}
