//! The scale section: BENCH_SCALE sites (250 and 500 by default) joining
//! one hub at once, as `make scale` runs them (`crate::scale`), each in a
//! lab of its own.

use super::Config;

/// Runs and prints each size; the targets missed: sites that did not get
/// in within their timeout.
pub(super) fn scale(cfg: &Config) -> Vec<String> {
    let sizes: Vec<usize> = std::env::var("BENCH_SCALE")
        .unwrap_or_else(|_| "250,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reports: Vec<_> = sizes
        .iter()
        .map(|n| crate::scale::run(&cfg.bin, *n, "warn", None))
        .collect();
    println!();
    println!("==================== scale ====================");
    let mut missed = vec![];
    for rep in &reports {
        println!("{rep}");
        if !rep.failures.is_empty() {
            missed.push(format!(
                "{} of {} sites did not join within their timeout",
                rep.failures.len(),
                rep.sites
            ));
        }
    }
    missed
}
