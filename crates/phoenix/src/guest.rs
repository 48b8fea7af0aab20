//! `phoenix guest-init`: PID 1 of an OCI image booted as a VM.
//!
//! The minion boots such a VM with an initramfs holding this binary as
//! `/init` (with its ELF interpreter and libraries, and the kernel's virtio
//! modules; `phoenix_minion`'s `driver::vm::oci_vm`), and `-- guest-init`
//! at the end of the kernel command line, which the kernel hands to init
//! as its arguments. Then, in order:
//!
//! 1. mounts `/dev` (devtmpfs), `/proc` and `/sys` in the initramfs;
//! 2. loads the modules in `/lib/modules/phoenix` in name order (`NN-NAME.ko`,
//!    or `.ko.xz` which the kernel decompresses);
//! 3. reads the run description from the end of `/dev/vda`
//!    ([`phoenix_image::guest`]), mounts `/dev/vda` (ext4, the image's
//!    root filesystem, a fresh copy each start) and switches into it:
//!    `/dev`, `/proc`, `/sys` move along, the mount moves onto `/`, and
//!    the process `chroot`s into it (`switch_root`'s steps; the initramfs
//!    stays, as this process still runs from it);
//! 4. mounts `/tmp`, `/run`, `/dev/pts` and `/dev/shm`, sets the hostname,
//!    writes `/etc/hosts`, and configures the network device from the
//!    service's address: the address as a /128, a route to `fe80::1` (the
//!    host end of the service's veth) on the device, the default route
//!    through it;
//! 5. starts the program (argv, environment, working directory, uid and
//!    gid, all resolved by the minion as for a container) with the console
//!    as stdout and stderr;
//! 6. reaps every process that ends (orphans are re-parented to PID 1),
//!    forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the
//!    program, and turns an ACPI power-button press (how the minion stops a
//!    VM) into a SIGTERM to it;
//! 7. once the program has ended, records its exit code in the run
//!    description's footer on `/dev/vda` ([`phoenix_image::guest::write_exit`],
//!    for a minion that adopted QEMU and so never sees its exit status),
//!    then reports it through QEMU's `isa-debug-exit` port, which ends the
//!    VM ([`phoenix_image::guest::exit_byte`]). Without that device the VM
//!    is powered off.
//!
//! Anything that goes wrong before the program runs is printed on the
//! console (the service's log) as `phoenix-init: ...` and reported as exit
//! code 127. The logic (modules, environment, input events, route
//! requests) is in plain functions with tests; the privileged calls are in
//! small functions of their own.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use phoenix_image::guest::{self, GuestRun, INIT_FAILED};
use rustix::mount::{MountFlags, mount, mount_move};

/// The kernel's flag for `finit_module`: the file is compressed and the
/// kernel is to decompress it.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;
/// Signals passed on to the program as they are.
const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Runs as the guest's PID 1; never returns.
pub fn run() -> ! {
    if std::process::id() != 1 {
        eprintln!("phoenix guest-init is the init of a VM phoenix boots; it runs as PID 1 only");
        std::process::exit(2);
    }
    let code = match boot() {
        Ok(code) => code,
        Err(e) => {
            say(&format!("{e:#}"));
            INIT_FAILED
        }
    };
    finish(code)
}

/// A line on the console, which is the service's log.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "phoenix-init: {line}");
}

fn boot() -> Result<i32> {
    // Signals are waited for, never handled: block them first, so none is
    // lost before the wait and every thread started later inherits the mask.
    let signals = block_signals()?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        "mode=0755",
    )?;
    mount_fs("proc", "/proc", "proc", nodev(), "")?;
    mount_fs("sysfs", "/sys", "sysfs", nodev(), "")?;
    load_modules(&Path::new("/").join(guest::MODULE_DIR));
    let disk = wait_for_path(Path::new("/dev/vda"), Duration::from_secs(20))
        .context("no root disk (/dev/vda): is virtio_blk loaded?")?;
    let run = {
        let mut f = File::open(&disk).context("open /dev/vda")?;
        guest::read_run(&mut f).context("/dev/vda")?
    };
    std::fs::create_dir_all("/newroot").context("mkdir /newroot")?;
    mount_fs("/dev/vda", "/newroot", "ext4", MountFlags::empty(), "")
        .context("the root disk is not an ext4 filesystem the kernel can mount")?;
    switch_root(Path::new("/newroot"))?;
    mount_runtime()?;
    if !run.hostname.is_empty() {
        rustix::system::sethostname(run.hostname.as_bytes()).context("sethostname")?;
    }
    if let Some(hosts) = &run.hosts {
        write_file(Path::new("/etc/hosts"), hosts.as_bytes());
    }
    if let Some(ip) = run.ip {
        network(ip)?;
    }
    let child = spawn(&run)?;
    let pid = child.id();
    // The child is waited for by the reaping loop, not by `Child`.
    drop(child);
    watch_power_button(pid);
    Ok(supervise(pid, &signals, &run.argv[0]))
}

