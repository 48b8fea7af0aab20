//! `Procfile` → specs.
//!
//! Each `TYPE: COMMAND` line becomes a service named after the type (as a
//! Phoenix name: lowercase, `_` becomes `-`), running the given image (type
//! `docker`) with `args: [/bin/sh, -c, COMMAND]`, as Heroku runs it
//! through a shell (so `$PORT` and `&&` work). `web` gets `proxyport`
//! (8000 unless told otherwise), and Phoenix sets `PORT` to it, which is
//! what a Procfile's web process listens on. `release` (Heroku's
//! release-phase command) becomes a `oneshot`. Blank lines and `#`
//! comments are skipped; any other line that is not `TYPE: COMMAND` is an
//! error naming its line.

use super::{ImportError, Imported, Note, Problem, RegistryFile, sanitize_name};
use crate::spec::DEFAULT_PROXYPORT;
use crate::spec::raw::RawSpec;

/// What the Procfile importer needs besides the file.
pub struct ProcfileInput<'a> {
    /// The file as the user named it, for messages.
    pub file: &'a str,
    pub text: &'a str,
    /// The machine every process runs on.
    pub machine: &'a str,
    /// The image every process runs: a spec's `image` (`app:v1`, the
    /// registry file `app.tar`, tag `v1`).
    pub image: &'a str,
    /// The `web` process's proxyport (and so its `PORT`); 8000 if None.
    pub port: Option<u16>,
}

