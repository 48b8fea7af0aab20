//! Progress while `deploy`, `update` and `restart` wait for services.
//!
//! On a terminal (stderr) one line is redrawn in place; otherwise a plain
//! line is written whenever a service's state or message changes, so a log
//! of the run shows what happened without a line per poll. `--json` shows
//! none of it.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use phoenix_model::proto::ServiceView;

/// The longest line drawn in place (a wrapped line could not be redrawn).
const LINE_WIDTH: usize = 100;

pub struct Progress {
    terminal: bool,
    /// Service → what was last shown of it.
    shown: HashMap<String, String>,
    /// A line is drawn in place and must be cleared before other output.
    drawn: bool,
}

impl Progress {
    pub fn on_stderr() -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            shown: HashMap::new(),
            drawn: false,
        }
    }

    /// Shows where these services stand.
    pub fn show<'a>(&mut self, views: impl Iterator<Item = &'a ServiceView>) {
        let mut err = std::io::stderr().lock();
        let mut parts = Vec::new();
        for v in views {
            let now = describe(v);
            if !self.terminal && self.shown.get(&v.name) != Some(&now) {
                let _ = writeln!(err, "  {}: {now}", v.name);
            }
            parts.push(format!("{} {now}", v.name));
            self.shown.insert(v.name.clone(), now);
        }
        if self.terminal {
            let line: String = format!("waiting: {}", parts.join(", "))
                .chars()
                .take(LINE_WIDTH)
                .collect();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.drawn = true;
        }
    }

    /// Removes the line drawn in place, if any.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

/// `starting (fetching image "web")`, `backoff (exited with code 2; ...)`.
fn describe(v: &ServiceView) -> String {
    let mut s = v.state.clone();
    if !v.node_reachable {
        s.push_str(" (machine unreachable)");
    } else if let Some(m) = &v.message {
        s.push_str(&format!(" ({m})"));
    }
    s
}
