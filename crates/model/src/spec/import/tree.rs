//! A YAML document as a tree that keeps every node's line and the order of
//! mappings (services are imported in the file's order), with YAML's
//! merge keys (`<<: *defaults`, which compose files use with `x-`
//! anchors) applied, and every string scalar interpolated.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::Problem;
use super::interpolate::interpolate;

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Data {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Node {
    /// 1-based.
    pub line: usize,
    pub data: Data,
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.data {
            Data::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A scalar as text (numbers and booleans as YAML writes them).
    pub fn scalar(&self) -> Option<String> {
        match &self.data {
            Data::Str(s) => Some(s.clone()),
            Data::Int(i) => Some(i.to_string()),
            Data::Float(f) => Some(f.to_string()),
            Data::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// What kind of node this is, for error messages.
    pub fn describe(&self) -> String {
        match &self.data {
            Data::Null => "null".into(),
            Data::Bool(b) => format!("a boolean {b}"),
            Data::Int(i) => format!("a number {i}"),
            Data::Float(f) => format!("a number {f}"),
            Data::Str(s) if s.len() <= 40 => format!("a string {s:?}"),
            Data::Str(_) => "a string".into(),
            Data::Seq(_) => "a list".into(),
            Data::Map(_) => "a mapping".into(),
        }
    }
}

/// Variables used without a value, with the line and path they were at.
pub(super) type Unset = Vec<(String, usize, String)>;

/// Reads `text` as one YAML document.
pub(super) fn read(
    text: &str,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<(Node, Unset), Vec<Problem>> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        vec![Problem::new(
            Some(e.marker().line()),
            None,
            format!("not valid YAML: {}", e.info()),
        )]
    })?;
    let mut docs = docs.into_iter();
    let Some(doc) = docs.next() else {
        return Err(vec![Problem::new(
            None,
            None,
            "the file holds no YAML document",
        )]);
    };
    if let Some(second) = docs.next() {
        return Err(vec![Problem::new(
            Some(second.span.start.line()),
            None,
            "the file holds more than one YAML document (`---`)",
        )]);
    }
    let mut reader = Reader {
        vars,
        problems: Vec::new(),
        unset: Vec::new(),
    };
    let node = reader.node(&doc, "");
    if reader.problems.is_empty() {
        Ok((node, reader.unset))
    } else {
        Err(reader.problems)
    }
}

struct Reader<'v> {
    vars: &'v dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
    unset: Unset,
}

impl Reader<'_> {
    fn node(&mut self, node: &MarkedYaml<'_>, path: &str) -> Node {
        let line = node.span.start.line();
        let data = match &node.data {
            YamlData::Value(scalar) => self.scalar(scalar, line, path),
            YamlData::Representation(s, _, _) => self.string(s, line, path),
            YamlData::Sequence(items) => Data::Seq(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.node(item, &format!("{path}[{i}]")))
                    .collect(),
            ),
            YamlData::Mapping(entries) => {
                let mut out: Vec<(String, Node)> = Vec::new();
                let mut merged: Vec<(String, Node)> = Vec::new();
                for (key, value) in entries {
                    let key_line = key.span.start.line();
                    let name = match &key.data {
                        YamlData::Value(Scalar::String(s)) => s.to_string(),
                        YamlData::Representation(s, _, _) => s.to_string(),
                        YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                        YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                        _ => {
                            self.problems.push(Problem::new(
                                Some(key_line),
                                (!path.is_empty()).then_some(path),
                                "a key that is not a string",
                            ));
                            continue;
                        }
                    };
                    let p = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    let v = self.node(value, &p);
                    if name == "<<" {
                        // The merge key: the mapping (or each mapping of a
                        // list, the first winning) under this one's keys.
                        let sources = match v.data {
                            Data::Map(m) => vec![m],
                            Data::Seq(items) => items
                                .into_iter()
                                .filter_map(|n| match n.data {
                                    Data::Map(m) => Some(m),
                                    _ => None,
                                })
                                .collect(),
                            _ => {
                                self.problems.push(Problem::new(
                                    Some(key_line),
                                    Some(&p),
                                    "a merge key (`<<`) takes a mapping or a list of them",
                                ));
                                Vec::new()
                            }
                        };
                        for m in sources {
                            for (k, v) in m {
                                if !merged.iter().any(|(mk, _)| *mk == k) {
                                    merged.push((k, v));
                                }
                            }
                        }
                        continue;
                    }
                    if out.iter().any(|(k, _)| *k == name) {
                        self.problems.push(Problem::new(
                            Some(key_line),
                            Some(&p),
                            "the key is given twice",
                        ));
                        continue;
                    }
                    // The key's line, as errors about a field point there.
                    out.push((
                        name,
                        Node {
                            line: if matches!(v.data, Data::Map(_) | Data::Seq(_)) {
                                key_line
                            } else {
                                v.line
                            },
                            data: v.data,
                        },
                    ));
                }
                for (k, v) in merged {
                    if !out.iter().any(|(ok, _)| *ok == k) {
                        out.push((k, v));
                    }
                }
                Data::Map(out)
            }
            YamlData::Tagged(tag, inner) => {
                self.problems.push(Problem::new(
                    Some(line),
                    (!path.is_empty()).then_some(path),
                    format!("YAML tags ({tag}) are not supported; write the plain value"),
                ));
                return self.node(inner, path);
            }
            YamlData::Alias(_) => {
                self.problems.push(Problem::new(
                    Some(line),
                    (!path.is_empty()).then_some(path),
                    "an alias (`*name`) to no anchor",
                ));
                Data::Null
            }
            YamlData::BadValue => {
                self.problems.push(Problem::new(
                    Some(line),
                    (!path.is_empty()).then_some(path),
                    "a value that cannot be read",
                ));
                Data::Null
            }
        };
        Node { line, data }
    }

    fn scalar(&mut self, scalar: &Scalar<'_>, line: usize, path: &str) -> Data {
        match scalar {
            Scalar::Null => Data::Null,
            Scalar::Boolean(b) => Data::Bool(*b),
            Scalar::Integer(i) => Data::Int(*i),
            Scalar::FloatingPoint(f) => Data::Float(f.into_inner()),
            Scalar::String(s) => self.string(s, line, path),
        }
    }

    fn string(&mut self, s: &str, line: usize, path: &str) -> Data {
        match interpolate(s, self.vars) {
            Ok(i) => {
                for name in i.unset {
                    self.unset.push((name, line, path.to_owned()));
                }
                Data::Str(i.text)
            }
            Err(reason) => {
                self.problems.push(Problem::new(
                    Some(line),
                    (!path.is_empty()).then_some(path),
                    reason,
                ));
                Data::Str(s.to_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_vars(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn merge_keys_anchors_order_and_lines() {
        let text = "x-common: &common\n  restart: always\n  environment:\n    A: 1\n\
                    services:\n  zeta:\n    <<: *common\n    image: z\n  alpha:\n    <<: [*common]\n    restart: \"no\"\n";
        let (root, unset) = read(text, &no_vars).unwrap();
        assert!(unset.is_empty());
        let services = root.get("services").unwrap();
        let Data::Map(entries) = &services.data else {
            panic!("{services:?}")
        };
        let names: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
        let zeta = services.get("zeta").unwrap();
        assert_eq!(
            zeta.get("restart").unwrap().data,
            Data::Str("always".into())
        );
        assert_eq!(zeta.get("image").unwrap().line, 8);
        let alpha = services.get("alpha").unwrap();
        assert_eq!(alpha.get("restart").unwrap().data, Data::Str("no".into()));
        assert_eq!(
            alpha.get("environment").unwrap().get("A").unwrap().data,
            Data::Int(1)
        );
    }

    #[test]
    fn strings_are_interpolated_and_problems_have_lines() {
        let vars = |n: &str| (n == "TAG").then(|| "2".to_owned());
        let (root, unset) = read("a: x:${TAG}\nb: $NOPE\n", &vars).unwrap();
        assert_eq!(root.get("a").unwrap().data, Data::Str("x:2".into()));
        assert_eq!(unset, [("NOPE".to_owned(), 2, "b".to_owned())]);
        let e = read("a: 1\nb:\n  c: ${X:?give X}\n", &no_vars).unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "line 3: field `b.c`: variable X is required: give X"
        );
        let e = read("a: 1\na: 2\n", &no_vars).unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "line 2: not valid YAML: duplicated key in mapping"
        );
        let e = read("a: [1\n", &no_vars).unwrap_err();
        assert!(e[0].to_string().contains("not valid YAML"), "{}", e[0]);
    }
}
