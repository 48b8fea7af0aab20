//! A private supervisord (`supervisord -n -c DIR/supervisord.conf`),
//! driven through `supervisorctl`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::util::{Daemon, Out, procs_under, run, sweep, until, write};

pub struct Supd {
    pub dir: PathBuf,
    conf: PathBuf,
    daemon: Daemon,
}

/// One `[program:x]` section.
pub struct Program {
    pub name: String,
    pub command: String,
    pub port: Option<u16>,
    pub autostart: bool,
}

/// What the teardown found.
#[derive(Debug, Default, Clone)]
pub struct Teardown {
    /// From `supervisorctl shutdown` until supervisord exited.
    pub shutdown_after: Option<Duration>,
    pub leftovers: usize,
    pub errors: Vec<String>,
    /// Observations that are not problems.
    pub notes: Vec<String>,
}

impl Supd {
    pub fn start(dir: &Path) -> Result<Self> {
        for sub in ["conf.d", "logs", "work"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        let conf = dir.join("supervisord.conf");
        write(
            &conf,
            &format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
                 [supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
                 childlogdir={d}/logs\nloglevel=info\nminfds=16384\n\n\
                 [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [include]\nfiles={d}/conf.d/*.conf\n"
            ),
        )?;
        let args = [std::ffi::OsStr::new("-n"), "-c".as_ref(), conf.as_os_str()];
        let daemon = Daemon::spawn(
            "supervisord",
            "supervisord".as_ref(),
            &args,
            &[],
            &dir.join("supervisord.out"),
        )?;
        let mut s = Supd {
            dir: dir.to_owned(),
            conf,
            daemon,
        };
        let pid = s.daemon.pid().to_string();
        until(
            "supervisord to answer",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                let out = s.ctl(&["pid"], Duration::from_secs(10)).ok()?;
                (out.stdout.trim() == pid).then_some(())
            },
        )?;
        s.check_alive()?;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if !self.daemon.alive() {
            bail!(
                "supervisord exited; see {}",
                self.dir.join("supervisord.out").display()
            );
        }
        Ok(())
    }

    /// `supervisorctl -c CONF ARGS`, whatever its exit status.
    pub fn ctl(&self, args: &[&str], timeout: Duration) -> Result<Out> {
        run(
            Command::new("supervisorctl")
                .arg("-c")
                .arg(&self.conf)
                .args(args),
            timeout,
        )
    }

    /// Like [`Supd::ctl`], and fails unless it exits 0 with no `ERROR` in its output.
    pub fn ctl_ok(&self, args: &[&str], timeout: Duration) -> Result<Out> {
        let out = self.ctl(args, timeout)?;
        if !out.status.success() || out.stdout.contains("ERROR") {
            bail!(
                "supervisorctl {args:?} failed ({}): {}{}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(out)
    }

    /// Writes `conf.d/FILE.conf` with these programs (not yet loaded).
    pub fn write_programs(&self, file: &str, programs: &[Program]) -> Result<()> {
        let d = self.dir.display();
        let mut text = String::new();
        for p in programs {
            let _ = write!(
                text,
                "[program:{name}]\ncommand={cmd}\ndirectory={d}/work\nautostart={auto}\nautorestart=true\n\
                 startsecs=0\nstartretries=1000000\nstopwaitsecs=5\nredirect_stderr=true\n\
                 stdout_logfile={d}/logs/{name}.log\n",
                name = p.name,
                cmd = p.command,
                auto = p.autostart,
            );
            if let Some(port) = p.port {
                let _ = writeln!(text, "environment=PORT=\"{port}\"");
            }
            text.push('\n');
        }
        write(&self.dir.join("conf.d").join(format!("{file}.conf")), &text)
    }

    /// How many programs `supervisorctl status` shows as RUNNING.
    pub fn running(&self) -> Result<usize> {
        let out = self.ctl(&["status"], Duration::from_secs(60))?;
        Ok(out
            .stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("RUNNING"))
            .count())
    }

    /// `supervisorctl shutdown` (which stops every program), waits for
    /// supervisord to exit, and kills whatever is left.
    pub fn teardown(mut self) -> Teardown {
        let mut td = Teardown::default();
        let start = std::time::Instant::now();
        let limit = Duration::from_secs(30);
        let mut cut_short = false;
        match self.ctl(&["shutdown"], limit) {
            Ok(_) => {
                if self.daemon.wait_exit(limit) {
                    td.shutdown_after = Some(start.elapsed());
                } else {
                    cut_short = true;
                }
            }
            Err(e) => td.errors.push(format!("supervisorctl shutdown: {e:#}")),
        }
        self.daemon.stop(Duration::from_secs(2));
        let left = procs_under(&self.dir, &[]);
        td.leftovers = sweep(&self.dir, &[]);
        if cut_short {
            // Not a leak: supervisord stops its programs one group at a
            // time, noticing each exit on its next 1 s loop tick.
            td.notes.push(format!(
                "`supervisorctl shutdown` had not finished after {} s (supervisord stops one program at a time and \
                 notices each exit on a 1 s tick); the bench killed supervisord and its {} remaining programs",
                limit.as_secs(),
                left.len()
            ));
        } else if !left.is_empty() {
            td.errors.push(format!(
                "processes left after supervisord stopped: {left:?}"
            ));
        }
        td
    }
}

/// `supervisord --version` and the Python it runs on, for the report.
pub fn version() -> String {
    let v = |cmd: &str, arg: &str| {
        run(Command::new(cmd).arg(arg), Duration::from_secs(10))
            .map(|o| format!("{}{}", o.stdout.trim(), o.stderr.trim()))
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "supervisord {} on {}",
        v("supervisord", "--version"),
        v("python3", "--version")
    )
}
