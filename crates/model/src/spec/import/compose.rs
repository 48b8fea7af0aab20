//! `docker-compose.yml` → specs.
//!
//! Each service becomes a spec of type `docker` on the given machine:
//!
//! | compose | spec |
//! |---|---|
//! | `image: nginx:1.25` (`registry/org/nginx:1.25` too) | `image: nginx:1.25`, the registry file `nginx.tar`, tag `1.25` ([`RegistryFile`] says how to make it) |
//! | `build` without `image` | `image: PROJECT-SERVICE`, as compose names the image it builds |
//! | `command` (a string is split as a shell would, without running one), `entrypoint` | `args` (see below) |
//! | `environment` (map or list; a bare name takes the variable's value now), `env_file` | `env`, the file's variables first |
//! | `ports` / `expose` | the first TCP container port is `proxyport`; publishing on the host is not carried over |
//! | `healthcheck` whose test is `curl`/`wget` of `http://localhost[:PORT]/PATH` | `healthcheck: /PATH` |
//! | `depends_on`, `links` | `link` |
//! | `mem_limit`, `deploy.resources.limits.memory` | `memory` |
//! | `cpus`, `deploy.resources.limits.cpus` | `cpus` |
//! | `restart: "no"` / `deploy.restart_policy.condition: none` | `duration: oneshot`; anything else is a daemon |
//!
//! `entrypoint`: Phoenix runs the image's own ENTRYPOINT followed by
//! `args` (or by the image's CMD when `args` is empty), so `command` maps
//! exactly, and `entrypoint` is carried as the start of `args`, which is
//! right for an image without an ENTRYPOINT of its own (a warning says so).
//!
//! `deploy.replicas` above 1 is reported, not expanded: Phoenix has no
//! replica count yet, and `name-1..N` copies would break every `link` and
//! `depends_on` that names the service.
//!
//! Everything else (volumes, networks, build, user, labels...) is listed in
//! [`Imported::not_carried`] with the reason. Keys starting with `x-` are
//! compose's extension fields, for anchors, and are skipped.

use std::collections::HashMap;

use super::tree::{self, Data, Node};
use super::{ImportError, Imported, Note, Problem, RegistryFile, sanitize_name};
use crate::spec::check_image_name;
use crate::spec::raw::{RawSpec, Size};

/// What the compose importer needs besides the file.
pub struct ComposeInput<'a> {
    /// The file as the user named it, for messages.
    pub file: &'a str,
    pub text: &'a str,
    /// The machine every service runs on.
    pub machine: &'a str,
    /// The project's name when the file does not give one (`name:`):
    /// compose uses the folder's name. It names the images `build` makes.
    pub project: &'a str,
    /// Variables for `${VAR}` and for `environment` entries without a
    /// value: the process environment, then the `.env` beside the file.
    pub vars: &'a dyn Fn(&str) -> Option<String>,
    /// Reads a file named by `env_file` (relative to the compose file's
    /// folder, or absolute); the error says why it cannot.
    pub read_file: &'a dyn Fn(&str) -> Result<String, String>,
}

/// Imports a compose file. Every problem of the file comes back at once.
pub fn compose(input: &ComposeInput<'_>) -> Result<Imported, ImportError> {
    let fail = |problems| ImportError {
        file: input.file.to_owned(),
        problems,
    };
    let (root, unset) = tree::read(input.text, input.vars).map_err(fail)?;
    let mut c = Converter {
        input,
        out: Imported::default(),
        problems: Vec::new(),
        files: Vec::new(),
    };
    for (name, line, path) in unset {
        c.out.warnings.push(Note {
            service: None,
            field: path,
            line: Some(line),
            reason: format!("variable {name} is not set; it became the empty string"),
        });
    }
    c.file(&root);
    if !c.problems.is_empty() {
        c.problems.sort_by_key(|p| p.line);
        return Err(fail(c.problems));
    }
    // In the file's order, for review beside it.
    c.out.not_carried.sort_by_key(|n| n.line);
    c.out.warnings.sort_by_key(|n| n.line);
    c.out.push = c
        .files
        .into_iter()
        .map(
            |Needed {
                 file,
                 references,
                 services,
                 build,
             }| {
            let how = match build {
                Some(service) => format!(
                    "docker compose build {service} && docker save {} -o {file} && phoenix push {file}",
                    references.join(" ")
                ),
                None => format!(
                    "docker save {} -o {file} && phoenix push {file}",
                    references.join(" ")
                ),
            };
            RegistryFile {
                file,
                references,
                services,
                how,
            }
            },
        )
        .collect();
    Ok(c.out)
}

/// Errors of a file read by lines: (line, reason).
pub type LineErrors = Vec<(usize, String)>;

