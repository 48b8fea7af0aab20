//! Steps for a forked child to take before it runs its program
//! (`std::process::Command::pre_exec`), so that the minion itself never
//! changes namespace: `unshare` on the minion's runtime thread would move
//! the minion, and everything it starts later, with it.
//!
//! Every function here is async-signal-safe — system calls on static C
//! strings or descriptors opened before the fork, no allocation, no lock —
//! as code between fork and exec in a multi-threaded process must be.
//! Starting a process inside a service's cgroups and namespaces is
//! [`crate::spawn`]'s, which needs no `pre_exec` hook.

use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::thread::UnshareFlags;

/// Gives the calling process a private mount namespace whose
/// `/sys/fs/cgroup` is a fresh cgroup2 mount.
///
/// For crun on a hybrid host: crun refuses v1 controllers beside a v2
/// mount, and sees only the v2 one here (run it with
/// `--cgroup-manager=disabled`; Phoenix's own cgroups are joined before).
/// Mount propagation is made private first so the new mount does not leak
/// back into the host's namespace.
pub fn private_cgroup2_mount() -> std::io::Result<()> {
    // SAFETY: CLONE_NEWNS only gives this process its own copy of the mount
    // table; the hazard `unshare_unsafe` warns of is CLONE_FILES (threads
    // sharing descriptor tables), which is not asked for, and the forked
    // child has a single thread anyway.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }?;
    rustix::mount::mount_change(
        c"/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )?;
    rustix::mount::mount(
        c"cgroup2",
        c"/sys/fs/cgroup",
        c"cgroup2",
        MountFlags::empty(),
        None,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn the_child_sees_cgroup2_and_the_host_does_not_change() {
        if !is_root() {
            eprintln!("skipped: needs root (mount namespaces)");
            return;
        }
        let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut cmd = Command::new("stat");
        cmd.args(["-f", "-c", "%T", "/sys/fs/cgroup"]);
        // SAFETY: private_cgroup2_mount is async-signal-safe (see the
        // module header).
        unsafe { cmd.pre_exec(private_cgroup2_mount) };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cgroup2fs");
        let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(before, after, "the mount leaked into our namespace");
    }
}
