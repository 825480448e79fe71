//! Inputs that crashed a fuzz target (fuzz/, docs/RELIABILITY.md), fed through the public API:
//! each must now be a clean `Err` (or `Ok`), never a panic. The raw inputs are in
//! fuzz/regressions/; `cargo fuzz run <target> fuzz/regressions/<file>` replays one.

use rlx::{ChatTemplate, Message};

/// chat_template: `{%for in messages%}` compiles (`in` taken as the loop variable) and fails at
/// render time with an error whose source span ends before it starts; formatting that error
/// with minijinja's debug info (`{e:#}` in `ChatTemplate::render`) computed `end_col - start_col`
/// and panicked (overflow with debug assertions, "capacity overflow" in `str::repeat` without).
/// Input: fuzz/regressions/chat_template-for-without-variable.
#[test]
#[ignore = "panics until core/src/chat.rs stops rendering minijinja's debug info for errors"]
fn chat_template_error_with_inverted_span_is_an_error() {
    let t =
        ChatTemplate::new("{%for in messages%}{%endfor%}", Some(""), Some("")).expect("compiles");
    for messages in [vec![], vec![Message::new("user", "")]] {
        for add_generation_prompt in [true, false] {
            let _ = t.render(&messages, add_generation_prompt);
        }
    }
}