/// Parses an env file (compose's `env_file`, or `.env`): `KEY=VALUE` lines,
/// `#` comments and blank lines; `export ` before a key is allowed; a
/// value in single quotes is taken as it is, one in double quotes or
/// unquoted is interpolated, and an unquoted one ends at ` #`. A line
/// with a key alone takes the variable's value from `vars`, if any.
/// Errors are (line, reason).
pub fn parse_env_file(
    text: &str,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, LineErrors> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (line, None),
        };
        if !is_env_name(key) {
            // A line without `=` is not repeated: it may be anything
            // (a password, a key), and errors end up in terminals and logs.
            errors.push((
                n,
                if value.is_some() {
                    format!("{key:?} is not a variable name")
                } else {
                    "expected KEY=VALUE, or a variable name alone; this line is neither".into()
                },
            ));
            continue;
        }
        let Some(value) = value else {
            if let Some(v) = vars(key) {
                out.push((key.to_owned(), v));
            }
            continue;
        };
        let value = if let Some(inner) = value.strip_prefix('\'') {
            match inner.strip_suffix('\'') {
                Some(v) => Ok(v.to_owned()),
                None => Err("the value's single quote is not closed".to_owned()),
            }
        } else if let Some(inner) = value.strip_prefix('"') {
            match inner.strip_suffix('"') {
                Some(v) => super::interpolate(&unescape(v), vars).map(|i| i.text),
                None => Err("the value's double quote is not closed".to_owned()),
            }
        } else {
            let v = value.split(" #").next().unwrap_or(value).trim_end();
            super::interpolate(v, vars).map(|i| i.text)
        };
        match value {
            Ok(v) => out.push((key.to_owned(), v)),
            Err(e) => errors.push((n, format!("{key}: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

fn is_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Variables Phoenix sets itself; their reason for not being carried.
fn reserved(key: &str) -> Option<&'static str> {
    match key {
        "PORT" => Some("PORT is set by Phoenix to the service's proxyport"),
        "PHOENIX_NAME" | "PHOENIX_IP" => Some("set by Phoenix for every service"),
        _ => None,
    }
}

/// Why a service key that Phoenix has no field for is not carried over.
fn service_key_reason(key: &str) -> &'static str {
    match key {
        "volumes" | "volumes_from" | "tmpfs" => {
            "Phoenix has no volumes: a service sees its image's files (keep state in a database \
             service, or outside the cluster)"
        }
        "build" => {
            "Phoenix does not build images: build it, `docker save` it and `phoenix push` it"
        }
        "networks" | "network_mode" => {
            "every service has its own address on the cluster's overlay; `link` says who may reach whom"
        }
        "container_name" | "hostname" | "domainname" => {
            "a service is reached by its name (from its links' /etc/hosts) and its address"
        }
        "user" => "the image's user runs the service (set USER in the image)",
        "working_dir" => "the image's working directory is used (set WORKDIR in the image)",
        "stop_grace_period" => "the minion's --stop-timeout-ms applies",
        "stop_signal" => "Phoenix stops a service with SIGTERM, then SIGKILL",
        "labels" | "annotations" => "Phoenix has no labels",
        "logging" => "the minion keeps each service's output (`phoenix logs`)",
        "extra_hosts" | "dns" | "dns_search" | "dns_opt" => {
            "Phoenix writes a service's /etc/hosts from its links; no DNS"
        }
        "privileged" | "cap_add" | "cap_drop" | "security_opt" | "devices" | "userns_mode" => {
            "Phoenix runs containers with its own fixed set of privileges"
        }
        "secrets" | "configs" => "Phoenix has no file secrets or configs for compose services",
        "mem_reservation" | "memswap_limit" | "mem_swappiness" | "cpu_shares" | "cpu_quota"
        | "cpu_period" | "cpuset" | "cpu_count" | "cpu_percent" | "pids_limit" | "ulimits"
        | "oom_kill_disable" | "oom_score_adj" | "blkio_config" | "shm_size" | "sysctls" => {
            "Phoenix limits only memory and cpus"
        }
        "profiles" => "every service of the file is imported, whatever its profiles",
        "external_links" => "a link names a service of the cluster; add it to `link` by hand",
        "extends" => "extends is not followed; copy the fields in",
        _ => "Phoenix has no equivalent",
    }
}

/// A registry file the services need.
struct Needed {
    file: String,
    references: Vec<String>,
    services: Vec<String>,
    /// The service whose `build` makes it.
    build: Option<String>,
}

/// One service's names: as the file has it, and as Phoenix has it.
struct Names {
    by_compose: HashMap<String, String>,
}

struct Converter<'a, 'i> {
    input: &'a ComposeInput<'i>,
    out: Imported,
    problems: Vec<Problem>,
    /// Registry files: (file, references, services, the service that builds it).
    files: Vec<Needed>,
}

impl Converter<'_, '_> {
    fn problem(&mut self, line: usize, service: Option<&str>, field: &str, reason: String) {
        let p = Problem::new(Some(line), Some(field), reason);
        self.problems.push(match service {
            Some(s) => p.of(s),
            None => p,
        });
    }

    fn dropped(
        &mut self,
        service: Option<&str>,
        field: &str,
        line: usize,
        reason: impl Into<String>,
    ) {
        self.out.not_carried.push(Note {
            service: service.map(str::to_owned),
            field: field.to_owned(),
            line: Some(line),
            reason: reason.into(),
        });
    }

    fn warn(&mut self, service: Option<&str>, field: &str, line: usize, reason: impl Into<String>) {
        self.out.warnings.push(Note {
            service: service.map(str::to_owned),
            field: field.to_owned(),
            line: Some(line),
            reason: reason.into(),
        });
    }

    fn file(&mut self, root: &Node) {
        let Data::Map(top) = &root.data else {
            self.problems.push(Problem::new(
                Some(root.line),
                None,
                format!(
                    "expected a compose file (a mapping with `services`), got {}",
                    root.describe()
                ),
            ));
            return;
        };
        let mut project = self.input.project.to_owned();
        let mut services = None;
        for (key, node) in top {
            match key.as_str() {
                "services" => services = Some(node),
                "name" => match node.scalar() {
                    Some(n) => project = n,
                    None => self.problem(
                        node.line,
                        None,
                        "name",
                        format!("expected the project's name, got {}", node.describe()),
                    ),
                },
                "version" => self.warn(
                    None,
                    "version",
                    node.line,
                    "ignored: the compose specification has made it obsolete",
                ),
                k if k.starts_with("x-") => {}
                "volumes" | "networks" | "secrets" | "configs" => {
                    let reason = service_key_reason(key);
                    self.dropped(None, key, node.line, reason);
                }
                "include" => self.dropped(
                    None,
                    key,
                    node.line,
                    "included files are not read: import each of them",
                ),
                _ => self.dropped(None, key, node.line, "not a compose top-level key"),
            }
        }
        let Some(services) = services else {
            self.problems.push(Problem::new(
                None,
                Some("services"),
                "the file has no `services`",
            ));
            return;
        };
        let entries = match &services.data {
            Data::Map(e) if !e.is_empty() => e,
            Data::Map(_) => {
                self.problem(
                    services.line,
                    None,
                    "services",
                    "the file defines no services".into(),
                );
                return;
            }
            _ => {
                self.problem(
                    services.line,
                    None,
                    "services",
                    format!(
                        "expected a mapping of services, got {}",
                        services.describe()
                    ),
                );
                return;
            }
        };
        let project = sanitize_name(&project).unwrap_or_else(|| "compose".to_owned());
        // Names first: links may point forward.
        let mut names = Names {
            by_compose: HashMap::new(),
        };
        let mut taken: HashMap<String, String> = HashMap::new();
        for (name, node) in entries {
            // Compose's own rule; a name outside it would also land in the
            // `docker compose build NAME` line printed for pasting.
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                self.problem(
                    node.line,
                    Some(name),
                    "services",
                    "a compose service's name is letters, digits, '.', '_' and '-'".into(),
                );
                continue;
            }
            let Some(phoenix) = sanitize_name(name) else {
                self.problem(
                    node.line,
                    Some(name),
                    "services",
                    "the name has no letter or digit to make a Phoenix name of".into(),
                );
                continue;
            };
            if let Some(other) = taken.get(&phoenix) {
                let reason = format!(
                    "services {other:?} and {name:?} both become {phoenix:?} as Phoenix names \
                     (lowercase a-z, 0-9 and '-'); rename one"
                );
                self.problem(node.line, Some(name), "services", reason);
                continue;
            }
            if phoenix != *name {
                self.warn(
                    Some(name),
                    "services",
                    node.line,
                    format!("named {phoenix:?}: a Phoenix name is lowercase a-z, 0-9 and '-'"),
                );
            }
            taken.insert(phoenix.clone(), name.clone());
            names.by_compose.insert(name.clone(), phoenix);
        }
        for (name, node) in entries {
            if let Some(phoenix) = names.by_compose.get(name).cloned() {
                self.service(name, &phoenix, node, &names, &project);
            }
        }
    }

    fn service(&mut self, name: &str, phoenix: &str, node: &Node, names: &Names, project: &str) {
        let Data::Map(fields) = &node.data else {
            self.problem(
                node.line,
                Some(name),
                "services",
                format!("expected the service's fields, got {}", node.describe()),
            );
            return;
        };
        let s = Some(name);
        let mut spec = RawSpec {
            machine: Some(self.input.machine.to_owned()),
            name: Some(phoenix.to_owned()),
            kind: Some("docker".to_owned()),
            ..RawSpec::default()
        };
        let get = |k: &str| node.get(k);

        // The image.
        match (get("image"), get("build")) {
            (Some(image), _) => match image.scalar() {
                Some(reference) => match image_ref(&reference) {
                    Ok((field, file, digest)) => {
                        if digest {
                            self.warn(
                                s,
                                "image",
                                image.line,
                                format!(
                                    "{reference:?}: a registry file is chosen by its tag; the digest is not checked"
                                ),
                            );
                        }
                        spec.image = Some(field);
                        self.needs(file, reference, phoenix, None);
                    }
                    Err(reason) => self.problem(image.line, s, "image", reason),
                },
                None => self.problem(
                    image.line,
                    s,
                    "image",
                    format!("expected an image reference, got {}", image.describe()),
                ),
            },
            (None, Some(build)) => {
                // Compose names what it builds PROJECT-SERVICE.
                let image = format!("{project}-{phoenix}");
                spec.image = Some(image.clone());
                self.needs(
                    format!("{image}.tar"),
                    image,
                    phoenix,
                    Some(name.to_owned()),
                );
                self.warn(
                    s,
                    "build",
                    build.line,
                    format!(
                        "no `image`: runs {project}-{phoenix}, the image `docker compose build` makes"
                    ),
                );
            }
            (None, None) => self.problem(
                node.line,
                s,
                "image",
                "a service needs `image` (or `build`)".into(),
            ),
        }

        // args: entrypoint, then command.
        let command = get("command").and_then(|n| self.words(n, name, "command"));
        let entrypoint = get("entrypoint").and_then(|n| self.words(n, name, "entrypoint"));
        match (entrypoint, command) {
            (Some((e, line)), command) => {
                if e.is_empty() {
                    self.dropped(
                        s,
                        "entrypoint",
                        line,
                        "an empty entrypoint (clearing the image's) cannot be expressed: \
                         Phoenix always runs the image's ENTRYPOINT",
                    );
                    spec.args = command.map(|c| c.0).unwrap_or_default();
                } else {
                    self.warn(
                        s,
                        "entrypoint",
                        line,
                        "carried as the start of `args`: Phoenix runs the image's own ENTRYPOINT \
                         before `args`, so this is right only for an image without one",
                    );
                    spec.args = e;
                    spec.args.extend(command.map(|c| c.0).unwrap_or_default());
                }
            }
            (None, Some((c, _))) => spec.args = c,
            (None, None) => {}
        }

        // env: env_file first, then environment.
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| match env
            .iter_mut()
            .find(|(ek, _)| *ek == k)
        {
            Some(e) => e.1 = v,
            None => env.push((k, v)),
        };
        if let Some(files) = get("env_file") {
            for (k, v) in self.env_files(files, name) {
                set(&mut env, k, v);
            }
        }
        if let Some(environment) = get("environment") {
            for (k, v) in self.environment(environment, name) {
                set(&mut env, k, v);
            }
        }
        let mut port_from_env = None;
        env.retain(|(k, v)| match reserved(k) {
            Some(reason) => {
                if k == "PORT" {
                    port_from_env = Some(v.clone());
                }
                let line = get("environment")
                    .or(get("env_file"))
                    .map_or(node.line, |n| n.line);
                self.dropped(s, &format!("environment.{k}"), line, reason);
                false
            }
            None => true,
        });
        spec.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();

        // proxyport: ports, expose, then PORT.
        if let Some(ports) = get("ports") {
            spec.proxyport = self.ports(ports, name);
        }
        if let Some(expose) = get("expose") {
            let first = self.expose(expose, name);
            if spec.proxyport.is_none() && first.is_some() {
                spec.proxyport = first;
                self.warn(
                    s,
                    "expose",
                    expose.line,
                    "the first exposed port is proxyport; every port of a service is reachable at its address",
                );
            } else {
                self.warn(
                    s,
                    "expose",
                    expose.line,
                    "nothing to carry: every port of a service is reachable at its address",
                );
            }
        }
        if let Some(p) = port_from_env.as_deref().and_then(|p| p.parse::<u16>().ok())
            && p != 0
            && spec.proxyport.is_none()
        {
            spec.proxyport = Some(p);
            let line = get("environment").map_or(node.line, |n| n.line);
            self.warn(
                s,
                "environment.PORT",
                line,
                format!("proxyport is {p}, from PORT; Phoenix sets PORT to it"),
            );
        }

        if let Some(h) = get("healthcheck") {
            spec.healthcheck = self.healthcheck(h, name, &mut spec.proxyport);
        }

        // link: depends_on and links.
        let mut link: Vec<String> = Vec::new();
        for (field, n) in [("depends_on", get("depends_on")), ("links", get("links"))] {
            let Some(n) = n else { continue };
            for target in self.links(n, name, field) {
                match names.by_compose.get(&target) {
                    Some(p) if !link.contains(p) => link.push(p.clone()),
                    Some(_) => {}
                    None => self.problem(
                        n.line,
                        s,
                        field,
                        format!("{target:?} is not a service of this file"),
                    ),
                }
            }
        }
        spec.link = link;

        // Limits.
        let limits = get("deploy")
            .and_then(|d| d.get("resources"))
            .and_then(|r| r.get("limits"));
        let memory = get("mem_limit").map(|n| (n, "mem_limit")).or_else(|| {
            limits
                .and_then(|l| l.get("memory"))
                .map(|n| (n, "deploy.resources.limits.memory"))
        });
        if let Some((n, field)) = memory {
            match n.scalar().as_deref().and_then(compose_size) {
                Some(b) => spec.memory = Some(size_text(b)),
                None => self.problem(
                    n.line,
                    s,
                    field,
                    format!("expected a size like 512m or 1g, got {}", n.describe()),
                ),
            }
        }
        let cpus = get("cpus").map(|n| (n, "cpus")).or_else(|| {
            limits
                .and_then(|l| l.get("cpus"))
                .map(|n| (n, "deploy.resources.limits.cpus"))
        });
        if let Some((n, field)) = cpus {
            match n.scalar().and_then(|c| c.trim().parse::<f64>().ok()) {
                Some(c) if c > 0.0 => spec.cpus = Some(c),
                // 0 is compose's "no limit".
                Some(_) => {}
                None => self.problem(
                    n.line,
                    s,
                    field,
                    format!("expected a number of cpus, got {}", n.describe()),
                ),
            }
        }

        // Restart policy.
        if let Some(r) = get("restart") {
            spec.duration = self.restart(r, name, "restart");
        }
        if let Some(deploy) = get("deploy") {
            self.deploy(deploy, name, &mut spec);
        }
        if let Some(scale) = get("scale") {
            self.replicas(scale, name, "scale");
        }

        // The rest.
        for (key, n) in fields {
            let handled = [
                "image",
                "command",
                "entrypoint",
                "environment",
                "env_file",
                "ports",
                "expose",
                "healthcheck",
                "depends_on",
                "links",
                "mem_limit",
                "cpus",
                "restart",
                "deploy",
                "scale",
            ];
            if handled.contains(&key.as_str()) || key.starts_with("x-") {
                continue;
            }
            if key == "build" && get("image").is_some() {
                self.dropped(
                    s,
                    key,
                    n.line,
                    "the image is taken from `image`; Phoenix does not build it",
                );
                continue;
            }
            let reason = service_key_reason(key);
            self.dropped(s, key, n.line, reason);
        }
        self.out.specs.push(spec);
        self.out.lines.push(node.line);
    }

    /// Records that `service` runs `reference`, from registry file `file`.
    fn needs(&mut self, file: String, reference: String, service: &str, build: Option<String>) {
        match self.files.iter_mut().find(|f| f.file == file) {
            Some(f) => {
                if !f.references.contains(&reference) {
                    f.references.push(reference);
                }
                f.services.push(service.to_owned());
            }
            None => self.files.push(Needed {
                file,
                references: vec![reference],
                services: vec![service.to_owned()],
                build,
            }),
        }
    }

    /// A command or entrypoint: a list of words, or a string split as a
    /// shell would (quotes and backslashes; nothing is expanded).
    fn words(&mut self, n: &Node, service: &str, field: &str) -> Option<(Vec<String>, usize)> {
        match &n.data {
            Data::Null => None,
            Data::Str(s) => match shlex::split(s) {
                Some(words) => Some((words, n.line)),
                None => {
                    self.problem(
                        n.line,
                        Some(service),
                        field,
                        format!("{s:?} cannot be split into words: a quote is not closed"),
                    );
                    None
                }
            },
            Data::Seq(items) => {
                let mut words = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.scalar() {
                        Some(w) => words.push(w),
                        None => self.problem(
                            item.line,
                            Some(service),
                            &format!("{field}[{i}]"),
                            format!("expected a word, got {}", item.describe()),
                        ),
                    }
                }
                Some((words, n.line))
            }
            _ => {
                self.problem(
                    n.line,
                    Some(service),
                    field,
                    format!("expected a string or a list of words, got {}", n.describe()),
                );
                None
            }
        }
    }

    fn environment(&mut self, n: &Node, service: &str) -> Vec<(String, String)> {
        let s = Some(service);
        let mut out = Vec::new();
        let mut entry = |this: &mut Self,
                         key: &str,
                         value: Option<String>,
                         line: usize,
                         field: &str| {
            if !is_env_name(key) {
                this.dropped(
                    s,
                    field,
                    line,
                    format!("{key:?}: a Phoenix variable name is letters, digits and '_', not starting with a digit"),
                );
                return;
            }
            match value.or_else(|| (this.input.vars)(key)) {
                Some(v) => out.push((key.to_owned(), v)),
                None => this.dropped(
                    s,
                    field,
                    line,
                    format!("{key} has no value here and is not set now; left out"),
                ),
            }
        };
        match &n.data {
            Data::Map(entries) => {
                for (k, v) in entries {
                    let field = format!("environment.{k}");
                    match &v.data {
                        Data::Null => entry(self, k, None, v.line, &field),
                        Data::Seq(_) | Data::Map(_) => self.problem(
                            v.line,
                            s,
                            &field,
                            format!("expected a value, got {}", v.describe()),
                        ),
                        _ => entry(self, k, v.scalar(), v.line, &field),
                    }
                }
            }
            Data::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let field = format!("environment[{i}]");
                    match &item.data {
                        Data::Str(text) => match text.split_once('=') {
                            Some((k, v)) => entry(self, k, Some(v.to_owned()), item.line, &field),
                            None => entry(self, text, None, item.line, &field),
                        },
                        _ => self.problem(
                            item.line,
                            s,
                            &field,
                            format!("expected KEY=VALUE, got {}", item.describe()),
                        ),
                    }
                }
            }
            Data::Null => {}
            _ => self.problem(
                n.line,
                s,
                "environment",
                format!("expected a mapping or a list, got {}", n.describe()),
            ),
        }
        out
    }

    fn env_files(&mut self, n: &Node, service: &str) -> Vec<(String, String)> {
        let s = Some(service);
        let items: Vec<&Node> = match &n.data {
            Data::Seq(items) => items.iter().collect(),
            _ => vec![n],
        };
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let field = if matches!(n.data, Data::Seq(_)) {
                format!("env_file[{i}]")
            } else {
                "env_file".to_owned()
            };
            let (path, required) = match &item.data {
                Data::Str(p) => (p.clone(), true),
                Data::Map(_) => {
                    let path = item.get("path").and_then(Node::scalar);
                    let required = !matches!(
                        item.get("required").map(|r| &r.data),
                        Some(Data::Bool(false))
                    );
                    match path {
                        Some(p) => (p, required),
                        None => {
                            self.problem(
                                item.line,
                                s,
                                &field,
                                "an env_file entry needs `path`".into(),
                            );
                            continue;
                        }
                    }
                }
                _ => {
                    self.problem(
                        item.line,
                        s,
                        &field,
                        format!("expected a file name, got {}", item.describe()),
                    );
                    continue;
                }
            };
            let text = match (self.input.read_file)(&path) {
                Ok(t) => t,
                Err(e) if required => {
                    self.problem(item.line, s, &field, format!("cannot read {path}: {e}"));
                    continue;
                }
                Err(e) => {
                    self.warn(
                        s,
                        &field,
                        item.line,
                        format!("{path} is optional and cannot be read ({e}); skipped"),
                    );
                    continue;
                }
            };
            match parse_env_file(&text, self.input.vars) {
                Ok(vars) => {
                    self.warn(
                        s,
                        &field,
                        item.line,
                        format!(
                            "the {} variables of {path} are written into `env`; the file is not read again",
                            vars.len()
                        ),
                    );
                    out.extend(vars);
                }
                Err(errors) => {
                    for (line, reason) in errors {
                        self.problem(
                            item.line,
                            s,
                            &field,
                            format!("{path} line {line}: {reason}"),
                        );
                    }
                }
            }
        }
        out
    }

    /// `ports`: the first TCP container port becomes proxyport.
    fn ports(&mut self, n: &Node, service: &str) -> Option<u16> {
        let s = Some(service);
        let Data::Seq(items) = &n.data else {
            self.problem(
                n.line,
                s,
                "ports",
                format!("expected a list, got {}", n.describe()),
            );
            return None;
        };
        let mut proxyport = None;
        for (i, item) in items.iter().enumerate() {
            let field = format!("ports[{i}]");
            let port = match &item.data {
                Data::Map(_) => {
                    let target = item.get("target").and_then(Node::scalar);
                    let published = item.get("published").and_then(Node::scalar);
                    let protocol = item
                        .get("protocol")
                        .and_then(Node::scalar)
                        .unwrap_or_else(|| "tcp".into());
                    match target.as_deref().map(port_range) {
                        Some(Ok((p, range))) => Ok(Port {
                            container: p,
                            range,
                            published: published.filter(|p| !p.is_empty()),
                            protocol,
                        }),
                        Some(Err(e)) => Err(e),
                        None => Err("a port mapping needs `target`".to_owned()),
                    }
                }
                _ => match item.scalar() {
                    Some(text) => short_port(&text),
                    None => Err(format!("expected a port, got {}", item.describe())),
                },
            };
            let port = match port {
                Ok(p) => p,
                Err(reason) => {
                    self.problem(item.line, s, &field, reason);
                    continue;
                }
            };
            if let Some(published) = &port.published {
                self.dropped(
                    s,
                    &field,
                    item.line,
                    format!(
                        "publishing on the host ({published}) is not carried over: a service is \
                         reached at its own address on the overlay; for public HTTP set `proxyname`"
                    ),
                );
            }
            if port.range {
                self.dropped(
                    s,
                    &field,
                    item.line,
                    format!(
                        "a range: only its first port, {}, is considered; every port is reachable at the service's address",
                        port.container
                    ),
                );
            }
            if port.protocol != "tcp" {
                self.dropped(
                    s,
                    &field,
                    item.line,
                    format!(
                        "{} port {}: reachable at the service's address, but not a proxy port (the proxy speaks HTTP)",
                        port.protocol, port.container
                    ),
                );
            } else if proxyport.is_none() {
                proxyport = Some(port.container);
            } else {
                self.dropped(
                    s,
                    &field,
                    item.line,
                    format!(
                        "port {} is reachable at the service's address, but only one port (the first, {}) is `proxyport`",
                        port.container,
                        proxyport.unwrap_or_default()
                    ),
                );
            }
        }
        proxyport
    }

    fn expose(&mut self, n: &Node, service: &str) -> Option<u16> {
        let Data::Seq(items) = &n.data else {
            self.problem(
                n.line,
                Some(service),
                "expose",
                format!("expected a list, got {}", n.describe()),
            );
            return None;
        };
        let mut first = None;
        for (i, item) in items.iter().enumerate() {
            let text = item.scalar().unwrap_or_default();
            let (text, proto) = text.split_once('/').unwrap_or((&text, "tcp"));
            match port_range(text) {
                Ok((p, _)) if proto == "tcp" => {
                    first = first.or(Some(p));
                }
                Ok(_) => {}
                Err(e) => self.problem(item.line, Some(service), &format!("expose[{i}]"), e),
            }
        }
        first
    }

    /// A healthcheck whose test fetches an HTTP URL on the service itself
    /// becomes `healthcheck` (its path); anything else is reported.
    fn healthcheck(
        &mut self,
        n: &Node,
        service: &str,
        proxyport: &mut Option<u16>,
    ) -> Option<String> {
        let s = Some(service);
        if matches!(n.get("disable").map(|d| &d.data), Some(Data::Bool(true))) {
            return None;
        }
        if let Data::Map(entries) = &n.data {
            // The timings in one note: they have one reason.
            let timings: Vec<&(String, Node)> = entries
                .iter()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "interval" | "timeout" | "retries" | "start_period" | "start_interval"
                    )
                })
                .collect();
            if let Some((_, first)) = timings.first() {
                let names: Vec<&str> = timings.iter().map(|(k, _)| k.as_str()).collect();
                self.dropped(
                    s,
                    "healthcheck",
                    first.line,
                    format!(
                        "{}: the minion's --health-interval-ms, --health-timeout-ms and \
                         --health-grace-ms apply to every service",
                        names.join(", ")
                    ),
                );
            }
            for (k, v) in entries {
                if !matches!(
                    k.as_str(),
                    "test"
                        | "disable"
                        | "interval"
                        | "timeout"
                        | "retries"
                        | "start_period"
                        | "start_interval"
                ) {
                    self.dropped(
                        s,
                        &format!("healthcheck.{k}"),
                        v.line,
                        "not a healthcheck field Phoenix knows",
                    );
                }
            }
        }
        let Some(test) = n.get("test") else {
            self.dropped(s, "healthcheck", n.line, "no `test`: nothing to check");
            return None;
        };
        let words: Vec<String> = match &test.data {
            Data::Str(cmd) => shlex::split(cmd)
                .unwrap_or_else(|| cmd.split_whitespace().map(str::to_owned).collect()),
            Data::Seq(items) => {
                let items: Vec<String> = items.iter().filter_map(Node::scalar).collect();
                match items.first().map(String::as_str) {
                    Some("NONE") => return None,
                    Some("CMD") => items[1..].to_vec(),
                    Some("CMD-SHELL") => {
                        let cmd = items[1..].join(" ");
                        shlex::split(&cmd)
                            .unwrap_or_else(|| cmd.split_whitespace().map(str::to_owned).collect())
                    }
                    _ => items,
                }
            }
            _ => Vec::new(),
        };
        let fetches = words.iter().any(|w| {
            let base = w.rsplit('/').next().unwrap_or(w);
            base == "curl" || base == "wget"
        });
        // curl takes a URL without its scheme (`localhost:9200/health`).
        let local = ["localhost", "127.0.0.1", "[::1]", "0.0.0.0"];
        let url = words.iter().find_map(|w| {
            if w.starts_with("http://") || w.starts_with("https://") {
                Some(w.clone())
            } else {
                local
                    .iter()
                    .any(|h| {
                        w.strip_prefix(h)
                            .is_some_and(|r| r.is_empty() || r.starts_with([':', '/']))
                    })
                    .then(|| format!("http://{w}"))
            }
        });
        let url = url.as_ref();
        let shown: String = words.join(" ");
        let (Some(url), true) = (url, fetches) else {
            self.dropped(
                s,
                "healthcheck.test",
                test.line,
                format!(
                    "{shown:?} is not an HTTP fetch (curl or wget of a URL): Phoenix checks health by GET of a path on proxyport"
                ),
            );
            return None;
        };
        let Some((scheme, host, port, path)) = split_url(url) else {
            self.dropped(
                s,
                "healthcheck.test",
                test.line,
                format!("{url:?} is not a URL Phoenix can check"),
            );
            return None;
        };
        if scheme == "https" {
            self.dropped(
                s,
                "healthcheck.test",
                test.line,
                format!("{url:?}: Phoenix checks health over plain HTTP"),
            );
            return None;
        }
        if !matches!(
            host.as_str(),
            "localhost" | "127.0.0.1" | "[::1]" | "0.0.0.0" | "[::]"
        ) {
            self.dropped(
                s,
                "healthcheck.test",
                test.line,
                format!("{url:?} checks another host, {host}; Phoenix checks the service itself"),
            );
            return None;
        }
        match *proxyport {
            Some(p) if p != port => {
                self.dropped(
                    s,
                    "healthcheck.test",
                    test.line,
                    format!("{url:?} is on port {port}, but Phoenix checks proxyport, {p}"),
                );
                return None;
            }
            Some(_) => {}
            None => {
                *proxyport = Some(port);
                self.warn(
                    s,
                    "healthcheck.test",
                    test.line,
                    format!("proxyport is {port}, the port the healthcheck fetches"),
                );
            }
        }
        Some(path)
    }

    fn links(&mut self, n: &Node, service: &str, field: &str) -> Vec<String> {
        let s = Some(service);
        match &n.data {
            Data::Seq(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let Some(text) = item.scalar() else {
                        self.problem(
                            item.line,
                            s,
                            &format!("{field}[{i}]"),
                            format!("expected a service name, got {}", item.describe()),
                        );
                        continue;
                    };
                    let target = match text.split_once(':') {
                        Some((t, alias)) if field == "links" => {
                            if alias != t {
                                self.dropped(
                                    s,
                                    &format!("{field}[{i}]"),
                                    item.line,
                                    format!("the alias {alias:?}: reach the service as {t:?}"),
                                );
                            }
                            t.to_owned()
                        }
                        _ => text,
                    };
                    out.push(target);
                }
                if field == "depends_on" && !out.is_empty() {
                    self.dropped(
                        s,
                        field,
                        n.line,
                        "the start order: Phoenix starts every service at once (each became a `link`)",
                    );
                }
                out
            }
            Data::Map(entries) => {
                let mut conditions = Vec::new();
                for (k, v) in entries {
                    if let Some(c) = v.get("condition").and_then(Node::scalar) {
                        conditions.push(format!("{k}: {c}"));
                    }
                }
                let what = if conditions.is_empty() {
                    String::new()
                } else {
                    format!(" and the conditions ({})", conditions.join(", "))
                };
                self.dropped(
                    s,
                    field,
                    n.line,
                    format!("the start order{what}: Phoenix starts every service at once (each became a `link`)"),
                );
                entries.iter().map(|(k, _)| k.clone()).collect()
            }
            _ => {
                self.problem(
                    n.line,
                    s,
                    field,
                    format!("expected a list of services, got {}", n.describe()),
                );
                Vec::new()
            }
        }
    }

    fn restart(&mut self, n: &Node, service: &str, field: &str) -> Option<String> {
        let policy = n.scalar().unwrap_or_default();
        let (name, _) = policy.split_once(':').unwrap_or((&policy, ""));
        match name {
            "no" | "none" => Some("oneshot".to_owned()),
            "always" | "unless-stopped" | "any" => None,
            "on-failure" => {
                self.dropped(
                    Some(service),
                    field,
                    n.line,
                    format!("{policy:?}: a daemon is restarted whatever its exit status, and without a retry limit"),
                );
                None
            }
            _ => {
                self.problem(
                    n.line,
                    Some(service),
                    field,
                    format!("{policy:?} is not a restart policy (no, always, on-failure, unless-stopped)"),
                );
                None
            }
        }
    }

    fn replicas(&mut self, n: &Node, service: &str, field: &str) {
        match n.scalar().and_then(|r| r.parse::<u64>().ok()) {
            Some(1) => {}
            Some(r) => self.dropped(
                Some(service),
                field,
                n.line,
                format!(
                    "{r} replicas: Phoenix has no replica count yet; one service is imported \
                     (copy it under other names, with the same proxyname, to run more)"
                ),
            ),
            None => self.problem(
                n.line,
                Some(service),
                field,
                format!("expected a number, got {}", n.describe()),
            ),
        }
    }

    fn deploy(&mut self, n: &Node, service: &str, spec: &mut RawSpec) {
        let s = Some(service);
        let Data::Map(entries) = &n.data else {
            self.problem(
                n.line,
                s,
                "deploy",
                format!("expected a mapping, got {}", n.describe()),
            );
            return;
        };
        for (k, v) in entries {
            let field = format!("deploy.{k}");
            match k.as_str() {
                "replicas" => self.replicas(v, service, &field),
                "resources" => {
                    if let Data::Map(res) = &v.data {
                        for (rk, rv) in res {
                            let rfield = format!("{field}.{rk}");
                            if rk == "limits" {
                                if let Data::Map(lim) = &rv.data {
                                    for (lk, lv) in lim {
                                        if !matches!(lk.as_str(), "memory" | "cpus") {
                                            self.dropped(
                                                s,
                                                &format!("{rfield}.{lk}"),
                                                lv.line,
                                                "Phoenix limits only memory and cpus",
                                            );
                                        }
                                    }
                                }
                            } else {
                                self.dropped(
                                    s,
                                    &rfield,
                                    rv.line,
                                    "Phoenix has limits, not reservations",
                                );
                            }
                        }
                    }
                }
                "restart_policy" => {
                    if let Some(c) = v.get("condition") {
                        let d = self.restart(c, service, &format!("{field}.condition"));
                        if spec.duration.is_none() {
                            spec.duration = d;
                        }
                    }
                    if let Data::Map(rp) = &v.data {
                        for (rk, rv) in rp {
                            if rk != "condition" {
                                self.dropped(
                                    s,
                                    &format!("{field}.{rk}"),
                                    rv.line,
                                    "the minion's restart backoff applies",
                                );
                            }
                        }
                    }
                }
                "placement" => self.dropped(
                    s,
                    &field,
                    v.line,
                    "every service runs on the --machine given",
                ),
                "mode" if v.scalar().as_deref() == Some("replicated") => {}
                _ => self.dropped(s, &field, v.line, "Phoenix has no equivalent"),
            }
        }
    }
}

