//! A `tokenizers::Tokenizer` built from GGUF metadata (`tokenizer.ggml.*`).
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizers `default`,
//! `gpt2` and `smollm` (`smollm` splits every digit off before the byte-level split, as the
//! original SmolLM2 tokenizer does; transformers' own GGUF conversion drops that step).
//! Control tokens (type 3) and user-defined tokens (type 4) become added tokens, matched before
//! the model runs.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::{GgufFile, MetaValue};

const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

pub fn tokenizer_from_gguf(f: &GgufFile) -> Result<Option<Tokenizer>> {
    let Some(model) = f.get("tokenizer.ggml.model") else {
        return Ok(None);
    };
    let model = model
        .as_str()
        .ok_or_else(|| bad("tokenizer.ggml.model must be a string"))?;
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model `{model}` (supported: gpt2 byte-level BPE)"
        )));
    }
    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let merges = string_array(f, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match f.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .ok_or_else(|| bad("tokenizer.ggml.token_type must be an array"))?
            .iter()
            .map(|t| {
                t.as_u64()
                    .ok_or_else(|| bad("token types must be integers"))
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(bad(
            "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length",
        ));
    }

    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.insert(tok.to_string(), id as u32).is_some() {
            return Err(bad(&format!(
                "token `{tok}` appears twice in the vocabulary"
            )));
        }
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| bad(&format!("merge `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(&format!("BPE model: {e}")))?;

    let byte_level = ByteLevel::new(false, true, true);
    let pre = match f.get("tokenizer.ggml.pre").and_then(MetaValue::as_str) {
        None | Some("default" | "gpt2") => PreTokenizerWrapper::ByteLevel(byte_level),
        Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer `{other}` (supported: default, gpt2, smollm)"
            )))
        }
    };
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre));
    inner.with_decoder(Some(ByteLevelDecoder::default()));

    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(tok, &t)| AddedToken::from(tok.to_string(), t == TOKEN_CONTROL))
        .collect();
    inner.add_special_tokens(&specials);

    let id = |key: &str| -> Result<Option<u32>> {
        match f.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
                .map(Some)
                .ok_or_else(|| bad(&format!("{key} is not a token id"))),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let add_bos = f
        .get("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    if let (true, Some(bos)) = (add_bos, bos) {
        let name = tokens[bos as usize].to_string();
        let template = TemplateProcessing::builder()
            .try_single(format!("{name} $A"))
            .and_then(|b| b.try_pair(format!("{name} $A {name} $B")))
            .map_err(|e| bad(&format!("BOS template: {e}")))?
            .special_tokens(vec![(name.clone(), bos)])
            .build()
            .map_err(|e| bad(&format!("BOS template: {e}")))?;
        inner.with_post_processor(Some(template));
    }
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
    Ok(Some(Tokenizer::with_special(inner, name(bos), name(eos))))
}

fn bad(msg: &str) -> Error {
    Error::Tokenizer(format!("GGUF metadata: {msg}"))
}

fn string_array<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    f.get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| bad(&format!("{key} must be an array of strings")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| bad(&format!("{key} must hold strings")))
        })
        .collect()
}
