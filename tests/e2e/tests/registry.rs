//! The registry on the multi-host harness: images pre-cached on every
//! minion over the overlay, new versions that move only their changes,
//! transfers that resume, repairs, collection, and a full disk. Needs root;
//! skips otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_e2e::{Cluster, Net, alive, noise, require_netns, testy, wait_for};
use serde_json::{Value, json};

/// Puts `data` into the master's registry as `name` the way a person
/// would by hand: written beside it, then renamed over it.
fn place(c: &Cluster, name: &str, data: &[u8]) {
    let reg = c.master_dir().join("registry");
    let tmp = reg.join(format!(".{name}.part"));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, reg.join(name)).unwrap();
}

fn image<'a>(images: &'a Value, name: &str) -> Option<&'a Value> {
    images.as_array()?.iter().find(|i| i["name"] == name)
}

fn node_state<'a>(img: &'a Value, node: &str) -> Option<&'a Value> {
    img["nodes"].as_array()?.iter().find(|n| n["node"] == node)
}

/// Waits until `node` holds image `name` with content `data`; its hash.
fn wait_synced(c: &Cluster, name: &str, data: &[u8], node: &str) -> String {
    let hash = blake3::hash(data).to_hex().to_string();
    let mut last = Value::Null;
    let found = (0..1200).find_map(|_| {
        let images = c.json(&["images", "--json"]);
        let img = image(&images, name)?.clone();
        let synced = img["hash"] == hash.as_str() && node_state(&img, node)?["state"] == "synced";
        last = img;
        if !synced {
            std::thread::sleep(Duration::from_millis(50));
        }
        synced.then_some(())
    });
    assert!(
        found.is_some(),
        "{name} ({} bytes, {hash}) not synced on {node} within 60 s; last: {last}",
        data.len()
    );
    let held = std::fs::read(c.minion_dir(node).join("images").join(&hash)).unwrap();
    assert!(
        held == data,
        "{node}'s copy of {name} differs from the registry's"
    );
    hash
}

fn fetched(c: &Cluster, node: &str) -> u64 {
    let nodes = c.json(&["nodes", "--json"]);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["stats"]["image_bytes_fetched"].as_u64())
        .unwrap_or(0)
}

/// Total size of the files under `dir` (recursively).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    total
}

