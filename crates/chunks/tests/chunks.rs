use phoenix_chunks::{
    ChunkParams, ChunkRef, ChunkStore, Error, Index, chunk_bytes, chunk_file, decode_batch,
    encode_batch, hash_hex,
};
use std::fs;
use std::path::Path;

mod testdata;
use testdata::{edited, prng_bytes};

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn chunking_is_deterministic_and_well_formed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prng_bytes(1, 3 << 20);
    let path = tmp.path().join("f");
    write(&path, &data);
    let a = chunk_file(&path).unwrap();
    let b = chunk_file(&path).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, chunk_bytes(&data, ChunkParams::DEFAULT).unwrap());
    a.validate().unwrap();
    assert_eq!(a.size, data.len() as u64);
    assert_eq!(a.file_hash, hash_hex(&data));
    let p = ChunkParams::DEFAULT;
    assert!(a.chunks.len() > 5, "{} chunks", a.chunks.len());
    for (i, c) in a.chunks.iter().enumerate() {
        let bytes = &data[c.offset as usize..][..c.len as usize];
        assert_eq!(c.hash, hash_hex(bytes));
        assert!(c.len <= p.max);
        assert!(c.len >= p.min || i == a.chunks.len() - 1);
    }
    // JSON round trip, and validation of what comes back.
    let json = a.to_json();
    assert_eq!(Index::from_json(&json).unwrap(), a);
    let mut bad = a.clone();
    bad.chunks[1].offset += 1;
    let err = Index::from_json(&bad.to_json()).unwrap_err();
    assert!(err.to_string().contains(&bad.chunks[1].hash), "{err}");
}

#[test]
fn edits_and_an_insertion_move_few_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let old = prng_bytes(1, 50 << 20);
    let new = edited(&old);
    let (po, pn) = (tmp.path().join("old"), tmp.path().join("new"));
    write(&po, &old);
    write(&pn, &new);
    let a = chunk_file(&po).unwrap();
    let b = chunk_file(&pn).unwrap();
    assert_eq!(b.size, a.size + 1024);
    let moved = b.bytes_not_in(&a);
    let fraction = moved as f64 / b.size as f64;
    assert!(
        fraction < 0.05,
        "moved {moved} bytes ({:.2}%)",
        fraction * 100.0
    );
    assert!(moved > 0);
    let old_hashes: std::collections::HashSet<_> = a.chunks.iter().map(|c| &c.hash).collect();
    let changed = b
        .chunks
        .iter()
        .filter(|c| !old_hashes.contains(&c.hash))
        .count();
    assert!(
        changed <= 10,
        "{changed} of {} chunks changed",
        b.chunks.len()
    );
}

#[test]
fn dedup_across_imports_and_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let v1 = prng_bytes(2, 6 << 20);
    let v2 = edited(&v1);
    let (p1, p2) = (tmp.path().join("v1"), tmp.path().join("v2"));
    write(&p1, &v1);
    write(&p2, &v2);

    let i1 = store.import_file(&p1).unwrap();
    let u1 = store.usage().unwrap();
    assert_eq!(u1.chunks, i1.chunks.len() as u64);
    assert_eq!(u1.bytes, v1.len() as u64);
    assert!(store.missing(&i1).is_empty());

    // The same file again stores nothing new.
    assert_eq!(store.import_file(&p1).unwrap(), i1);
    assert_eq!(store.usage().unwrap(), u1);
    let first = store.get(&i1.chunks[0].hash).unwrap();
    assert!(!store.insert(&first).unwrap().stored);

    // A second version: missing() names exactly the new chunks, and storing
    // it adds only those.
    let i2 = chunk_file(&p2).unwrap();
    let missing = store.missing(&i2);
    assert!(!missing.is_empty() && missing.len() < i2.chunks.len() / 3);
    let missing_bytes: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
    assert_eq!(missing_bytes, i2.bytes_not_in(&i1));
    assert_eq!(store.import_file(&p2).unwrap(), i2);
    let u2 = store.usage().unwrap();
    assert_eq!(u2.chunks, u1.chunks + missing.len() as u64);
    assert_eq!(u2.bytes, u1.bytes + missing_bytes);
    assert!(store.missing(&i2).is_empty());
}