/// Imports a Procfile. Every bad line comes back at once.
pub fn procfile(input: &ProcfileInput<'_>) -> Result<Imported, ImportError> {
    let mut out = Imported::default();
    let mut problems = Vec::new();
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (i, raw) in input.text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((kind, command)) = line.split_once(':') else {
            problems.push(Problem::new(
                Some(n),
                None,
                format!("{line:?} is not `TYPE: COMMAND`"),
            ));
            continue;
        };
        let (kind, command) = (kind.trim(), command.trim());
        if kind.is_empty()
            || !kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(Problem::new(
                Some(n),
                None,
                format!("{kind:?} is not a process type (letters, digits, '_' and '-')"),
            ));
            continue;
        }
        if command.is_empty() {
            problems.push(Problem::new(Some(n), Some(kind), "the command is empty").of(kind));
            continue;
        }
        let Some(name) = sanitize_name(kind) else {
            problems.push(Problem::new(
                Some(n),
                None,
                format!("{kind:?} has no letter or digit to make a Phoenix name of"),
            ));
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(s, _)| *s == name) {
            problems.push(
                Problem::new(
                    Some(n),
                    None,
                    format!("the process type becomes {name:?}, as on line {first}; a name is given once"),
                )
                .of(kind),
            );
            continue;
        }
        seen.push((name.clone(), n));
        if name != kind {
            out.warnings.push(Note {
                service: Some(kind.to_owned()),
                field: "type".into(),
                line: Some(n),
                reason: format!("named {name:?}: a Phoenix name is lowercase a-z, 0-9 and '-'"),
            });
        }
        let mut spec = RawSpec {
            machine: Some(input.machine.to_owned()),
            name: Some(name.clone()),
            image: Some(input.image.to_owned()),
            kind: Some("docker".into()),
            args: vec!["/bin/sh".into(), "-c".into(), command.to_owned()],
            ..RawSpec::default()
        };
        match name.as_str() {
            "web" => spec.proxyport = Some(input.port.unwrap_or(DEFAULT_PROXYPORT)),
            "release" => {
                spec.duration = Some("oneshot".into());
                out.warnings.push(Note {
                    service: Some(kind.to_owned()),
                    field: "release".into(),
                    line: Some(n),
                    reason: "a oneshot: it runs once per change of its spec, not before each \
                             release of the others"
                        .into(),
                });
            }
            _ => {}
        }
        out.specs.push(spec);
        out.lines.push(n);
    }
    if let Err(reason) = super::compose::reference_chars(input.image) {
        problems.push(Problem::new(None, Some("--image"), reason));
    }
    if out.specs.is_empty() && problems.is_empty() {
        problems.push(Problem::new(None, None, "the file names no process types"));
    }
    if !problems.is_empty() {
        return Err(ImportError {
            file: input.file.to_owned(),
            problems,
        });
    }
    let (file, tag) = match input.image.split_once(':') {
        Some((f, t)) => (f, Some(t)),
        None => (input.image, None),
    };
    let file = if file.ends_with(".tar") {
        file.to_owned()
    } else {
        format!("{file}.tar")
    };
    let reference = match tag {
        Some(t) => format!("{}:{t}", file.trim_end_matches(".tar")),
        None => file.trim_end_matches(".tar").to_owned(),
    };
    out.push.push(RegistryFile {
        how: format!("docker save {reference} -o {file} && phoenix push {file}"),
        file,
        references: vec![reference],
        services: out.specs.iter().filter_map(|s| s.name.clone()).collect(),
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(text: &str) -> Result<Imported, ImportError> {
        procfile(&ProcfileInput {
            file: "Procfile",
            text,
            machine: "m1",
            image: "app:v3",
            port: None,
        })
    }

    #[test]
    fn each_process_type_becomes_a_service() {
        let text = "# processes\n\nweb: bundle exec puma -p $PORT\nworker:   sidekiq -q a,b  \n\
                    release: rake db:migrate\nclock_tick: ruby clock.rb\n";
        let i = import(text).unwrap();
        let specs = i.check("Procfile").unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "worker", "release", "clock-tick"]);
        let web = &specs[0];
        assert_eq!(web.args, ["/bin/sh", "-c", "bundle exec puma -p $PORT"]);
        assert_eq!((web.proxyport, web.image.as_str()), (8000, "app:v3"));
        assert_eq!(web.registry_file(), ("app.tar".into(), Some("v3".into())));
        assert_eq!(specs[1].args[2], "sidekiq -q a,b");
        assert_eq!(specs[2].duration, crate::spec::Duration::Oneshot);
        // Only web is given a proxyport; the others keep the default.
        assert!(i.specs[1].proxyport.is_none());
        assert_eq!(i.warnings.len(), 2, "{:?}", i.warnings);
        assert!(i.warnings[1].to_string().contains("named \"clock-tick\""));
        assert_eq!(
            i.push[0].how,
            "docker save app:v3 -o app.tar && phoenix push app.tar"
        );
        // The YAML for review reads back as the same specs.
        let yaml = i.to_yaml(&[]);
        assert_eq!(crate::spec::parse_specs("p.yaml", &yaml).unwrap(), specs);
    }

    #[test]
    fn web_takes_the_port_given() {
        let i = procfile(&ProcfileInput {
            file: "Procfile",
            text: "web: ./server",
            machine: "m1",
            image: "app.tar",
            port: Some(5000),
        })
        .unwrap();
        assert_eq!(i.specs[0].proxyport, Some(5000));
        assert_eq!(i.push[0].file, "app.tar");
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let e =
            import("web: ok\njust words\n: nothing\nweb: again\nw eb: x\nworker:\n").unwrap_err();
        let all = e.to_string();
        assert!(
            all.starts_with("Procfile: cannot be imported (5 problems):"),
            "{all}"
        );
        for expected in [
            "line 2: \"just words\" is not `TYPE: COMMAND`",
            "line 3: \"\" is not a process type",
            "line 4: service \"web\": the process type becomes \"web\", as on line 1",
            "line 5: \"w eb\" is not a process type",
            "line 6: service \"worker\": field `worker`: the command is empty",
        ] {
            assert!(all.contains(expected), "{expected}\nnot in\n{all}");
        }
        let e = import("# nothing\n\n").unwrap_err();
        assert!(e.to_string().contains("names no process types"), "{e}");
    }

    #[test]
    fn an_image_that_is_no_reference_is_refused() {
        let e = procfile(&ProcfileInput {
            file: "Procfile",
            text: "web: ./server",
            machine: "m1",
            image: "app:v1; rm -rf ~",
            port: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not an image reference"), "{e}");
    }
}
