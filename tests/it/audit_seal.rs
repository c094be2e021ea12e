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

/// A gateway sealing every second, and the verification key `seal-init` showed.
async fn sealed_gate() -> (Gate, String) {
    let gate = Gate::start_config("", "[audit]\nseal_interval = \"1s\"\n").await;
    let out = gate.cli(&["audit", "seal-init"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let key =
        text.lines().map(str::trim).find(|l| l.starts_with("poort-seal-1-")).expect("the key is shown").to_string();
    (gate, key)
}

#[tokio::test]
async fn the_seals_find_a_rewritten_cut_or_emptied_log_that_the_chain_alone_calls_intact() {
    let (mut gate, key) = sealed_gate().await;
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
    assert!(text.contains("seals good") && text.contains("generation 5"), "{text}");
    let original = rows(&gate);
    let seals = seal_positions(&original);
    let generations: Vec<u64> = gate.audit("audit_sealed").iter().map(|s| s["generation"].as_u64().unwrap()).collect();
    assert_eq!(generations, (1..=generations.len() as u64).collect::<Vec<_>>(), "one generation per seal, from 1");
    let on_disk = std::fs::read_to_string(poort::audit::seal::key_path(&gate.dir.0)).unwrap();
    assert!(!on_disk.contains(key.trim_start_matches("poort-seal-1-")), "the verification key never reaches the disk");

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
    // A config that does not load cannot hide it: the key on disk is not compared, so nothing
    // is proven.
    gate.edit_config(|c| c.replace("seal_interval = \"1s\"", "seal_interval = \"0s\""));
    let (code, text) = verify(true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("NOT PROVEN"), "{text}");
    gate.edit_config(|c| c.replace("seal_interval = \"0s\"", "seal_interval = \"1s\""));

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
    assert!(text.contains("matches none of the verification keys"), "{text}");
}

/// The key on disk kept from moving on (a directory where its next file goes): every later seal
/// repeats one generation, whose key stays on the machine for an intruder. The seal metric
/// stops, and verify says what it means. A key file with an absurd generation neither stops
/// the audit writer nor the verifier.
#[tokio::test]
async fn a_sealing_key_that_stops_moving_on_is_reported() {
    let (mut gate, key) = sealed_gate().await;
    eventually("two seals", Duration::from_secs(4), async || gate.audit("audit_sealed").len() >= 2).await;
    let sealed_at = |m: String| {
        m.lines().find_map(|l| l.strip_prefix("poort_audit_sealed_timestamp_seconds ")).map(|v| v.trim().to_string())
    };
    assert_ne!(sealed_at(gate.scrape().await).as_deref(), Some("0"), "the metric follows the seals");

    let key_file = poort::audit::seal::key_path(&gate.dir.0);
    std::fs::create_dir(key_file.with_extension("key.next")).unwrap();
    let stuck_from = gate.audit("audit_sealed").len();
    eventually("three more seals", Duration::from_secs(6), async || gate.audit("audit_sealed").len() >= stuck_from + 3)
        .await;
    let before = sealed_at(gate.scrape().await);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(sealed_at(gate.scrape().await), before, "a seal whose key did not move on is not counted");
    gate.stop().await;
    let out = gate.cli(&["audit", "verify", "--verification-key", &key]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("stopped moving on"), "{text}");

    // An absurd generation in the key file: the verifier answers at once, and the gateway's
    // audit writer keeps writing (the key cannot move on from there).
    std::fs::remove_dir(key_file.with_extension("key.next")).unwrap();
    let held = std::fs::read_to_string(&key_file).unwrap();
    let lines: Vec<&str> = held.lines().collect();
    let absurd = format!("{}\n{}\n{}\n{}\n", lines[0], lines[1], u64::MAX, lines[3]);
    std::fs::write(&key_file, absurd).unwrap();
    let out = gate.cli(&["audit", "verify", "--verification-key", &key]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    gate.boot().await;
    let records = gate.audit("login_succeeded").len();
    gate.login("alice").await;
    eventually("the sign-in recorded", Duration::from_secs(3), async || gate.audit("login_succeeded").len() > records)
        .await;
    let ready = crate::harness::admin(gate.admin_addr, "GET", "/readyz").await;
    assert_eq!(ready.status, 200);
}

/// The regions of a process's memory that it can write (heap, stacks, data), read whole.
fn writable_memory(pid: u32) -> Vec<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else { continue };
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            out.push(buf);
        }
    }
    out
}

/// An intruder who reads the running gateway's memory finds the current sealing key and no
/// older one: neither as bytes nor as text. The verification key derives them all, so the test
/// knows what to look for; finding the current key shows that the search works.
#[tokio::test]
async fn the_running_gateway_holds_no_older_sealing_key_in_memory() {
    let (mut gate, key) = sealed_gate().await;
    let k0_hex = key.trim_start_matches("poort-seal-1-").to_string();
    let (_process, pid) = gate.as_process("").await;
    eventually("five seals", Duration::from_secs(10), async || gate.audit("audit_sealed").len() >= 5).await;

    let evolve = |k: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"poort-audit-seal-evolve-1");
        ctx.update(k);
        ctx.finish().as_ref().to_vec()
    };
    let file = std::fs::read_to_string(poort::audit::seal::key_path(&gate.dir.0)).unwrap();
    let current_generation: u64 = file.lines().nth(2).unwrap().parse().unwrap();
    let mut keys =
        vec![(0..32).map(|i| u8::from_str_radix(&k0_hex[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<u8>>()];
    for _ in 0..current_generation {
        let next = evolve(keys.last().unwrap());
        keys.push(next);
    }
    let memory = writable_memory(pid);
    let found = |needle: &[u8]| memory.iter().any(|region| memchr::memmem::find(region, needle).is_some());
    assert!(found(&keys[current_generation as usize]), "the search finds the key in use");
    for (generation, k) in keys.iter().enumerate().take(current_generation as usize) {
        assert!(!found(k), "generation {generation}'s key is in the gateway's memory");
        assert!(!found(poort::secret::hex(k).as_bytes()), "generation {generation}'s key is in memory as text");
    }
}