fn nodev() -> MountFlags {
    MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC
}

/// Mounts `source` on `target` (made if missing).
fn mount_fs(source: &str, target: &str, fs: &str, flags: MountFlags, data: &str) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    let data = CString::new(data)?;
    mount(source, target, fs, flags, data.as_c_str())
        .with_context(|| format!("mount {fs} on {target}"))
}

/// The modules of `dir` in load order, and the `finit_module` flags each
/// needs: by name, as the minion numbered them.
fn module_plan(mut names: Vec<String>) -> Vec<(String, i32)> {
    names.retain(|n| n.contains(".ko"));
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let compressed = !n.ends_with(".ko");
            let flags = if compressed {
                MODULE_INIT_COMPRESSED_FILE
            } else {
                0
            };
            (n, flags)
        })
        .collect()
}

/// Loads the modules of `dir`; a module that fails is named on the
/// console (what needs it fails later, saying what it missed).
fn load_modules(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for (name, flags) in module_plan(names) {
        let path = dir.join(&name);
        let loaded = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            match rustix::system::finit_module(&f, c"", flags) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        });
        if let Err(e) = loaded {
            say(&format!("cannot load module {name}: {e}"));
        }
        // The module is in the kernel now; its copy is not needed.
        let _ = std::fs::remove_file(&path);
    }
}

fn wait_for_path(path: &Path, timeout: Duration) -> Result<PathBuf> {
    let began = Instant::now();
    while !path.exists() {
        if began.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(path.to_owned())
}

/// `switch_root`: moves the early mounts and the new root onto `/` and
/// enters it.
fn switch_root(new: &Path) -> Result<()> {
    for m in ["/dev", "/proc", "/sys"] {
        let to = new.join(m.trim_start_matches('/'));
        std::fs::create_dir_all(&to).with_context(|| format!("mkdir {}", to.display()))?;
        mount_move(m, &to).with_context(|| format!("move {m} to {}", to.display()))?;
    }
    std::env::set_current_dir(new).context("chdir to the new root")?;
    mount_move(".", "/").context("move the new root onto /")?;
    rustix::process::chroot(".").context("chroot into the new root")?;
    std::env::set_current_dir("/").context("chdir /")?;
    Ok(())
}

fn mount_runtime() -> Result<()> {
    let flags = MountFlags::NOSUID | MountFlags::NODEV;
    mount_fs("tmpfs", "/tmp", "tmpfs", flags, "mode=1777")?;
    mount_fs("tmpfs", "/run", "tmpfs", flags, "mode=0755")?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", flags, "mode=1777")?;
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // An image's /etc/hosts may be a symlink (to /run/...): replace it.
    let _ = std::fs::remove_file(path);
    if let Err(e) = std::fs::write(path, data) {
        say(&format!("write {}: {e}", path.display()));
    }
}

/// The guest's network device: the first one that is not loopback.
fn network_device() -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .context("/sys/class/net")?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no network device: is virtio_net loaded?"))
}

/// The kernel's `struct in6_rtmsg` (libc's has private fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

/// The two routes of a guest: `fe80::1` on the device, and the default
/// route through it.
fn routes(ifindex: i32) -> [In6Rtmsg; 2] {
    let host = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let base = In6Rtmsg {
        dst: in6(Ipv6Addr::UNSPECIFIED),
        src: in6(Ipv6Addr::UNSPECIFIED),
        gateway: in6(Ipv6Addr::UNSPECIFIED),
        kind: 1, // RTN_UNICAST
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: 0,
        ifindex,
    };
    let up = u32::from(libc::RTF_UP);
    [
        In6Rtmsg {
            dst: in6(host),
            dst_len: 128,
            flags: up | u32::from(libc::RTF_HOST),
            ..base
        },
        In6Rtmsg {
            gateway: in6(host),
            flags: up | u32::from(libc::RTF_GATEWAY),
            ..base
        },
    ]
}

