//! The Firecracker backend of the `vm` driver, used instead of QEMU when a
//! `firecracker` binary is in `PATH`, KVM works ([`super::Accel::Kvm`]) and
//! the image's kernel is a `vmlinux` (Firecracker boots no bzImage).
//!
//! One Firecracker process per VM, started like QEMU (the same spawner: in
//! the service's cgroups and network namespace, its stdout, the guest's
//! serial console, into the service's log). It is configured through its
//! API socket (`work/NAME/fc.sock`), HTTP/1.1 over a unix socket, one
//! request at a time, in this order: `PUT /machine-config` (vCPUs,
//! memory), `PUT /boot-source` (kernel, initrd, boot arguments),
//! `PUT /drives/rootfs` (the run's copy of `rootfs.ext4`),
//! `PUT /network-interfaces/eth0` (the tap `vm0`), then
//! `PUT /actions {"action_type": "InstanceStart"}`. A request answered
//! with anything but 2xx fails the start, naming the request and quoting
//! Firecracker's fault message. Stop: `SendCtrlAltDel` (the guest's
//! keyboard controller sends it to its init, which powers off), SIGKILL
//! after the stop timeout.
//!
//! Firecracker runs no network script, so the process is started as
//! `sh -c 'SCRIPT; exec firecracker ...'`: the shell makes the tap (a
//! persistent one, reused by the next start, gone with the namespace)
//! and runs the same `ifup` script QEMU runs on it, then becomes
//! Firecracker; no process is left beside it.
//!
//! Firecracker is installed by the user (it is in no distribution's
//! archive); it needs real hardware virtualisation. Its guest kernel must
//! find Firecracker's virtio-mmio devices: through ACPI where Firecracker
//! describes them so (as QEMU's microvm does), or on the kernel command
//! line (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, which Debian's cloud kernel
//! does not have). Not run here: this machine has no hardware KVM.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The tap device Firecracker opens in the service's namespace.
pub const TAP: &str = "vm0";

/// What a Firecracker microVM is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FcVm {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub rootfs: PathBuf,
    /// Whether the VM has a network device (the tap [`TAP`]).
    pub network: bool,
    pub vcpus: u32,
    pub mem_mib: u64,
}

/// One API request.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Value,
}

impl ApiRequest {
    fn put(path: &str, body: Value) -> ApiRequest {
        ApiRequest {
            method: "PUT",
            path: path.to_owned(),
            body,
        }
    }

    /// The request as bytes on the socket.
    pub fn to_http(&self) -> Vec<u8> {
        let body = self.body.to_string();
        format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.method,
            self.path,
            body.len()
        )
        .into_bytes()
    }
}

/// The requests that configure and start `vm`, in order.
pub fn boot_requests(vm: &FcVm) -> Vec<ApiRequest> {
    let p = |p: &Path| p.display().to_string();
    let mut boot = json!({
        "kernel_image_path": p(&vm.kernel),
        "boot_args": vm.boot_args,
    });
    if let Some(i) = &vm.initrd {
        boot["initrd_path"] = json!(p(i));
    }
    let mut r = vec![
        ApiRequest::put(
            "/machine-config",
            json!({"vcpu_count": vm.vcpus, "mem_size_mib": vm.mem_mib}),
        ),
        ApiRequest::put("/boot-source", boot),
        ApiRequest::put(
            "/drives/rootfs",
            json!({
                "drive_id": "rootfs",
                "path_on_host": p(&vm.rootfs),
                "is_root_device": true,
                "is_read_only": false,
            }),
        ),
    ];
    if vm.network {
        r.push(ApiRequest::put(
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": TAP}),
        ));
    }
    r.push(ApiRequest::put(
        "/actions",
        json!({"action_type": "InstanceStart"}),
    ));
    r
}

/// What a stop sends: Ctrl-Alt-Del to the guest.
pub fn stop_request() -> ApiRequest {
    ApiRequest::put("/actions", json!({"action_type": "SendCtrlAltDel"}))
}

/// The shell script the process starts as: makes the tap and runs the
/// network script `ifup` on it (when there is one), then becomes
/// Firecracker with its API socket at `sock`.
pub fn launch_script(firecracker: &Path, sock: &Path, id: &str, ifup: Option<&Path>) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut s = String::from("set -e\n");
    if let Some(ifup) = ifup {
        s.push_str(&format!(
            "ip link show {TAP} >/dev/null 2>&1 || ip tuntap add dev {TAP} mode tap\n{} {TAP}\n",
            q(&ifup.display().to_string())
        ));
    }
    s.push_str(&format!(
        "exec {} --api-sock {} --id {}\n",
        q(&firecracker.display().to_string()),
        q(&sock.display().to_string()),
        q(id)
    ));
    s
}

/// Why a request failed: the status line and Firecracker's fault message.
fn fault(answer: &str) -> String {
    let status = answer.lines().next().unwrap_or("").trim().to_owned();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    match serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
    {
        Some(m) => format!("{status}: {m}"),
        None => status,
    }
}

