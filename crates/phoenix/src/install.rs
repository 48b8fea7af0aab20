//! Installing the master or minion daemon as a system service.
//!
//! `phoenix master ...` and `phoenix minion ...` without `--foreground` write
//! a service that runs the same command with `--foreground`, enable it and
//! start it: an OpenRC script on Alpine (seed 000's platform), a systemd
//! unit elsewhere. Running it again rewrites the same file and changes
//! nothing else. `phoenix uninstall ROLE` stops and removes it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    Systemd,
    OpenRc,
}

impl Init {
    pub fn detect() -> Option<Init> {
        if Path::new("/run/systemd/system").is_dir() {
            Some(Init::Systemd)
        } else if Path::new("/sbin/openrc-run").exists() {
            Some(Init::OpenRc)
        } else {
            None
        }
    }

    fn path(self, role: &str) -> PathBuf {
        match self {
            Init::Systemd => PathBuf::from(format!("/etc/systemd/system/phoenix-{role}.service")),
            Init::OpenRc => PathBuf::from(format!("/etc/init.d/phoenix-{role}")),
        }
    }
}

/// Quotes an argument for a shell or a systemd ExecStart line.
fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+,".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The service file that runs `exe args... --foreground`.
pub fn service_file(init: Init, role: &str, exe: &Path, args: &[String]) -> String {
    let mut cmd = vec![quote(&exe.display().to_string())];
    cmd.extend(args.iter().map(|a| quote(a)));
    cmd.push("--foreground".into());
    match init {
        // KillMode=process: stopping the minion daemon (say, to upgrade it)
        // must not stop the services it supervises; the next start adopts them.
        Init::Systemd => format!(
            "[Unit]\nDescription=Phoenix {role}\nAfter=network-online.target\nWants=network-online.target\n\n\
             [Service]\nExecStart={}\nRestart=always\nRestartSec=1\nKillMode=process\nLimitNOFILE=1048576\n\n\
             [Install]\nWantedBy=multi-user.target\n",
            cmd.join(" ")
        ),
        Init::OpenRc => format!(
            "#!/sbin/openrc-run\n# Written by phoenix; `phoenix uninstall {role}` removes it.\n\
             description=\"Phoenix {role}\"\ncommand={}\ncommand_args=\"{}\"\ncommand_background=true\n\
             pidfile=\"/run/phoenix-{role}.pid\"\nsupervisor=supervise-daemon\nrespawn_delay=1\n\
             output_log=\"/var/log/phoenix-{role}.log\"\nerror_log=\"/var/log/phoenix-{role}.log\"\n\n\
             depend() {{\n\tneed net\n}}\n",
            cmd[0],
            cmd[1..].join(" ").replace('"', "\\\"")
        ),
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !status.success() {
        bail!("`{cmd} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Writes, enables and starts the service for `role`.
pub fn install(role: &str, args: &[String]) -> Result<()> {
    let Some(init) = Init::detect() else {
        bail!(
            "no supported init system found (looked for systemd and OpenRC); \
             run with --foreground under a supervisor of your choice"
        );
    };
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let path = init.path(role);
    let text = service_file(init, role, &exe, args);
    let unchanged = std::fs::read_to_string(&path).is_ok_and(|t| t == text);
    if !unchanged {
        std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        if init == Init::OpenRc {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let unit = format!("phoenix-{role}");
    match init {
        Init::Systemd => {
            if !unchanged {
                run("systemctl", &["daemon-reload"])?;
            }
            run("systemctl", &["enable", "--now", &unit])?;
        }
        Init::OpenRc => {
            run("rc-update", &["add", &unit, "default"])?;
            run("rc-service", &[&unit, "start"])
                .or_else(|_| run("rc-service", &[&unit, "status"]))?;
        }
    }
    eprintln!("installed and started {} ({})", unit, path.display());
    Ok(())
}

pub fn uninstall(role: &str) -> Result<()> {
    let Some(init) = Init::detect() else {
        bail!("no supported init system found (looked for systemd and OpenRC); nothing to remove");
    };
    let unit = format!("phoenix-{role}");
    let path = init.path(role);
    if !path.exists() {
        eprintln!("{unit} is not installed");
        return Ok(());
    }
    match init {
        Init::Systemd => {
            let _ = run("systemctl", &["disable", "--now", &unit]);
            std::fs::remove_file(&path)?;
            run("systemctl", &["daemon-reload"])?;
        }
        Init::OpenRc => {
            let _ = run("rc-service", &[&unit, "stop"]);
            let _ = run("rc-update", &["del", &unit, "default"]);
            std::fs::remove_file(&path)?;
        }
    }
    eprintln!("removed {unit}; its data dir is left in place");
    Ok(())
}

/// Deletes a data dir, after checking it looks like one of ours.
pub fn purge(dir: &Path) -> Result<()> {
    if !dir.exists() {
        eprintln!("{} does not exist; nothing to purge", dir.display());
        return Ok(());
    }
    let ours = ["phoenix.db", "master.key", "minion.key"]
        .iter()
        .any(|f| dir.join(f).exists());
    if !ours || dir.parent().is_none() {
        bail!(
            "{} does not look like a phoenix data dir (no phoenix.db, master.key or minion.key); not deleting it",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot delete {}", dir.display()))?;
    eprintln!("deleted {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_unit_runs_the_same_command_in_foreground() {
        let args = vec![
            "master".into(),
            "203.0.113.7".into(),
            "--data-dir".into(),
            "/srv/my dir".into(),
        ];
        let unit = service_file(
            Init::Systemd,
            "master",
            Path::new("/usr/local/bin/phoenix"),
            &args,
        );
        assert!(unit.contains(
            "ExecStart=/usr/local/bin/phoenix master 203.0.113.7 --data-dir '/srv/my dir' --foreground\n"
        ));
        assert!(unit.contains("KillMode=process"));
        assert!(unit.contains("WantedBy=multi-user.target"));
    }

    #[test]
    fn openrc_script_is_supervised() {
        let args = vec!["minion".into(), "m1".into(), "a+b/c=".into()];
        let rc = service_file(
            Init::OpenRc,
            "minion",
            Path::new("/usr/local/bin/phoenix"),
            &args,
        );
        assert!(rc.starts_with("#!/sbin/openrc-run\n"));
        assert!(rc.contains("command=/usr/local/bin/phoenix\n"));
        assert!(rc.contains("command_args=\"minion m1 a+b/c= --foreground\""));
        assert!(rc.contains("supervisor=supervise-daemon"));
    }

    #[test]
    fn purge_only_deletes_phoenix_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        assert!(purge(&other).is_err());
        assert!(other.exists());
        let ours = dir.path().join("minion");
        std::fs::create_dir(&ours).unwrap();
        std::fs::write(ours.join("minion.key"), "k").unwrap();
        purge(&ours).unwrap();
        assert!(!ours.exists());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