/// A parsed `ports` entry.
struct Port {
    container: u16,
    range: bool,
    published: Option<String>,
    protocol: String,
}

/// Compose's short port syntax: `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]`,
/// ports or ranges (`8000-8010`), an IPv6 host address in brackets.
fn short_port(text: &str) -> Result<Port, String> {
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((r, p)) => (r, p.to_owned()),
        None => (text, "tcp".to_owned()),
    };
    let (published, container) = match rest.rsplit_once(':') {
        Some((host, c)) => (Some(host.to_owned()), c),
        None => (None, rest),
    };
    let (container, range) = port_range(container).map_err(|e| {
        if container == text {
            e
        } else {
            format!("{text:?}: {e}")
        }
    })?;
    Ok(Port {
        container,
        range,
        published,
        protocol,
    })
}

/// A port or a range's first port; whether it was a range.
fn port_range(text: &str) -> Result<(u16, bool), String> {
    let (first, range) = match text.split_once('-') {
        Some((a, _)) => (a, true),
        None => (text, false),
    };
    match first.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok((p, range)),
        _ => Err(format!("{text:?} is not a port (1 to 65535)")),
    }
}

/// `http://host[:port]/path?query` → (scheme, host, port, path with query).
fn split_url(url: &str) -> Option<(String, String, u16, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path
    };
    let authority = authority.rsplit('@').next()?;
    let (host, port) = if let Some(end) = authority.find(']') {
        let host = &authority[..=end];
        let port = authority[end + 1..].strip_prefix(':');
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None if scheme == "https" => 443,
        None => 80,
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some((scheme.to_owned(), host.to_owned(), port, path))
}