#[test]
fn every_image_reaches_every_minion_and_removed_images_are_collected() {
    require_netns!();
    let net = Net::new(&["master", "m1", "m2"]);
    let c = Cluster::master_only_on(net);
    // Two images before any minion exists; b shares most of a's chunks.
    let a = noise(3 << 20, 1);
    let mut b = a.clone();
    b[1 << 20] ^= 1;
    place(&c, "a", &a);
    place(&c, "b", &b);
    let c = c.with_minions(2);
    let testy_bin = std::fs::read(phoenix_e2e::bin("testy")).unwrap();
    for m in ["m1", "m2"] {
        wait_synced(&c, "a", &a, m);
        wait_synced(&c, "b", &b, m);
        wait_synced(&c, "testy", &testy_bin, m);
    }
    let images = c.json(&["images", "--json"]);
    let (ia, ib) = (image(&images, "a").unwrap(), image(&images, "b").unwrap());
    // The two share all but the chunk around the edit.
    let unique_a = ia["unique_bytes"].as_u64().unwrap();
    assert!(
        unique_a > 0 && unique_a < (1 << 20),
        "a has {unique_a} unique bytes"
    );
    assert!(ia["chunks"].as_u64().unwrap() >= 6, "{ia}");
    assert_eq!(ib["size"], b.len());
    let table = c.ok(&["images"]);
    assert!(
        table.contains("m1 synced") && table.contains("m2 synced"),
        "{table}"
    );

    // A file copied in by hand later, written in place (no rename).
    let late = noise(1 << 20, 3);
    std::fs::write(c.master_dir().join("registry/late"), &late).unwrap();
    for m in ["m1", "m2"] {
        wait_synced(&c, "late", &late, m);
    }

    // m1 runs a service from `a`; then a and late leave the registry.
    let hash_a = ia["hash"].as_str().unwrap().to_owned();
    let hash_late = image(&c.json(&["images", "--json"]), "late").unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut spec = testy("m1", "runs-a", &[]);
    // testy's bytes followed by a's: still runs, and pins a's content.
    let mut runnable = testy_bin.clone();
    runnable.extend(&a);
    place(&c, "a", &runnable);
    let a = runnable;
    let hash_a_old = hash_a;
    let hash_a = wait_synced(&c, "a", &a, "m1");
    spec["image"] = json!("a");
    c.apply("deploy", &spec);
    let cache = |m: &str| du(&c.minion_dir(m).join("images")) + du(&c.minion_dir(m).join("chunks"));
    let m2_before = cache("m2");
    std::fs::remove_file(c.master_dir().join("registry/a")).unwrap();
    std::fs::remove_file(c.master_dir().join("registry/late")).unwrap();
    wait_for(
        "a and late gone from the catalog",
        Duration::from_secs(10),
        || {
            let images = c.json(&["images", "--json"]);
            (image(&images, "a").is_none() && image(&images, "late").is_none()).then_some(())
        },
    );
    let held = |m: &str, h: &str| c.minion_dir(m).join("images").join(h).exists();
    let indexed = |h: &str| c.master_dir().join(format!("indexes/{h}.json")).exists();
    wait_for("m2 to drop a and late", Duration::from_secs(10), || {
        (!held("m2", &hash_a) && !held("m2", &hash_late)).then_some(())
    });
    wait_for("m1 to drop late", Duration::from_secs(10), || {
        (!held("m1", &hash_late)).then_some(())
    });
    wait_for(
        "the master to drop late's index",
        Duration::from_secs(10),
        || (!indexed(&hash_late) && !indexed(&hash_a_old)).then_some(()),
    );
    // Both files went from m2's disk.
    let m2_after = cache("m2");
    assert!(
        m2_before - m2_after >= (late.len() + a.len()) as u64,
        "m2's image cache went from {m2_before} to {m2_after} bytes"
    );
    // An assembled image is its chunks' only copy on a minion.
    assert_eq!(du(&c.minion_dir("m2").join("chunks")), 0);
    // What a service runs stays: on its minion and on the master (so a
    // restarted or new minion can still fetch it).
    assert!(held("m1", &hash_a), "m1 dropped the image its service runs");
    assert!(
        indexed(&hash_a),
        "the master dropped the index a service uses"
    );
    assert_eq!(c.status("runs-a")["state"], "running");
    // b's chunks shared with the dropped a are still whole.
    let images = c.json(&["images", "--json"]);
    assert_eq!(
        node_state(image(&images, "b").unwrap(), "m2").unwrap()["state"],
        "synced"
    );
    // Once the service goes, so does its image.
    c.ok(&["del", "runs-a"]);
    wait_for(
        "m1 and the master to drop a",
        Duration::from_secs(10),
        || (!held("m1", &hash_a) && !indexed(&hash_a)).then_some(()),
    );
}

