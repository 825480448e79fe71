//! Helpers shared by the fuzz targets: splitting one input into several files, a scratch folder
//! (in `/dev/shm` when there is one) for the APIs that read paths, and the test fixtures.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Separator of the parts of a text input (JSON and Jinja never need a NUL byte).
pub const TEXT_SEP: &[u8] = b"\0";
/// Separator of the parts of a binary input (safetensors bytes are full of NULs).
pub const BINARY_SEP: &[u8] = b"\n--8<--\n";

/// `data` split at every `sep`.
pub fn split<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        parts.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    parts.push(rest);
    parts
}

/// A folder private to this process, removed at exit.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let mut b = tempfile::Builder::new();
        b.prefix("rlx-fuzz-");
        if shm.is_dir() {
            b.tempdir_in(shm)
        } else {
            b.tempdir()
        }
        .expect("scratch folder")
    })
    .path()
}

/// A fresh empty folder inside [`scratch`] (the previous input's folder is removed).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Writes `bytes` to `scratch()/name` and returns the path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Whether a file name is one the targets may create in their scratch folders (plain, short,
/// ASCII): the fuzzer picks shard names, and they must never point outside the folder.
pub fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Text of at most `max` bytes from arbitrary bytes (lossy UTF-8).
pub fn text(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

/// Whether `RLX_FUZZ_TRACE` is set: the targets then report how far each input got (to check
/// that the seeds reach the deep paths: `RLX_FUZZ_TRACE=1 target/.../gguf -runs=0 corpus/gguf`).
pub fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("RLX_FUZZ_TRACE").is_some())
}

/// `eprintln!` when [`tracing`].
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::tracing() {
            eprintln!($($arg)*);
        }
    };
}
