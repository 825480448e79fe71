//! Chat templates (`ChatTemplate::new` + `render`): untrusted Jinja from a model's files.
//!
//! Input: parts separated by NUL bytes — the template source, the BOS token, the EOS token,
//! then (role, content) pairs of messages (an odd last part is a user message). The template
//! is rendered with and without the generation prompt, and with no messages at all.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rlx::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let parts: Vec<String> = rlx_fuzz::split(data, rlx_fuzz::TEXT_SEP)
        .into_iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let bos = parts.get(1).map(String::as_str);
    let eos = parts.get(2).map(String::as_str);
    let template = match ChatTemplate::new(&parts[0], bos, eos) {
        Ok(t) => t,
        Err(e) => return rlx_fuzz::trace!("compile: {e}"),
    };
    assert_eq!(template.source(), parts[0]);
    let messages: Vec<Message> = parts
        .get(3..)
        .unwrap_or_default()
        .chunks(2)
        .map(|pair| match pair {
            [role, content] => Message::new(role.as_str(), content.as_str()),
            [content] => Message::new("user", content.as_str()),
            _ => unreachable!("chunks of two"),
        })
        .collect();
    for add_generation_prompt in [true, false] {
        let r = template.render(&messages, add_generation_prompt);
        rlx_fuzz::trace!("render: {r:?}");
    }
    let _ = template.render(&[], true);
});
