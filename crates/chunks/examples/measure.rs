//! Measures FastCDC parameters: a 50 MiB pseudo-random file, then a copy with
//! three 16-byte edits and a 1 KiB insertion in the middle; prints, per
//! parameter set, the chunk count, the bytes a sync would move and the index
//! size. `cargo run --release -p phoenix-chunks --example measure`

use phoenix_chunks::{ChunkParams, chunk_file_with};
use std::io::Write;

#[path = "../tests/testdata/mod.rs"]
mod testdata;
use testdata::{edited, prng_bytes};

fn main() {
    const SIZE: usize = 50 << 20;
    let old = prng_bytes(1, SIZE);
    let new = edited(&old);

    let dir = tempfile::tempdir().unwrap();
    let (po, pn) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::File::create(&po).unwrap().write_all(&old).unwrap();
    std::fs::File::create(&pn).unwrap().write_all(&new).unwrap();

    const K: u32 = 1024;
    println!(
        "| min / avg / max   | chunks | moved bytes | moved  | index JSON | index + moved | chunks per GiB |"
    );
    println!(
        "|-------------------|-------:|------------:|-------:|-----------:|--------------:|---------------:|"
    );
    for (min, avg, max) in [
        (4 * K, 16 * K, 64 * K),
        (16 * K, 64 * K, 256 * K),
        (32 * K, 128 * K, 512 * K),
        (64 * K, 256 * K, 1024 * K),
        (256 * K, 1024 * K, 4096 * K),
    ] {
        let params = ChunkParams { min, avg, max };
        let t = std::time::Instant::now();
        let a = chunk_file_with(&po, params).unwrap();
        let b = chunk_file_with(&pn, params).unwrap();
        let moved = b.bytes_not_in(&a);
        let fmt = |n: u32| {
            if n >= 1024 * K {
                format!("{}M", n / (1024 * K))
            } else {
                format!("{}K", n / K)
            }
        };
        println!(
            "| {:<17} | {:>6} | {:>11} | {:>5.2}% | {:>8} B | {:>11} B | {:>14} |   ({:?} for both)",
            format!("{} / {} / {}", fmt(min), fmt(avg), fmt(max)),
            b.chunks.len(),
            moved,
            moved as f64 * 100.0 / b.size as f64,
            b.to_json().len(),
            b.to_json().len() as u64 + moved,
            b.chunks.len() as u64 * 1024 / 50,
            t.elapsed(),
        );
    }
}
