//! Human-readable tables for the CLI (`--json` prints the API's own JSON instead).

use archipel_node::api::NodesView;
use archipel_node::genesis::Genesis;
use archipel_node::membership::PeerStatus;
use archipel_types::NodeDescriptor;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

fn ago(now_ms: u64, then_ms: Option<u64>) -> String {
    match then_ms {
        None => "never".into(),
        Some(t) => {
            let ms = now_ms.saturating_sub(t);
            if ms < 60_000 { format!("{:.1}s ago", ms as f64 / 1000.0) } else { format!("{}m ago", ms / 60_000) }
        }
    }
}

/// Prints `archipel nodes`.
pub fn nodes_table(view: &NodesView) {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header([
        "NAME",
        "ID",
        "REGION",
        "COUNTRY",
        "OPERATOR",
        "JURISDICTION",
        "ROLES",
        "ADDRESS",
        "STATUS",
        "LAST SEEN",
        "LEASE",
        "SINCE BLOCK",
        "REPUTATION",
    ]);
    let mut rows: Vec<_> = view.nodes.iter().collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.node_id.cmp(&b.node_id)));
    for n in rows {
        let status = match n.status {
            PeerStatus::Up => "up",
            PeerStatus::Down => "DOWN",
        };
        let name = if n.is_self { format!("{} *", n.name) } else { n.name.clone() };
        t.add_row([
            name,
            n.node_id.short(),
            n.region.clone(),
            n.country.clone(),
            n.operator.clone(),
            n.operator_jurisdiction.clone(),
            n.roles.clone(),
            n.api_url.clone(),
            status.to_string(),
            ago(view.now_ms, n.last_seen_ms),
            match n.lease {
                Some(archipel_ledger::LeaseStatus::Up) => "up".into(),
                Some(archipel_ledger::LeaseStatus::Down) => "DOWN".into(),
                None => "not registered".into(),
            },
            n.lease_since_height.map_or("-".into(), |h| format!("#{h}")),
            n.reputation.map_or("-".into(), |r| r.to_string()),
        ]);
    }
    println!("{t}");
    let up = view.nodes.iter().filter(|n| n.status == PeerStatus::Up).count();
    let leased = view.nodes.iter().filter(|n| n.lease == Some(archipel_ledger::LeaseStatus::Up)).count();
    println!(
        "network {} — {up}/{} up, as seen by {} (*); {leased} with a live lease in finalized ledger state",
        view.network,
        view.nodes.len(),
        view.observer.short()
    );
}

/// The id, region, country, operator, jurisdiction and roles cells of a descriptor.
pub fn descriptor_cells(d: &NodeDescriptor) -> [String; 6] {
    [
        d.node_id.short(),
        d.region.to_string(),
        d.country.to_string(),
        d.operator.clone(),
        d.operator_jurisdiction.to_string(),
        d.roles.to_string(),
    ]
}

/// Prints the nodes of a genesis.
pub fn genesis_table(g: &Genesis) {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(["NAME", "ID", "REGION", "COUNTRY", "OPERATOR", "JURISDICTION", "ROLES", "P2P", "API", "VALIDATOR"]);
    for n in &g.nodes {
        let d = &n.descriptor;
        let mut row = vec![d.name.clone()];
        row.extend(descriptor_cells(d));
        row.push(d.p2p_address.to_string());
        row.push(d.api_address.to_string());
        row.push(if g.validators.contains(&d.node_id) { "yes".into() } else { String::new() });
        t.add_row(row);
    }
    println!("{t}");
    for a in &g.accounts {
        println!("account {} {} balance {} µ", a.name, a.key.short(), a.balance_micro);
    }
}