#[test]
fn missing_names_each_chunk_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    let a = prng_bytes(3, 1000);
    let b = prng_bytes(4, 500);
    store.insert(&b).unwrap();
    let (ha, hb) = (hash_hex(&a), hash_hex(&b));
    let whole = [&a[..], &b[..], &a[..]].concat();
    let index = Index {
        file_hash: hash_hex(&whole),
        size: whole.len() as u64,
        chunks: vec![
            ChunkRef {
                hash: ha.clone(),
                offset: 0,
                len: 1000,
            },
            ChunkRef {
                hash: hb,
                offset: 1000,
                len: 500,
            },
            ChunkRef {
                hash: ha.clone(),
                offset: 1500,
                len: 1000,
            },
        ],
    };
    index.validate().unwrap();
    assert_eq!(store.missing(&index), vec![index.chunks[0].clone()]);
    store.insert_expecting(&ha, &a).unwrap();
    let dest = tmp.path().join("out");
    store.assemble(&index, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), whole);
}

#[test]
fn assemble_reproduces_the_file_and_refuses_a_corrupt_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let data = prng_bytes(5, 3 << 20);
    let src = tmp.path().join("src");
    write(&src, &data);
    let index = store.import_file(&src).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let dest = out.join("image");
    store.assemble(&index, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
    fs::remove_file(&dest).unwrap();

    // Flip a byte of a chunk on disk.
    let victim = &index.chunks[index.chunks.len() / 2];
    let path = store.chunk_path(&victim.hash).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let good = bytes.clone();
    bytes[100] ^= 0x40;
    write(&path, &bytes);
    assert!(store.has(&victim.hash));
    let err = store.get(&victim.hash).unwrap_err();
    assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
    let err = store.assemble(&index, &dest).unwrap_err();
    assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
    assert!(err.to_string().contains(&victim.hash), "{err}");
    assert!(!dest.exists());
    assert!(
        dir_names(&out).is_empty(),
        "left behind: {:?}",
        dir_names(&out)
    );

    // Remove it, refetch (insert), and it works.
    assert!(store.remove(&victim.hash).unwrap());
    assert!(!store.has(&victim.hash));
    assert_eq!(store.missing(&index), vec![victim.clone()]);
    assert!(store.insert_expecting(&victim.hash, &bytes).is_err());
    assert!(store.insert_expecting(&victim.hash, &good).unwrap().stored);
    store.assemble(&index, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
}

#[test]
fn assemble_failing_midway_leaves_dest_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let data = prng_bytes(6, 3 << 20);
    let src = tmp.path().join("src");
    write(&src, &data);
    let index = store.import_file(&src).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let dest = out.join("image");
    write(&dest, b"previous version");

    // A chunk gone midway: the error names it, dest keeps its old content
    // and no partial file is left beside it.
    let victim = index.chunks[index.chunks.len() / 2].clone();
    let saved = store.get(&victim.hash).unwrap();
    store.remove(&victim.hash).unwrap();
    let err = store.assemble(&index, &dest).unwrap_err();
    assert!(matches!(err, Error::MissingChunk { .. }), "{err}");
    assert!(err.to_string().contains(&victim.hash), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), b"previous version");
    assert_eq!(dir_names(&out), vec!["image".to_string()]);
    store.insert(&saved).unwrap();

    // An index whose whole-file hash does not match: refused at the end.
    let mut wrong = index.clone();
    wrong.file_hash = hash_hex(b"something else");
    let err = store.assemble(&wrong, &dest).unwrap_err();
    assert!(matches!(err, Error::FileHash { .. }), "{err}");
    assert!(err.to_string().contains(&wrong.file_hash), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), b"previous version");
    assert_eq!(dir_names(&out), vec!["image".to_string()]);

    // A chunk whose length disagrees with the index.
    let mut short = index.clone();
    short.chunks[0].len -= 1;
    short.chunks.iter_mut().skip(1).for_each(|c| c.offset -= 1);
    short.size -= 1;
    let err = store.assemble(&short, &dest).unwrap_err();
    assert!(matches!(err, Error::ChunkLength { .. }), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), b"previous version");

    store.assemble(&index, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
    assert_eq!(dir_names(&out), vec!["image".to_string()]);
}