/// Sends one request on a new connection to the API socket; `Err` names
/// it and says why it failed. Blocking, bounded by short timeouts.
pub fn send(sock: &Path, r: &ApiRequest) -> Result<(), String> {
    let what = format!("firecracker {} {}", r.method, r.path);
    let io = |e: std::io::Error| format!("{what} on {}: {e}", sock.display());
    // Refused for a moment between the socket's bind and its listen.
    let began = Instant::now();
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if began.elapsed() < Duration::from_secs(1) => {
                tracing::debug!("{what}: {e}; again");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io(e)),
        }
    };
    let t = Some(Duration::from_secs(5));
    s.set_read_timeout(t).map_err(io)?;
    s.set_write_timeout(t).map_err(io)?;
    s.write_all(&r.to_http()).map_err(io)?;
    // One answer; Firecracker keeps the connection open, so read until
    // the headers and the body they announce are in.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&got);
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Ok(()),
        _ => Err(format!("{what}: {}", fault(&answer))),
    }
}

/// Waits for Firecracker's API socket to accept connections (up to
/// `within`), then sends `requests` in order.
pub fn configure(sock: &Path, requests: &[ApiRequest], within: Duration) -> Result<(), String> {
    let began = Instant::now();
    while !sock.exists() {
        if began.elapsed() > within {
            return Err(format!(
                "firecracker's API socket {} did not come up within {within:?}",
                sock.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    requests.iter().try_for_each(|r| send(sock, r))
}

/// The API socket named in a Firecracker's command line (`--api-sock PATH`).
pub fn api_sock_of(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    args.by_ref().find(|a| *a == b"--api-sock")?;
    let path = std::str::from_utf8(args.next()?).ok()?;
    Some(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> FcVm {
        FcVm {
            kernel: "/i/vmlinux".into(),
            initrd: Some("/i/initrd".into()),
            boot_args: "console=ttyS0 reboot=k PORT=8080".into(),
            rootfs: "/w/disk.ext4".into(),
            network: true,
            vcpus: 2,
            mem_mib: 256,
        }
    }

    #[test]
    fn a_boot_is_configured_then_started() {
        let r = boot_requests(&vm());
        let paths: Vec<&str> = r.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/machine-config",
                "/boot-source",
                "/drives/rootfs",
                "/network-interfaces/eth0",
                "/actions"
            ]
        );
        assert!(r.iter().all(|r| r.method == "PUT"));
        assert_eq!(r[0].body, json!({"vcpu_count": 2, "mem_size_mib": 256}));
        assert_eq!(
            r[1].body,
            json!({"kernel_image_path": "/i/vmlinux", "initrd_path": "/i/initrd",
                   "boot_args": "console=ttyS0 reboot=k PORT=8080"})
        );
        assert_eq!(
            r[2].body,
            json!({"drive_id": "rootfs", "path_on_host": "/w/disk.ext4",
                   "is_root_device": true, "is_read_only": false})
        );
        assert_eq!(
            r[3].body,
            json!({"iface_id": "eth0", "host_dev_name": "vm0"})
        );
        assert_eq!(r[4].body, json!({"action_type": "InstanceStart"}));
        // Without a network: no interface; without an initrd: no path.
        let bare = FcVm {
            network: false,
            initrd: None,
            ..vm()
        };
        let r = boot_requests(&bare);
        assert!(r.iter().all(|r| !r.path.starts_with("/network")));
        assert!(r[1].body.get("initrd_path").is_none());
        assert_eq!(
            stop_request().body,
            json!({"action_type": "SendCtrlAltDel"})
        );
    }

    #[test]
    fn requests_are_http_with_a_json_body() {
        let http = String::from_utf8(stop_request().to_http()).unwrap();
        let body = r#"{"action_type":"SendCtrlAltDel"}"#;
        assert!(http.starts_with("PUT /actions HTTP/1.1\r\n"), "{http}");
        assert!(
            http.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{http}"
        );
        assert!(http.ends_with(&format!("\r\n\r\n{body}")), "{http}");
    }

    #[test]
    fn the_launch_makes_the_tap_then_becomes_firecracker() {
        let s = launch_script(
            Path::new("/usr/bin/firecracker"),
            Path::new("/w/it's/fc.sock"),
            "web",
            Some(Path::new("/w/ifup")),
        );
        assert!(
            s.contains("ip tuntap add dev vm0 mode tap\n'/w/ifup' vm0\n"),
            "{s}"
        );
        assert!(
            s.ends_with(
                "exec '/usr/bin/firecracker' --api-sock '/w/it'\\''s/fc.sock' --id 'web'\n"
            ),
            "{s}"
        );
        assert!(!launch_script(Path::new("/f"), Path::new("/s"), "x", None).contains("tuntap"));
    }

    #[test]
    fn a_refusal_names_the_request_and_quotes_firecracker() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fc.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_owned(),
                {
                    let body = r#"{"fault_message":"Invalid kernel path"}"#;
                    format!(
                        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                },
            ] {
                let (mut c, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).unwrap();
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        let r = boot_requests(&vm());
        let err = configure(&sock, &r[..2], Duration::from_secs(5)).unwrap_err();
        server.join().unwrap();
        assert_eq!(
            err,
            "firecracker PUT /boot-source: HTTP/1.1 400 Bad Request: Invalid kernel path"
        );
    }
}