/// Address, routes and links up, with the classic ioctls (no netlink
/// client needed in the guest).
fn network(ip: Ipv6Addr) -> Result<()> {
    let dev = network_device()?;
    // The address is the service's alone: no duplicate detection, so the
    // first packet does not wait.
    write_file(
        &Path::new("/proc/sys/net/ipv6/conf")
            .join(&dev)
            .join("accept_dad"),
        b"0",
    );
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // at once.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    link_up(&sock, "lo")?;
    link_up(&sock, &dev)?;
    let ifindex = if_index(&sock, &dev)?;
    let addr = libc::in6_ifreq {
        ifr6_addr: in6(ip),
        ifr6_prefixlen: 128,
        ifr6_ifindex: ifindex,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one in6_ifreq,
    // which `addr` is, alive for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &addr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("add {ip}/128 to {dev}"));
    }
    for route in routes(ifindex) {
        // SAFETY: SIOCADDRT on an AF_INET6 socket reads one in6_rtmsg,
        // whose layout `In6Rtmsg` repeats, alive for the call.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) };
        let err = std::io::Error::last_os_error();
        if r < 0 && err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err).with_context(|| format!("add a route on {dev}"));
        }
    }
    Ok(())
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {name:?} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn if_index(sock: &OwnedFd, name: &str) -> Result<i32> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX reads the name from and writes the index into
    // `req`, an ifreq alive for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("index of {name}"));
    }
    // SAFETY: SIOCGIFINDEX filled the union's index member.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex })
}

fn link_up(sock: &OwnedFd, name: &str) -> Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
    // `req`, an ifreq alive for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("flags of {name}"));
    }
    // SAFETY: SIOCGIFFLAGS filled the union's flags member; setting it
    // keeps it the active one.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, alive for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bring {name} up"));
    }
    Ok(())
}

/// `KEY=VALUE` entries as pairs (an entry without `=` is skipped).
fn env_pairs(env: &[String]) -> Vec<(&str, &str)> {
    env.iter().filter_map(|e| e.split_once('=')).collect()
}