#[test]
fn gc_keeps_referenced_chunks_and_removes_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let v1 = prng_bytes(7, 4 << 20);
    let v2 = edited(&v1);
    let other = prng_bytes(8, 1 << 20);
    let paths: Vec<_> = ["v1", "v2", "other"]
        .iter()
        .map(|n| tmp.path().join(n))
        .collect();
    for (p, d) in paths.iter().zip([&v1, &v2, &other]) {
        write(p, d);
    }
    let i1 = store.import_file(&paths[0]).unwrap();
    let i2 = store.import_file(&paths[1]).unwrap();
    let io = store.import_file(&paths[2]).unwrap();
    let before = store.usage().unwrap();

    // Keep v2 only: v1's own chunks and all of `other` go.
    let stats = store.gc(&[&i2]).unwrap();
    let only_v1: u64 = i1.bytes_not_in(&i2);
    assert_eq!(stats.bytes, only_v1 + other.len() as u64);
    let after = store.usage().unwrap();
    assert_eq!(after.chunks + stats.removed, before.chunks);
    assert_eq!(after.bytes, v2.len() as u64);
    assert!(store.missing(&i2).is_empty());
    assert_eq!(store.missing(&io).len(), io.chunks.len());
    let dest = tmp.path().join("v2.out");
    store.assemble(&i2, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), v2);

    // Nothing more to collect; then keep nothing.
    assert_eq!(store.gc(&[&i2]).unwrap().removed, 0);
    let stats = store.gc(&[]).unwrap();
    assert_eq!(stats.bytes, v2.len() as u64);
    assert_eq!(store.usage().unwrap().chunks, 0);
}

#[test]
fn batches_round_trip_and_tampering_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let data = prng_bytes(9, 2 << 20);
    let src = tmp.path().join("src");
    write(&src, &data);
    let index = store.import_file(&src).unwrap();
    let hashes: Vec<&str> = index.chunks.iter().map(|c| c.hash.as_str()).collect();
    let batch = encode_batch(&store, &hashes).unwrap();
    let decoded = decode_batch(&batch).unwrap();
    assert_eq!(decoded.len(), hashes.len());
    for ((h, d), c) in decoded.iter().zip(&index.chunks) {
        assert_eq!(h, &c.hash);
        assert_eq!(d, &store.get(h).unwrap());
    }
    assert!(
        decode_batch(&encode_batch(&store, &[]).unwrap())
            .unwrap()
            .is_empty()
    );

    // Into a second store, then assembled.
    let other = ChunkStore::open(tmp.path().join("other")).unwrap();
    assert_eq!(other.missing(&index).len(), index.chunks.len());
    for (h, d) in &decoded {
        other.insert_expecting(h, d).unwrap();
    }
    let dest = tmp.path().join("dest");
    other.assemble(&index, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);

    // Compressible data, so the compression is visible.
    let text = b"phoenix ".repeat(100_000);
    let t = store.insert(&text).unwrap();
    assert!(encode_batch(&store, &[&t.hash]).unwrap().len() < text.len() / 20);

    // A data byte flipped inside the (re-compressed) batch: refused, naming the chunk.
    let mut raw = zstd::stream::decode_all(&batch[..]).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    let tampered = zstd::stream::encode_all(&raw[..], 3).unwrap();
    let err = decode_batch(&tampered).unwrap_err();
    let last_hash = &index.chunks.last().unwrap().hash;
    assert!(err.to_string().contains(last_hash.as_str()), "{err}");

    // Truncated, trailing bytes, corrupt compressed stream.
    raw[last] ^= 1;
    let cut = zstd::stream::encode_all(&raw[..raw.len() - 10], 3).unwrap();
    assert!(
        decode_batch(&cut)
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
    let mut longer = raw.clone();
    longer.push(0);
    let longer = zstd::stream::encode_all(&longer[..], 3).unwrap();
    assert!(
        decode_batch(&longer)
            .unwrap_err()
            .to_string()
            .contains("trailing")
    );
    let mut garbled = batch.clone();
    let mid = garbled.len() / 2;
    garbled[mid] ^= 0xff;
    assert!(decode_batch(&garbled).is_err());
    assert!(decode_batch(b"not zstd").is_err());

    // A chunk the store lacks cannot be encoded.
    let absent = hash_hex(b"absent");
    let err = encode_batch(&store, &[&absent]).unwrap_err();
    assert!(err.to_string().contains(&absent), "{err}");
}

