//! Shared helpers of the privileged test tiers (program tests, namespace tests, Docker end-to-end).
//!
//! A privileged test calls [`require_root`] first: without root it skips with a message, except
//! under CI (`CI=true`), where a skipped tier is a failure.

pub mod agent;
pub mod diff;
pub mod docker;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod probe;
pub mod progtest;
pub mod unit;

/// Returns `true` when the test may run. Without root: prints why and returns `false`, or panics
/// under `CI=true`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: needs root, and CI=true does not allow skipping a privileged tier");
    }
    eprintln!("SKIPPED {test}: needs root (run the test suite as root)");
    false
}