/// A registry reference → (the spec's image, the registry file, whether a
/// digest was dropped). The repository's last part names the file.
/// Why `reference` is no image reference by its characters: only
/// letters, digits and `. _ - / : @ + =` make one (docker's grammar), so
/// the `docker save` lines printed for the user to paste hold nothing a
/// shell would run (`$(...)`, `;`, backquotes, spaces).
pub(super) fn reference_chars(reference: &str) -> Result<(), String> {
    match reference
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-/:@+=".contains(*c)))
    {
        Some(c) => Err(format!(
            "{reference:?} is not an image reference: it holds {c:?}; only letters, digits \
             and . _ - / : @ + = make one"
        )),
        None => Ok(()),
    }
}

fn image_ref(reference: &str) -> Result<(String, String, bool), String> {
    reference_chars(reference)?;
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, _)) => (n, true),
        None => (reference, false),
    };
    let last = name_tag.rsplit('/').next().unwrap_or(name_tag);
    let (name, tag) = match last.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (last, None),
    };
    let file = format!("{name}.tar");
    if name.is_empty() || tag.is_some_and(str::is_empty) {
        return Err(format!("{reference:?} is not an image reference"));
    }
    check_image_name(&file).map_err(|e| format!("{reference:?}: {e}"))?;
    let image = match tag {
        Some(t) => format!("{name}:{t}"),
        None => name.to_owned(),
    };
    Ok((image, file, digest))
}

/// A compose size (`512m`, `1g`, `1.5gb`, `100000` bytes) in bytes:
/// binary multiples, as docker reads them.
fn compose_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let unit = unit.trim();
    let unit = unit.strip_suffix('b').unwrap_or(unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    let bytes = n * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Bytes as Phoenix's size text where it is whole (`512M`), else a number.
fn size_text(b: u64) -> Size {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if b != 0 && b.is_multiple_of(1 << shift) {
            return Size::Text(format!("{}{unit}", b >> shift));
        }
    }
    Size::Bytes(b)
}

#[cfg(test)]
mod tests;
