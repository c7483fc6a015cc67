//! Liveness tracking: a node cut off from everyone is marked down by every honest node within
//! `down_after + hello_interval` (plus link latency), and up again soon after it reconnects.

use archipel_node::membership::MembershipTiming;
use archipel_sim::{Scenario, run, seeds};
use std::time::Duration;

#[test]
fn isolated_node_is_seen_down_then_up() {
    for seed in seeds(0..20) {
        let mut s = Scenario::from_seed(seed);
        s.partition = None;
        s.delivery_percent = 100;
        s.isolations = vec![(0, Duration::from_secs(10), Duration::from_secs(20))];
        s.timing = MembershipTiming::default();
        let slack = s.latency.as_millis() as u64 + 4 * s.jitter.as_millis() as u64 + 100;
        let limit = s.timing.down_after_ms + s.timing.hello_interval_ms + slack;
        let o = run(s);
        let victim = o.honest[0];
        for observer in 1..o.honest.len() {
            let events: Vec<_> = o.trace.iter().filter(|e| e.node == observer && e.peer == Some(victim)).collect();
            let down = events.iter().find(|e| e.what == "status Down" && e.at_ms >= 10_000);
            let replay = format!(
                "replay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test crashed_node_goes_down_and_up"
            );
            let down = down.unwrap_or_else(|| panic!("seed {seed}: node {observer} never saw node 0 down; {replay}"));
            assert!(
                down.at_ms <= 10_000 + limit,
                "seed {seed}: node {observer} saw node 0 down only at {} ms; {replay}",
                down.at_ms
            );
            let up = events.iter().find(|e| e.what == "status Up" && e.at_ms >= 20_000);
            let up = up.unwrap_or_else(|| panic!("seed {seed}: node {observer} never saw node 0 up again; {replay}"));
            assert!(
                up.at_ms <= 20_000 + limit,
                "seed {seed}: node {observer} saw node 0 up only at {} ms; {replay}",
                up.at_ms
            );
        }
    }
}
