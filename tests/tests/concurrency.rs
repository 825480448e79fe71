//! One model shared by 8 threads, generating for a bounded soak period: every output equals the
//! sequential run of the same request, and the process's memory does not grow after the first
//! round. `RLX_SOAK_SECONDS` sets the period (default 15 s; docs/RELIABILITY.md quotes a
//! 120 s run).

use std::time::{Duration, Instant};

use rlx::{Generation, LoadOptions, Model, SamplingParams};
use rlx_tests::fixture;

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn request(i: usize) -> (Vec<Vec<u32>>, SamplingParams) {
    let prompts = (0..1 + i % 3)
        .map(|j| {
            (0..2 + (i + j) % 5)
                .map(|t| ((i * 31 + j * 7 + t * 3) % 90 + 3) as u32)
                .collect()
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: 12 + i % 5,
        temperature: if i.is_multiple_of(2) { 0.0 } else { 0.9 },
        top_p: 0.95,
        seed: i as u64,
        stop_token_ids: Some(Vec::new()),
        ..SamplingParams::default()
    };
    (prompts, params)
}

#[test]
fn eight_threads_share_a_model_without_drift_or_growth() {
    let soak = std::env::var("RLX_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15u64);
    let model = Model::load(
        fixture("llama-f32"),
        LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    const REQUESTS: usize = 24;
    let expected: Vec<Vec<Generation>> = (0..REQUESTS)
        .map(|i| {
            let (p, s) = request(i);
            model.generate(&p, &s, None).unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(soak);
    let mut rounds = 0usize;
    let mut rss_after_first = None;
    let mut rss_max = 0;
    while rounds < 2 || Instant::now() < deadline {
        std::thread::scope(|scope| {
            for t in 0..8 {
                let (model, expected) = (&model, &expected);
                scope.spawn(move || {
                    for i in (t..REQUESTS).step_by(8) {
                        let (p, s) = request(i);
                        let got = model.generate(&p, &s, None).unwrap();
                        assert_eq!(got, expected[i], "request {i} on thread {t}");
                    }
                });
            }
        });
        rounds += 1;
        let rss = rss_kib().unwrap_or(0);
        if rounds == 1 {
            rss_after_first = Some(rss);
        }
        rss_max = rss_max.max(rss);
    }
    let first = rss_after_first.unwrap_or(0);
    eprintln!("{rounds} rounds of {REQUESTS} requests on 8 threads; RSS {first} KiB after the first, at most {rss_max} KiB");
    // Allocator caches may settle a little; a leak per request would grow with the rounds.
    assert!(
        rss_max <= first + 16 * 1024,
        "RSS grew from {first} KiB to {rss_max} KiB over {rounds} rounds"
    );
}
