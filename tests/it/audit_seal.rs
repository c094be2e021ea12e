//! Forward-secure sealing of the audit log, against an intruder with root on the gateway: one
//! who rewrites the table with every hash made again (the chain alone then looks whole), takes
//! out a seal, cuts the end off, empties the table, seals again with the key left on disk, or
//! replaces that key. `poort audit verify --verification-key` finds each, and says up to which
//! record the log is proven.

use std::time::Duration;

use crate::harness::{Gate, eventually};

type Row = (i64, String, String);

/// All records, oldest first: (at, kind, detail).
fn rows(gate: &Gate) -> Vec<Row> {
    let conn = poort::store::open_connection(gate.db()).unwrap();
    conn.query_map("SELECT at, kind, detail FROM audit ORDER BY seq", (), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
}

/// What an intruder with the database does: writes `rows` as the whole log, numbered from 1
/// with every hash made by the public recipe.
fn rewrite(gate: &Gate, rows: &[Row]) {
    use poort::db::IntoValue;
    let conn = poort::store::open_connection(gate.db()).unwrap();
    conn.execute("DELETE FROM audit", ()).unwrap();
    let mut prev = vec![0u8; 32];
    for (i, (at, kind, detail)) in rows.iter().enumerate() {
        let seq = i as i64 + 1;
        let hash = poort::audit::chain_hash(&prev, seq, *at, kind, detail);
        conn.execute(
            "INSERT INTO audit (seq, at, kind, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            vec![seq.value(), at.value(), kind.clone().value(), detail.clone().value(), prev.value(), hash.value()],
        )
        .unwrap();
        prev = hash;
    }
}

fn seal_positions(rows: &[Row]) -> Vec<usize> {
    rows.iter().enumerate().filter(|(_, r)| r.1 == "audit_sealed").map(|(i, _)| i).collect()
}

#[tokio::test]
async fn the_seals_find_a_rewritten_cut_or_emptied_log_that_the_chain_alone_calls_intact() {
    let mut gate = Gate::start_config("", "[audit]\nseal_interval = \"1s\"\n").await;
    let out = gate.cli(&["audit", "seal-init"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let key =
        text.lines().map(str::trim).find(|l| l.starts_with("poort-seal-1-")).expect("the key is shown").to_string();
    let again = gate.cli(&["audit", "seal-init"]);
    assert!(!again.status.success(), "a second key would end the first chain of keys");

    gate.login("alice").await;
    let _ = gate.try_login("bob", "wrong password!", "").await;
    eventually("three seals", Duration::from_secs(6), async || gate.audit("audit_sealed").len() >= 3).await;
    // A restart goes on from the key on disk.
    gate.stop().await;
    gate.boot().await;
    gate.login("bob").await;
    eventually("five seals", Duration::from_secs(6), async || gate.audit("audit_sealed").len() >= 5).await;
    gate.stop().await;

    let verify = |keyed: bool| {
        let mut args = vec!["audit", "verify"];
        if keyed {
            args.extend(["--verification-key", key.as_str()]);
        }
        let out = gate.cli(&args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = verify(true);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("seals good") && text.contains("generation 4"), "{text}");
    let original = rows(&gate);
    let seals = seal_positions(&original);
    let generations: Vec<u64> = gate.audit("audit_sealed").iter().map(|s| s["generation"].as_u64().unwrap()).collect();
    assert_eq!(generations, (0..generations.len() as u64).collect::<Vec<_>>(), "one generation per seal");

    // 1. The failed sign-in becomes someone else's; every hash made again.
    let failed = original.iter().position(|r| r.1 == "login_failed").unwrap();
    assert!(failed < seals[2], "sealed by the time it is changed");
    let mut changed = original.clone();
    changed[failed].2 = changed[failed].2.replace("bob", "eve");
    rewrite(&gate, &changed);
    assert_eq!(verify(false).0, Some(0), "the chain alone looks whole");
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("were changed after they were sealed"), "{text}");
    // Proven: what the last seal before the change covers (a seal at index i covers record i).
    let before = seals.iter().rev().find(|&&i| i < failed).copied().unwrap_or(0);
    assert!(text.contains(&format!("Proven as sealed: records 1 to {before}.")), "{text}");

    // 2. The second seal taken out with the records before it, and the rest numbered again.
    let mut cut = original.clone();
    cut.drain(seals[0] + 1..=seals[1]);
    rewrite(&gate, &cut);
    assert_eq!(verify(false).0, Some(0));
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("Proven as sealed: records 1 to {}.", seals[0])), "{text}");

    // 3. The end cut off after the third seal.
    rewrite(&gate, &original[..=seals[2]]);
    assert_eq!(verify(false).0, Some(0));
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cut from the end"), "{text}");

    // 4. Sealed again with the key left on disk: it makes only seals of its own generation,
    // never the older ones.
    let on_disk = poort::audit::seal::SealKey::load(&gate.dir.0).unwrap().unwrap();
    let mut resealed = changed.clone();
    let mut prev = vec![0u8; 32];
    for (i, row) in resealed.iter_mut().enumerate() {
        let seq = i as i64 + 1;
        if row.1 == "audit_sealed" {
            let ev = on_disk.seal(seq - 1, &prev, row.0);
            row.2 = serde_json::to_string(&ev).unwrap();
        }
        prev = poort::audit::chain_hash(&prev, seq, row.0, &row.1, &row.2);
    }
    rewrite(&gate, &resealed);
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("BROKEN"), "{text}");

    // 5. The seals made to fit the changed records: their MACs cannot be made again.
    let mut refitted = changed.clone();
    let mut prev = vec![0u8; 32];
    for (i, row) in refitted.iter_mut().enumerate() {
        let seq = i as i64 + 1;
        if row.1 == "audit_sealed" {
            let mut seal: serde_json::Value = serde_json::from_str(&row.2).unwrap();
            seal["head"] = poort::secret::hex(&prev).into();
            row.2 = seal.to_string();
        }
        prev = poort::audit::chain_hash(&prev, seq, row.0, &row.1, &row.2);
    }
    rewrite(&gate, &refitted);
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("is not genuine"), "{text}");

    // 6. Emptied.
    rewrite(&gate, &[]);
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cut from the end, after the start"), "{text}");

    // 7. The key on disk replaced by a new one, the log as it was.
    rewrite(&gate, &original);
    assert_eq!(verify(true).0, Some(0), "the log as it was verifies again");
    let key_file = poort::audit::seal::key_path(&gate.dir.0);
    std::fs::remove_file(&key_file).unwrap();
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("NO SEALING KEY"), "{text}");
    assert!(gate.cli(&["audit", "seal-init"]).status.success());
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("belongs to none of the verification keys"), "{text}");
}