#[test]
fn a_new_version_moves_its_changes_a_killed_transfer_resumes_and_corruption_is_repaired() {
    require_netns!();
    let net = Net::new(&["master", "m1"]);
    let mut c = Cluster::start_on(net, 1);
    let size = 32 << 20;
    let v1 = noise(size, 11);
    let testy_bin = std::fs::read(phoenix_e2e::bin("testy")).unwrap();
    wait_synced(&c, "testy", &testy_bin, "m1");
    // Assembled images keep no chunks in the store.
    let chunks_dir = c.minion_dir("m1").join("chunks");
    wait_for("m1's chunk store to empty", Duration::from_secs(10), || {
        (du(&chunks_dir) == 0).then_some(())
    });
    // About 6 s of transfer at 40 Mbit/s: long enough to cut it off.
    c.net.as_ref().unwrap().limit_rate("master", "40mbit");
    place(&c, "big", &v1);
    wait_for("a quarter of big on m1", Duration::from_secs(30), || {
        let images = c.json(&["images", "--json"]);
        let n = node_state(image(&images, "big")?, "m1")?.clone();
        (n["state"] == "syncing" && n["done"].as_u64()? > (size as u64) / 4).then_some(())
    });
    c.kill_minion("m1");
    let kept = du(&chunks_dir);
    assert!(
        kept > (size as u64) / 4,
        "only {kept} bytes of chunks were kept"
    );
    c.net.as_ref().unwrap().unlimit_rate("master");
    c.start_minion("m1");
    let hash1 = wait_synced(&c, "big", &v1, "m1");
    let resumed = wait_for("m1's fetched bytes", Duration::from_secs(10), || {
        Some(fetched(&c, "m1")).filter(|n| *n > 0)
    });
    assert!(
        resumed > 0 && resumed + kept < size as u64 + (1 << 20),
        "the resumed transfer moved {resumed} bytes with {kept} already there"
    );

    // Scattered edits and an insertion in the middle.
    let mut v2 = v1.clone();
    for at in [1_000_000, 9_000_000, 20_000_000, 31_000_000] {
        v2[at] ^= 0x55;
    }
    v2.splice(size / 2..size / 2, noise(4096, 5));
    place(&c, "big", &v2);
    let hash2 = wait_synced(&c, "big", &v2, "m1");
    let moved = wait_for("m1's fetched bytes", Duration::from_secs(10), || {
        Some(fetched(&c, "m1")).filter(|n| *n > resumed)
    }) - resumed;
    eprintln!("v2 ({} bytes) moved {moved} bytes", v2.len());
    // Five chunks changed: sent as deltas against the old ones, they cost
    // about the bytes that changed (the 4 KiB inserted is noise).
    assert!(
        moved > 4096 && moved < 64 << 10,
        "the new version of {} bytes moved {moved} bytes",
        v2.len()
    );
    // The old version is collected: it is in neither the catalog nor a spec.
    wait_for(
        "m1 to drop the old version",
        Duration::from_secs(10),
        || (!c.minion_dir("m1").join("images").join(&hash1).exists()).then_some(()),
    );

    // Damage v2's file on m1 inside a chunk that v3 keeps: v3's assembly
    // reads it from there, finds it corrupt, and fetches it again.
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(c.minion_dir("m1").join(format!("indexes/{hash2}.json"))).unwrap(),
    )
    .unwrap();
    let chunks = index["chunks"].as_array().unwrap();
    let victim = chunks[chunks.len() / 3]["offset"].as_u64().unwrap() as usize + 10;
    let held = c.minion_dir("m1").join("images").join(&hash2);
    let mut bytes = std::fs::read(&held).unwrap();
    bytes[victim] ^= 0xff;
    std::fs::write(&held, &bytes).unwrap();
    let mut v3 = v2.clone();
    let last = v3.len() - 1;
    v3[last] ^= 1;
    let before = fetched(&c, "m1");
    place(&c, "big", &v3);
    wait_synced(&c, "big", &v3, "m1");
    let moved = wait_for("m1's fetched bytes", Duration::from_secs(10), || {
        Some(fetched(&c, "m1")).filter(|n| *n > before)
    }) - before;
    assert!(
        c.log("m1")
            .contains("corrupt chunk in the cache; fetching it again"),
        "no repair in m1's log"
    );
    assert!(moved < (4 << 20), "the repair moved {moved} bytes");
}

/// Unmounts a tmpfs when dropped (declared before the cluster, so it is
/// dropped after it).
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Quietly: it may be gone with the cluster's directory already.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_running_version_stays() {
    require_netns!();
    let net = Net::new(&["master", "m1"]);
    let c = Cluster::master_only_on(net);
    // m1's data dir is a 40 MB filesystem.
    let dir = c.minion_dir("m1");
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs on {}", dir.display());
    let _mounted = Tmpfs(dir.clone());
    let c = c.with_minions(1);
    let testy_bin = std::fs::read(phoenix_e2e::bin("testy")).unwrap();
    wait_synced(&c, "testy", &testy_bin, "m1");
    let spec = testy("m1", "app", &[]);
    c.apply("deploy", &spec);
    let pid = c.status("app")["pid"].as_u64().unwrap();

    // A new image far larger than the disk.
    let mut huge = testy_bin.clone();
    huge.extend(noise(48 << 20, 9));
    place(&c, "testy", &huge);
    let huge_hash = blake3::hash(&huge).to_hex().to_string();
    let mut last = Value::Null;
    let err = (0..600).find_map(|_| {
        let images = c.json(&["images", "--json"]);
        let img = image(&images, "testy")?.clone();
        let n = node_state(&img, "m1")?.clone();
        last = img.clone();
        if img["hash"] == huge_hash.as_str() && n["state"] == "failed" {
            return Some(n["error"].to_string());
        }
        std::thread::sleep(Duration::from_millis(50));
        None
    });
    let err = err.unwrap_or_else(|| panic!("m1 never failed to sync the huge image: {last}"));
    assert!(err.contains("no space left on the minion's disk"), "{err}");
    let table = c.ok(&["images"]);
    assert!(
        table.contains("m1 failed")
            && table.contains("testy on m1: ")
            && table.contains("no space left"),
        "{table}"
    );
    // Updating to it leaves the running version alone, and says why.
    let path = c.dir.path().join("app.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    c.ok(&["update", path.to_str().unwrap(), "--detach"]);
    let s = c.wait_status("app", "held back with a reason", |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("keeps running") && m.contains("no space left"))
    });
    assert_eq!(s["pid"], pid, "{s}");
    assert!(alive(pid), "the running version was stopped");
    // The half-fetched image left no partial file behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".assemble"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
