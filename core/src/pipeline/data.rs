//! JSONL datasets of the training stages, turned into token sequences with response masks.
//!
//! | stage | one line |
//! |---|---|
//! | SFT | `{"prompt", "response"}` or `{"messages": [{"role", "content"}, …]}` |
//! | RM, DPO | `{"prompt", "chosen", "rejected"}` or `{"prompt", "responses": [best, …, worst]}` |
//! | PPO, GRPO | `{"prompt"}` (or `{"messages"}` ending with a user turn) |
//!
//! With a chat template (the model's, unless turned off) a prompt is a user turn and a
//! response the assistant's answer; the mask selects exactly the assistant's tokens (every
//! assistant turn of a `messages` conversation). Without one, a sequence is
//! `bos? prompt response eos`. A ranked list of K answers gives all K·(K−1)/2 pairs, as
//! InstructGPT did.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use crate::chat::Message;
use crate::error::{Error, Result};
use crate::model::Model;

/// A sequence and the tokens of it that are trained (the response).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

/// Two answers to one prompt, the first preferred.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: Example,
    pub rejected: Example,
}

/// A prompt to sample answers for: its tokens (ending where the answer starts) and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub text: String,
}

/// A line that could not be used, with its 1-based line number.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

/// JSON objects with their 1-based line numbers.
pub type Lines = Vec<(usize, Value)>;

/// The JSON objects of a JSONL file with their line numbers (blank lines skipped). A line that
/// is not a JSON object is an error naming it, or, with `skip_bad`, is reported in the second
/// list and left out.
pub fn read_jsonl(path: &Path, skip_bad: bool) -> Result<(Lines, Vec<BadLine>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => rows.push((i + 1, v)),
            Ok(_) => bad.push(BadLine {
                line: i + 1,
                message: "not a JSON object".into(),
            }),
            Err(e) => bad.push(BadLine {
                line: i + 1,
                message: e.to_string(),
            }),
        }
        if !skip_bad {
            if let Some(b) = bad.first() {
                return Err(line_error(path, b));
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::format(path, "the dataset has no usable lines"));
    }
    Ok((rows, bad))
}

fn line_error(path: &Path, bad: &BadLine) -> Error {
    Error::format(
        path,
        format!(
            "line {}: {} (--skip-bad-lines leaves such lines out)",
            bad.line, bad.message
        ),
    )
}

/// Turns dataset lines into token sequences for one model.
pub struct Formatter<'a> {
    model: &'a Model,
    chat: bool,
    max_len: usize,
}

fn text_field<'v>(v: &'v Value, key: &str) -> Result<&'v str> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid(format!("`{key}` must be a string")))
}

fn messages(v: &Value) -> Result<Vec<Message>> {
    let list = v["messages"]
        .as_array()
        .ok_or_else(|| Error::invalid("`messages` must be a list"))?;
    list.iter()
        .map(|m| {
            Ok(Message::new(
                text_field(m, "role")?,
                text_field(m, "content")?,
            ))
        })
        .collect()
}

impl<'a> Formatter<'a> {
    /// Uses the model's chat template when `chat` is true (an error if it has none);
    /// sequences longer than `max_len` tokens are errors.
    pub fn new(model: &'a Model, chat: bool, max_len: usize) -> Result<Self> {
        model.require_tokenizer()?;
        if chat && model.chat_template().is_none() {
            return Err(Error::Template(
                "the model has no chat template; turn chat formatting off".into(),
            ));
        }
        let max_len = max_len.min(model.config().max_position_embeddings);
        Ok(Formatter {
            model,
            chat,
            max_len,
        })
    }

    /// Whether the model's chat template is applied.
    pub fn uses_chat_template(&self) -> bool {
        self.chat
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.model.require_tokenizer()?.encode(text, special)
    }

