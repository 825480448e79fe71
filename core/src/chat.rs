//! Chat templates: the Jinja template a model ships (`tokenizer.chat_template` in GGUF, or
//! `chat_template` in `tokenizer_config.json`) rendered with `minijinja`, as transformers'
//! `apply_chat_template` renders it.
//!
//! Templates are untrusted input: rendering runs with a fuel limit (bounded work, so no endless
//! loop), a recursion limit, and a cap on the output size; `raise_exception` in a template
//! becomes an error.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

const FUEL: u64 = 5_000_000;
const MAX_OUTPUT: usize = 4 << 20;
const MAX_RECURSION: usize = 64;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A template error as kind, detail and line. Not minijinja's alternate (`{:#}`) formatting: its
/// source excerpt overflowed on some malformed templates (found by fuzzing).
fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.kind().to_string();
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (line {line})"));
    }
    Error::Template(msg)
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported here, not at first use.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(MAX_RECURSION);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(template_error)?;
        Ok(ChatTemplate {
            source: source.to_owned(),
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(template_error)?;
        let out = tmpl
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(template_error)?;
        if out.len() > MAX_OUTPUT {
            return Err(Error::Template(format!(
                "rendered prompt is {} bytes, above the {MAX_OUTPUT}-byte limit",
                out.len()
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t.render(&[Message::new("user", " Hi ")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}", None, None).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", " ok ")], false).unwrap(),
            "OK"
        );
    }

    #[test]
    fn hostile_templates_are_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", None, None),
            Err(Error::Template(_))
        ));
        let raise =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let err = raise.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        let endless = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert!(matches!(
            endless.render(&[], false),
            Err(Error::Template(_))
        ));
        let deep = ChatTemplate::new(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            None,
            None,
        )
        .unwrap();
        assert!(matches!(deep.render(&[], false), Err(Error::Template(_))));
        // Fuzzing found this one: formatting its error with the source excerpt overflowed.
        let result = ChatTemplate::new("{%for in messages%}{%endfor%}", None, None)
            .and_then(|t| t.render(&[Message::new("user", "hi")], true));
        assert!(matches!(result, Err(Error::Template(_))), "{result:?}");
    }
}