/// Starts the program of `run`.
fn spawn(run: &GuestRun) -> Result<std::process::Child> {
    let Some((program, args)) = run.argv.split_first() else {
        bail!("the run names no program");
    };
    let cwd = if run.cwd.is_empty() { "/" } else { &run.cwd };
    // As a container runtime does, a missing working directory is made.
    let _ = std::fs::create_dir_all(cwd);
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env_pairs(&run.env))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .gid(run.gid)
        .uid(run.uid)
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and
    // makes one async-signal-safe call (sigprocmask) on a local set.
    unsafe {
        cmd.pre_exec(|| {
            // The program starts with no signal blocked (this process
            // blocks the ones it waits for).
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().with_context(|| {
        format!(
            "cannot run {program:?} (in {cwd}, as {}:{})",
            run.uid, run.gid
        )
    })?;
    say(&format!("started {program} (pid {})", child.id()));
    Ok(child)
}

/// Whether a 24-byte `struct input_event` is a press of the power key.
fn is_power_press(event: &[u8]) -> bool {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    if event.len() != 24 {
        return false;
    }
    let kind = u16::from_le_bytes([event[16], event[17]]);
    let code = u16::from_le_bytes([event[18], event[19]]);
    let value = i32::from_le_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// A thread per power button (the ACPI button driver's input devices)
/// that sends the program SIGTERM when it is pressed.
fn watch_power_button(pid: u32) {
    let mut found = false;
    for e in std::fs::read_dir("/sys/class/input")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let what = std::fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
        if what.trim() != "Power Button" {
            continue;
        }
        let Ok(mut dev) = File::open(Path::new("/dev/input").join(&name)) else {
            continue;
        };
        found = true;
        std::thread::spawn(move || {
            let mut event = [0u8; 24];
            while dev.read_exact(&mut event).is_ok() {
                if is_power_press(&event) {
                    say("power button: stopping the program (SIGTERM)");
                    send(pid, libc::SIGTERM);
                }
            }
        });
    }
    if !found {
        say("no power button found: a stop ends this VM after the stop timeout");
    }
}

fn send(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the program's pid, which this process has not
    // reaped (or, once reaped, never reuses before the VM ends).
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED.iter().chain(&[libc::SIGCHLD, libc::SIGPWR]) {
            libc::sigaddset(&mut set, *s);
        }
    }
    // SAFETY: blocks the signals of `set` for this thread (the only one).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        bail!("sigprocmask: {}", std::io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait(3) reads `set` and writes the signal into `sig`.
    let r = unsafe { libc::sigwait(set, &mut sig) };
    if r != 0 { 0 } else { sig }
}

/// Reaps every process that ends, forwards signals to `pid`, and returns
/// its exit code once it has ended.
fn supervise(pid: u32, signals: &libc::sigset_t, program: &str) -> i32 {
    use rustix::process::{WaitOptions, wait};
    loop {
        match wait_signal(signals) {
            libc::SIGCHLD => {
                // Any child (`waitpid(-1)`): orphans are ours too.
                while let Ok(Some((who, status))) = wait(WaitOptions::NOHANG) {
                    if who.as_raw_nonzero().get() as u32 != pid {
                        continue;
                    }
                    let code = status.exit_status();
                    let signal = status.terminating_signal();
                    match (code, signal) {
                        (Some(c), _) => say(&format!("{program} exited with code {c}")),
                        (None, Some(s)) => say(&format!("{program} was killed by signal {s}")),
                        _ => {}
                    }
                    return guest::shell_code(code, signal);
                }
            }
            libc::SIGPWR => send(pid, libc::SIGTERM),
            0 => {}
            s => send(pid, s),
        }
    }
}

/// Reports `code` and ends the VM.
fn finish(code: i32) -> ! {
    // On the disk first: a minion restarted since it started QEMU is not
    // its parent and never sees QEMU's exit status; it reads this.
    if let Err(e) = record_exit(code) {
        say(&format!("cannot record the exit code on /dev/vda: {e}"));
    }
    rustix::fs::sync();
    // The console's last lines reach the service's log before QEMU ends.
    // SAFETY: tcdrain(3) on the console descriptor; it only waits.
    unsafe { libc::tcdrain(2) };
    if let Err(e) = debug_exit(guest::exit_byte(code)) {
        say(&format!(
            "cannot report the exit code through isa-debug-exit ({e}); powering off"
        ));
    }
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Writes `code` into the run description's footer on `/dev/vda`
/// ([`guest::write_exit`]) and flushes it to the host's disk file.
fn record_exit(code: i32) -> std::io::Result<()> {
    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vda")?;
    guest::write_exit(&mut disk, code)?;
    disk.sync_all()
}

/// Writes `byte` to QEMU's `isa-debug-exit` port: QEMU exits with
/// `(byte << 1) | 1`.
#[cfg(target_arch = "x86_64")]
fn debug_exit(byte: u8) -> std::io::Result<()> {
    let port = guest::DEBUG_EXIT_PORT;
    // SAFETY: ioperm(2) only changes this process's I/O port permissions.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: one byte out to the port ioperm just allowed: QEMU's
    // isa-debug-exit device ends the VM; without the device nothing
    // happens. No memory is touched.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") byte, options(nomem, nostack, preserves_flags));
    }
    Err(std::io::Error::other("the VM has no isa-debug-exit device"))
}

#[cfg(not(target_arch = "x86_64"))]
fn debug_exit(_byte: u8) -> std::io::Result<()> {
    Err(std::io::Error::other("isa-debug-exit is x86 only"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_in_their_order_compressed_ones_by_the_kernel() {
        let plan = module_plan(vec![
            "02-virtio_mmio.ko".into(),
            "00-virtio_ring.ko".into(),
            "01-virtio.ko.xz".into(),
            "README".into(),
        ]);
        assert_eq!(
            plan,
            [
                ("00-virtio_ring.ko".to_owned(), 0),
                ("01-virtio.ko.xz".to_owned(), MODULE_INIT_COMPRESSED_FILE),
                ("02-virtio_mmio.ko".to_owned(), 0),
            ]
        );
    }

    #[test]
    fn power_button_events() {
        let event = |kind: u16, code: u16, value: i32| {
            let mut e = [0u8; 24];
            e[16..18].copy_from_slice(&kind.to_le_bytes());
            e[18..20].copy_from_slice(&code.to_le_bytes());
            e[20..24].copy_from_slice(&value.to_le_bytes());
            e
        };
        assert!(is_power_press(&event(1, 116, 1)));
        assert!(!is_power_press(&event(1, 116, 0)), "a release");
        assert!(!is_power_press(&event(1, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "a sync event");
        assert!(!is_power_press(&[0u8; 16]));
    }

    #[test]
    fn routes_go_through_the_host_end() {
        let [host, default] = routes(2);
        let fe80 = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).octets();
        assert_eq!((host.dst.s6_addr, host.dst_len), (fe80, 128));
        assert_eq!(host.flags, u32::from(libc::RTF_UP | libc::RTF_HOST));
        assert_eq!((default.dst_len, default.gateway.s6_addr), (0, fe80));
        assert_eq!(default.flags, u32::from(libc::RTF_UP | libc::RTF_GATEWAY));
        assert!(host.ifindex == 2 && default.ifindex == 2);
        // The kernel's struct in6_rtmsg is 80 bytes on 64-bit.
        assert_eq!(std::mem::size_of::<In6Rtmsg>(), 80);
    }

    #[test]
    fn env_entries_split_at_the_first_equals() {
        let env = vec!["A=1".to_owned(), "B=x=y".to_owned(), "junk".to_owned()];
        assert_eq!(env_pairs(&env), [("A", "1"), ("B", "x=y")]);
    }
}