    fn check_len(&self, n: usize) -> Result<()> {
        if n > self.max_len {
            return Err(Error::ContextOverflow {
                requested: n,
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// Prompt tokens up to where the answer starts.
    fn prompt_tokens(&self, prompt: &[Message]) -> Result<Vec<u32>> {
        if self.chat {
            self.model.encode_chat(prompt, true)
        } else {
            let text: Vec<&str> = prompt.iter().map(|m| m.content.as_str()).collect();
            self.encode(&text.join("\n"), true)
        }
    }

    /// `prompt` followed by the assistant's `response`, with the response's tokens masked in.
    fn with_response(&self, prompt: &[Message], response: &str) -> Result<Example> {
        let head = self.prompt_tokens(prompt)?;
        let tokens = if self.chat {
            let mut conv = prompt.to_vec();
            conv.push(Message::new("assistant", response));
            let full = self.model.encode_chat(&conv, false)?;
            if !full.starts_with(&head) {
                return Err(Error::Template(
                    "the chat template renders the prompt differently once an answer follows \
                     it, so the answer's tokens cannot be told apart"
                        .into(),
                ));
            }
            full
        } else {
            let mut t = head.clone();
            t.extend(self.encode(response, false)?);
            t.extend(self.model.eos_token_ids().first());
            t
        };
        if tokens.len() <= head.len() {
            return Err(Error::invalid("the response has no tokens"));
        }
        self.check_len(tokens.len())?;
        let mask = (0..tokens.len()).map(|i| i >= head.len()).collect();
        Ok(Example { tokens, mask })
    }

    /// The prompt of a line: `prompt` as a user turn, or `messages` (all of them).
    fn prompt_messages(&self, v: &Value) -> Result<Vec<Message>> {
        match (v.get("prompt"), v.get("messages")) {
            (Some(_), _) => Ok(vec![Message::new("user", text_field(v, "prompt")?)]),
            (None, Some(_)) => messages(v),
            (None, None) => Err(Error::invalid("needs `prompt` (or `messages`)")),
        }
    }

    /// An SFT line.
    pub fn sft(&self, v: &Value) -> Result<Example> {
        if v.get("messages").is_some() && v.get("prompt").is_none() {
            return self.conversation(&messages(v)?);
        }
        let prompt = self.prompt_messages(v)?;
        self.with_response(&prompt, text_field(v, "response")?)
    }

    /// A whole conversation: every assistant turn is trained.
    fn conversation(&self, msgs: &[Message]) -> Result<Example> {
        if !msgs.iter().any(|m| m.role == "assistant") {
            return Err(Error::invalid("the conversation has no assistant turn"));
        }
        if !self.chat {
            // Plain text: everything before the last assistant turn is the prompt.
            let last = msgs
                .iter()
                .rposition(|m| m.role == "assistant")
                .unwrap_or(0);
            return self.with_response(&msgs[..last], &msgs[last].content);
        }
        let tokens = self.model.encode_chat(msgs, false)?;
        self.check_len(tokens.len())?;
        let mut mask = vec![false; tokens.len()];
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let start = self.model.encode_chat(&msgs[..i], true)?;
            let end = self.model.encode_chat(&msgs[..=i], false)?;
            if !tokens.starts_with(&start) || !tokens.starts_with(&end) || end.len() < start.len() {
                return Err(Error::Template(
                    "the chat template does not render conversations prefix by prefix, so \
                     assistant turns cannot be located"
                        .into(),
                ));
            }
            mask[start.len()..end.len()].fill(true);
        }
        Ok(Example { tokens, mask })
    }

    /// The preference pairs of an RM/DPO line.
    pub fn pairs(&self, v: &Value) -> Result<Vec<PreferencePair>> {
        let prompt = self.prompt_messages(v)?;
        let answers: Vec<&str> = match (v.get("chosen"), v.get("responses")) {
            (Some(_), _) => vec![text_field(v, "chosen")?, text_field(v, "rejected")?],
            (None, Some(list)) => {
                let list = list
                    .as_array()
                    .ok_or_else(|| Error::invalid("`responses` must be a list"))?;
                list.iter()
                    .map(|r| {
                        r.as_str()
                            .ok_or_else(|| Error::invalid("`responses` must hold strings"))
                    })
                    .collect::<Result<_>>()?
            }
            (None, None) => {
                return Err(Error::invalid(
                    "needs `chosen` and `rejected`, or a ranked `responses` list",
                ))
            }
        };
        if answers.len() < 2 {
            return Err(Error::invalid("a ranking needs at least two responses"));
        }
        let examples: Vec<Example> = answers
            .iter()
            .map(|a| self.with_response(&prompt, a))
            .collect::<Result<_>>()?;
        let mut pairs = Vec::new();
        for i in 0..examples.len() {
            for j in i + 1..examples.len() {
                pairs.push(PreferencePair {
                    chosen: examples[i].clone(),
                    rejected: examples[j].clone(),
                });
            }
        }
        Ok(pairs)
    }

    /// A PPO/GRPO prompt line.
    pub fn prompt(&self, v: &Value) -> Result<Prompt> {
        let msgs = self.prompt_messages(v)?;
        let tokens = self.prompt_tokens(&msgs)?;
        // Leave room for at least one generated token.
        self.check_len(tokens.len() + 1)?;
        let text = msgs.last().map(|m| m.content.clone()).unwrap_or_default();
        Ok(Prompt { tokens, text })
    }
}

/// Reads a dataset and formats every line with `f`; a line that fails is an error naming the
/// file and line, or (with `skip_bad`) is counted in the returned bad lines.
pub fn load<T>(
    path: &Path,
    skip_bad: bool,
    mut f: impl FnMut(&Value) -> Result<T>,
) -> Result<(Vec<T>, Vec<BadLine>)> {
    let (rows, mut bad) = read_jsonl(path, skip_bad)?;
    let mut out = Vec::with_capacity(rows.len());
    for (line, v) in rows {
        match f(&v) {
            Ok(x) => out.push(x),
            Err(e) if skip_bad => bad.push(BadLine {
                line,
                message: e.to_string(),
            }),
            Err(e) => {
                return Err(line_error(
                    path,
                    &BadLine {
                        line,
                        message: e.to_string(),
                    },
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(Error::format(path, "the dataset has no usable lines"));
    }
    Ok((out, bad))
}
