//! Text ↔ token ids through the `tokenizers` crate (`tokenizer.json`), plus the special-token
//! facts of `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_token: Option<String>,
    bos_token: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`; reads `tokenizer_config.json` beside it when present.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut tok = Tokenizer {
            inner,
            eos_token: None,
            bos_token: None,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
                path: cfg_path.clone(),
                message: e.to_string(),
            })?;
            tok.eos_token = special_token(&cfg, "eos_token");
            tok.bos_token = special_token(&cfg, "bos_token");
        }
        Ok(Some(tok))
    }

    /// Wraps a built tokenizer; `eos_token` names its end-of-sequence token, if any.
    pub fn with_special(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Tokenizer {
            inner,
            eos_token,
            bos_token,
        }
    }

    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        Self::with_special(inner, None, None)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (a BOS
    /// for Llama-style tokenizers), as transformers does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `tokenizer_config.json`'s `eos_token`, if it names a known token.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A special token given as a string or as `{"content": ...}`.
fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Streams text out of a growing list of token ids: returns only text that is complete (no
/// half of a multi-byte character), so a caller can print pieces as they come.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new printable text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text.get(self.emitted..).map(str::to_owned);
        self.emitted = text.len();
        Ok(piece)
    }

    /// Whatever text is still held back at the end (e.g. bytes that never formed a character).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let text = tok.decode(&self.ids, true)?;
        let piece = text
            .get(self.emitted..)
            .filter(|p| !p.is_empty())
            .map(str::to_owned);
        self.emitted = text.len();
        Ok(piece)
    }
}
