//! `phoenix-bench-unpack IMAGE DEST [REFERENCE]`: opens an OCI image (tar
//! or layout directory) and unpacks it into DEST (which must not exist)
//! with Phoenix's own `phoenix-image` crate, the code the minion runs, and
//! prints the milliseconds each step took as JSON on stdout. Used by
//! `bench/containers.sh` against `umoci unpack`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 || args[0].starts_with('-') {
        eprintln!(
            "usage: phoenix-bench-unpack IMAGE DEST [REFERENCE]\n\
             Unpacks the OCI image IMAGE into DEST (which must not exist) with phoenix-image\n\
             and prints {{\"open_ms\":..,\"unpack_ms\":..,\"total_ms\":..}}."
        );
        return ExitCode::from(2);
    }
    let (image, dest) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let start = Instant::now();
    let img = match phoenix_image::open(&image, args.get(2).map(String::as_str)) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("phoenix-bench-unpack: open {}: {e}", image.display());
            return ExitCode::FAILURE;
        }
    };
    let opened = start.elapsed();
    if let Err(e) = phoenix_image::unpack(&img, &dest, &phoenix_image::Limits::default()) {
        eprintln!("phoenix-bench-unpack: unpack into {}: {e}", dest.display());
        return ExitCode::FAILURE;
    }
    let total = start.elapsed();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "{{\"open_ms\":{:.3},\"unpack_ms\":{:.3},\"total_ms\":{:.3},\"layers\":{}}}",
        ms(opened),
        ms(total - opened),
        ms(total),
        img.layers.len()
    );
    ExitCode::SUCCESS
}
