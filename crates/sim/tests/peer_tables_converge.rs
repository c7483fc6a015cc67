//! Invariant: once faults heal, honest connected nodes converge on the same peer table and keep
//! hearing from every honest node. Links stay lossy (up to 20 %) after healing, so a peer may
//! flap down for a moment; what must hold is that it is never silent for long.

use archipel_sim::check_seeds;
use std::time::Duration;

#[test]
fn honest_nodes_converge_on_the_same_peer_table() {
    check_seeds("peer_tables_converge", 0..40, |o| {
        // The scenario heals at most ~40 s in; it runs for 60 s, leaving ample settling time.
        assert!(o.scenario.healed_at() + Duration::from_secs(10) <= o.scenario.duration);
        let first = &o.final_tables[0];
        for (i, t) in o.final_tables.iter().enumerate() {
            if t.digest != first.digest {
                return Err(format!(
                    "node {i} has table digest {} but node 0 has {}",
                    hex(&t.digest),
                    hex(&first.digest)
                ));
            }
            let end_ms = o.scenario.duration.as_millis() as u64;
            for (j, h) in o.honest.iter().enumerate() {
                if i == j {
                    continue;
                }
                let silent = t.last_seen_ms.get(h).map_or(end_ms, |seen| end_ms.saturating_sub(*seen));
                if silent > 10_000 {
                    return Err(format!("node {i} has not heard from honest node {j} ({}) for {silent} ms", h.short()));
                }
            }
        }
        Ok(())
    });
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}