#[test]
fn hashes_that_are_not_hashes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    for bad in ["../../etc/passwd", "ab", "", &"A".repeat(64)] {
        assert!(
            matches!(store.get(bad), Err(Error::InvalidHash(_))),
            "{bad}"
        );
        assert!(!store.has(bad));
        assert!(store.remove(bad).is_err());
    }
}

/// A real full disk: set `PHOENIX_CHUNKS_FULL_DIR` to an empty directory on
/// a filesystem with less than 3 MiB free (e.g. `mount -t tmpfs -o size=2m
/// tmpfs DIR`); skipped otherwise.
#[test]
fn assemble_on_a_full_disk_says_so_and_leaves_dest_untouched() {
    let Some(full) = std::env::var_os("PHOENIX_CHUNKS_FULL_DIR") else {
        eprintln!("PHOENIX_CHUNKS_FULL_DIR not set: skipped");
        return;
    };
    let full = Path::new(&full);
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let data = prng_bytes(10, 3 << 20);
    let src = tmp.path().join("src");
    write(&src, &data);
    let index = store.import_file(&src).unwrap();
    let dest = full.join("image");
    write(&dest, b"previous version");
    let err = store.assemble(&index, &dest).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, Error::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), b"previous version");
    assert_eq!(dir_names(full), vec!["image".to_string()]);
    fs::remove_file(&dest).unwrap();
}

#[test]
fn an_edited_chunk_travels_as_a_small_delta_against_its_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let master = ChunkStore::open(dir.path().join("master")).unwrap();
    let old = prng_bytes(5, 128 << 10);
    let mut new = old.clone();
    for at in [100, 60_000, 120_000] {
        new[at] ^= 0x5a;
    }
    let a = master.insert(&old).unwrap().hash;
    let b = master.insert(&new).unwrap().hash;
    let batch = phoenix_chunks::encode_batch_with_bases(&master, &[(b.as_str(), Some(a.as_str()))])
        .unwrap();
    assert!(batch.len() < 1024, "the delta took {} bytes", batch.len());
    // Without a base at hand the batch cannot be read…
    assert!(decode_batch(&batch).is_err());
    let minion = ChunkStore::open(dir.path().join("minion")).unwrap();
    let err = phoenix_chunks::decode_batch_with_bases(&batch, |h| minion.get(h)).unwrap_err();
    assert!(err.to_string().contains(&a[..8]), "{err}");
    // …with it, it is the new chunk, verified.
    minion.insert(&old).unwrap();
    let got = phoenix_chunks::decode_batch_with_bases(&batch, |h| minion.get(h)).unwrap();
    assert_eq!(got, vec![(b.clone(), new.clone())]);
    // A base that does not help (or is unknown to the sender) is not used.
    let other = master.insert(&prng_bytes(9, 128 << 10)).unwrap().hash;
    let plain =
        phoenix_chunks::encode_batch_with_bases(&master, &[(b.as_str(), Some(other.as_str()))])
            .unwrap();
    assert_eq!(decode_batch(&plain).unwrap(), vec![(b, new)]);
}

