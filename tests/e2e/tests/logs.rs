//! Logs under a runaway writer (issue 11, item 4): disk use stays bounded by
//! the rotation limit, `logs` shows the newest output, a minion restart
//! neither disturbs the writer nor stops its logging, and `del` takes the
//! files with it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use phoenix_e2e::{Cluster, alive, free_port, wait_for};
use serde_json::json;

const LIMIT: u64 = 1 << 20;

/// Bytes the files of `service` take in `dir`: (apparent size, allocated).
fn log_bytes(dir: &Path, service: &str) -> (u64, u64) {
    let mut total = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{service}.log"))
            && let Ok(m) = entry.metadata()
        {
            total.0 += m.len();
            total.1 += m.blocks() * 512;
        }
    }
    total
}

/// Samples the disk use of `service`'s logs for `how_long`; returns the
/// largest seen.
fn sample_max(dir: &Path, service: &str, how_long: Duration) -> u64 {
    let start = Instant::now();
    let mut max = 0;
    while start.elapsed() < how_long {
        let (len, allocated) = log_bytes(dir, service);
        max = max.max(len).max(allocated);
        std::thread::sleep(Duration::from_millis(20));
    }
    max
}

/// The live log's inode: it changes at every rotation.
fn live_inode(dir: &Path, service: &str) -> Option<u64> {
    std::fs::metadata(dir.join(format!("{service}.log")))
        .ok()
        .map(|m| m.ino())
}

#[test]
fn a_runaway_writer_is_bounded_survives_a_minion_restart_and_is_deleted() {
    let mut c = Cluster::master_only();
    c.minion_flags
        .extend(["--log-max-bytes".to_owned(), LIMIT.to_string()]);
    c.start_minion("m1");
    c.wait_waiting("m1");
    c.ok(&["accept", "m1"]);
    c.wait_reachable("m1");
    c.ok(&["push", "/usr/bin/yes", "yes"]);
    let spec = json!([{
        "machine": "m1", "name": "flood", "image": "yes", "type": "binary",
        "proxyport": free_port(), "args": ["flood-line"],
    }]);
    c.apply("deploy", &spec);
    let pid = wait_for("flood's pid", Duration::from_secs(10), || {
        c.recorded_pid("m1", "flood")
    });
    let logs = c.minion_dir("m1").join("logs");

    // Four files of at most the limit each; 5 MiB leaves room for the
    // allocation of a file's last block.
    let bound = 5 * LIMIT;
    let max = sample_max(&logs, "flood", Duration::from_secs(5));
    assert!(max <= bound, "flood's logs took {max} bytes");
    assert!(logs.join("flood.log.3").exists(), "the logs did not rotate");
    assert!(!logs.join("flood.log.4").exists(), "only three are kept");
    let tail = c.ok(&["logs", "flood", "-n", "3"]);
    // The newest line may be half written (`yes` writes 8 KiB at a time).
    assert!(
        tail.lines().count() == 3
            && tail
                .lines()
                .all(|l| !l.is_empty() && "flood-line".starts_with(l))
            && tail.lines().filter(|l| *l == "flood-line").count() >= 2,
        "{tail:?}"
    );

    // A minion restart: the writer goes on (it blocks once the pipe is
    // full), is adopted, and its output flows again.
    c.kill_minion("m1");
    std::thread::sleep(Duration::from_secs(1));
    let before = live_inode(&logs, "flood");
    assert!(alive(pid), "flood died with the minion");
    c.start_minion("m1");
    wait_for(
        "a rotation after the restart",
        Duration::from_secs(15),
        || (live_inode(&logs, "flood") != before).then_some(()),
    );
    let max = sample_max(&logs, "flood", Duration::from_secs(4));
    assert!(
        max <= bound,
        "flood's logs took {max} bytes after the restart"
    );
    assert!(alive(pid), "flood died after the minion restart");
    assert_eq!(c.recorded_pid("m1", "flood"), Some(pid), "flood restarted");
    c.wait_reachable("m1");
    assert_eq!(c.status("flood")["pid"].as_u64(), Some(pid));

    c.ok(&["del", "flood"]);
    wait_for("flood's logs to go", Duration::from_secs(10), || {
        let left: Vec<String> = std::fs::read_dir(&logs)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("flood."))
            .collect();
        left.is_empty().then_some(())
    });
    assert!(!alive(pid), "flood outlived its del");
}

/// A writer paced to `$1` bytes a second (unpaced without an argument), in
/// lines of 100 bytes, 1 MiB at a time.
const PACER: &str = r#"#!/usr/bin/perl
use Time::HiRes qw(time sleep);
my $rate = $ARGV[0] || 0;
my $chunk = (("x" x 99) . "\n") x 10486;
my ($start, $sent) = (time, 0);
while (1) {
    my $off = 0;
    while ($off < length $chunk) {
        my $n = syswrite(STDOUT, $chunk, length($chunk) - $off, $off);
        die "write: $!" unless defined $n;
        $off += $n;
    }
    $sent += length $chunk;
    my $ahead = $rate ? $sent / $rate - (time - $start) : 0;
    sleep($ahead) if $ahead > 0;
}
"#;

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Bytes a process has written, from /proc/PID/io.
fn written(pid: u64) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

/// Figures for BENCHMARKS.md (`bench/logs.sh`): for a writer paced to
/// 100 MB/s and an unpaced one, over `PHOENIX_LOGS_SECONDS` (default 20)
/// with `--log-max-bytes 1048576`: the writer's rate, the most disk its logs
/// took, and the minion's CPU.
#[test]
#[ignore = "a benchmark; run by bench/logs.sh"]
fn log_figures() {
    let seconds: u64 = std::env::var("PHOENIX_LOGS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let label = std::env::var("PHOENIX_LOGS_LABEL").unwrap_or_else(|_| "this build".into());
    let mut c = Cluster::master_only();
    c.minion_flags
        .extend(["--log-max-bytes".to_owned(), LIMIT.to_string()]);
    c.start_minion("m1");
    c.wait_waiting("m1");
    c.ok(&["accept", "m1"]);
    c.wait_reachable("m1");
    let pacer = c.dir.path().join("pacer");
    std::fs::write(&pacer, PACER).unwrap();
    c.ok(&["push", pacer.to_str().unwrap(), "pacer"]);
    let logs = c.minion_dir("m1").join("logs");
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for (name, rate) in [("paced", "100000000"), ("unpaced", "")] {
        let spec = json!([{
            "machine": "m1", "name": name, "image": "pacer", "type": "binary",
            "proxyport": free_port(), "args": if rate.is_empty() { json!([]) } else { json!([rate]) },
        }]);
        c.apply("deploy", &spec);
        let pid = wait_for("the writer's pid", Duration::from_secs(10), || {
            c.recorded_pid("m1", name)
        });
        let minion = u64::from(c.minion_pid("m1"));
        // Settle, then measure.
        std::thread::sleep(Duration::from_secs(1));
        let (cpu0, wrote0, t0) = (cpu_ticks(minion), written(pid), Instant::now());
        let max = sample_max(&logs, name, Duration::from_secs(seconds));
        let (cpu1, wrote1, dt) = (cpu_ticks(minion), written(pid), t0.elapsed());
        let rate = (wrote1 - wrote0) as f64 / dt.as_secs_f64() / 1e6;
        let cpu = (cpu1 - cpu0) as f64 / ticks_per_s / dt.as_secs_f64() * 100.0;
        println!(
            "| {label} | {name} | {rate:.0} MB/s | {:.1} MiB | {cpu:.1} % |",
            max as f64 / f64::from(1 << 20)
        );
        c.ok(&["del", name]);
    }
}
