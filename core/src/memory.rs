//! Memory budget checks before large allocations.
//!
//! Linux overcommits: a huge `Vec` is granted at once and the process is killed later, when the
//! pages are touched. So before a request allocates its big buffers (KV caches, activations kept
//! for a backward pass, gradients), it estimates them and compares with what is available:
//! the smallest of `MemAvailable` (/proc/meminfo), the cgroup v2 limit minus current use, and a
//! limit the embedder sets ([`set_memory_limit`] or `RLX_MEMORY_LIMIT`, in bytes or with a
//! K/M/G suffix). A request that cannot fit fails with [`Error::OutOfMemory`] instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// 0 = no limit set through the API.
static API_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Caps the bytes one request may plan to allocate (`None` removes the cap). Process-wide.
pub fn set_memory_limit(bytes: Option<u64>) {
    API_LIMIT.store(bytes.unwrap_or(0), Ordering::Relaxed);
}

fn env_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("RLX_MEMORY_LIMIT")
            .ok()
            .and_then(|v| parse_size(&v))
    })
}

/// `123`, `64K`, `512M`, `2G` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let n: u64 = digits.trim().parse().ok()?;
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Bytes this process may still allocate, by the tightest known bound (`None` when none is
/// known, e.g. off Linux without a limit set).
pub fn available_bytes() -> Option<u64> {
    let api = match API_LIMIT.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    };
    [api, env_limit(), mem_available(), cgroup_headroom()]
        .into_iter()
        .flatten()
        .min()
}

fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn cgroup_headroom() -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max" = unlimited: None
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Fails with [`Error::OutOfMemory`] when `needed` bytes for `what` exceed what is available.
pub fn ensure_fits(needed: u64, what: &str) -> Result<()> {
    match available_bytes() {
        Some(available) if needed > available => Err(Error::OutOfMemory {
            what: what.to_owned(),
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

/// `a · b · …` in bytes of f32, saturating (an absurd request still compares as too large).
pub(crate) fn f32_bytes(dims: &[usize]) -> u64 {
    dims.iter()
        .fold(4u64, |acc, &d| acc.saturating_mul(d as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn saturating_estimates() {
        assert_eq!(f32_bytes(&[2, 3]), 24);
        assert_eq!(f32_bytes(&[usize::MAX, usize::MAX]), u64::MAX);
    }
}