#[test]
fn the_binary_index_round_trips_and_refuses_damage() {
    let data = prng_bytes(3, 1 << 20);
    let index = chunk_bytes(&data, ChunkParams::DEFAULT).unwrap();
    let bytes = index.to_bytes();
    assert_eq!(bytes.len(), 52 + 36 * index.chunks.len());
    assert!(bytes.len() * 2 < index.to_json().len());
    assert_eq!(Index::from_bytes(&bytes).unwrap(), index);
    assert!(Index::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    // A chunk length changed: the chunks no longer add up to the size.
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(Index::from_bytes(&bad).is_err());
    assert!(Index::from_bytes(b"PXINDEX0").is_err());
}

#[test]
fn cut_points_match_fastcdc_streaming_chunker() {
    // Over several buffer refills, with a file size that is no multiple of
    // anything: the same chunks as fastcdc's own streaming chunker.
    let data = prng_bytes(11, (19 << 20) + 12_345);
    let p = ChunkParams::DEFAULT;
    let ours: Vec<(u64, u32)> = chunk_bytes(&data, p)
        .unwrap()
        .chunks
        .iter()
        .map(|c| (c.offset, c.len))
        .collect();
    let theirs: Vec<(u64, u32)> = fastcdc::v2020::StreamCDC::new(&data[..], p.min, p.avg, p.max)
        .map(|c| {
            let c = c.unwrap();
            (c.offset, c.length as u32)
        })
        .collect();
    assert_eq!(ours, theirs);
    // A tiny file is one chunk.
    assert_eq!(chunk_bytes(b"abc", p).unwrap().chunks.len(), 1);
}

#[test]
fn chunks_of_files_already_on_disk_need_no_second_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path().join("store")).unwrap();
    let v1 = prng_bytes(21, 3 << 20);
    let v2 = edited(&v1);
    let held = dir.path().join("v1");
    write(&held, &v1);
    let i1 = chunk_bytes(&v1, ChunkParams::DEFAULT).unwrap();
    let i2 = chunk_bytes(&v2, ChunkParams::DEFAULT).unwrap();
    let mut seeds = phoenix_chunks::Seeds::default();
    seeds.add(&held, &i1);
    // Only what v1's file lacks is missing; the store is empty.
    let missing = store.missing_with(&i2, &seeds);
    assert_eq!(
        missing.iter().map(|c| u64::from(c.len)).sum::<u64>(),
        i2.bytes_not_in(&i1)
    );
    for c in &missing {
        let at = c.offset as usize;
        store.insert(&v2[at..at + c.len as usize]).unwrap();
    }
    let out = dir.path().join("v2");
    store.assemble_with(&i2, &out, &seeds).unwrap();
    assert_eq!(fs::read(&out).unwrap(), v2);
    // A damaged held file is found out, and that chunk can be forgotten.
    let victim = i1
        .chunks
        .iter()
        .find(|c| seeds.has(&c.hash) && i2.chunks.contains(c))
        .unwrap();
    let mut damaged = v1.clone();
    damaged[victim.offset as usize] ^= 1;
    write(&held, &damaged);
    let err = store
        .assemble_with(&i2, dir.path().join("v2b"), &seeds)
        .unwrap_err();
    assert!(
        matches!(err, Error::CorruptChunk { ref hash, .. } if *hash == victim.hash),
        "{err}"
    );
    seeds.forget(&victim.hash);
    assert!(
        store
            .missing_with(&i2, &seeds)
            .iter()
            .any(|c| c.hash == victim.hash)
    );
}
