//! YAML spec files: the format step for `.yaml` and `.yml`.
//!
//! A YAML document becomes the same document tree as JSON text (a
//! `serde_json::Value`), so the raw-spec and validation steps, and their
//! messages, are the same for both formats. YAML 1.2's core schema decides
//! what a plain scalar is (`yes` and `no` stay strings, `080` is a
//! number), as `saphyr` resolves it. Beside the tree, [`Lines`] keeps the
//! line of every spec and field, so each error can say where it is.

use std::collections::HashMap;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Number, Value};

use super::SpecError;

/// The line (1-based) of each node of a document, by its path: `[0]` for
/// the first spec of an array, `[0].env[2]` or `env[2]` (a single spec)
/// for a field.
#[derive(Debug, Default)]
pub(super) struct Lines(HashMap<String, usize>);

impl Lines {
    /// The line of a field of a spec (or of the spec, for no field):
    /// the field's own line if it has one, else its top-level field's,
    /// else the spec's.
    pub(super) fn of(&self, index: Option<usize>, field: Option<&str>) -> Option<usize> {
        let prefix = index.map_or(String::new(), |i| format!("[{i}]"));
        let join = |f: &str| {
            if prefix.is_empty() {
                f.to_owned()
            } else {
                format!("{prefix}.{f}")
            }
        };
        let mut tries = Vec::new();
        if let Some(f) = field {
            tries.push(join(f));
            let top = f.split('[').next().unwrap_or(f);
            tries.push(join(top));
        }
        tries.push(prefix.clone());
        tries.iter().find_map(|p| self.0.get(p).copied())
    }
}

/// Reads one YAML document into a tree and the lines of its nodes.
pub(super) fn document(text: &str) -> Result<(Value, Lines), SpecError> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        SpecError::new(None, format!("not valid YAML: {}", e.info())).on_line(e.marker().line())
    })?;
    let mut docs = docs.into_iter();
    let Some(doc) = docs.next() else {
        return Err(SpecError::new(None, "the file holds no YAML document"));
    };
    if let Some(second) = docs.next() {
        return Err(SpecError::new(
            None,
            "the file holds more than one YAML document (`---`); put the specs in one array",
        )
        .on_line(second.span.start.line()));
    }
    let mut lines = Lines::default();
    let value = tree(&doc, String::new(), &mut lines)?;
    Ok((value, lines))
}

/// A node as a JSON value, recording the lines of it and its children.
fn tree(node: &MarkedYaml<'_>, path: String, lines: &mut Lines) -> Result<Value, SpecError> {
    let line = node.span.start.line();
    let fail = |reason: String| {
        let field = (!path.is_empty()).then_some(path.as_str());
        Err(SpecError::new(field, reason).on_line(line))
    };
    lines.0.entry(path.clone()).or_insert(line);
    match &node.data {
        YamlData::Value(scalar) => match scalar {
            Scalar::Null => Ok(Value::Null),
            Scalar::Boolean(b) => Ok(Value::Bool(*b)),
            Scalar::Integer(i) => Ok(Value::from(*i)),
            Scalar::FloatingPoint(f) => match Number::from_f64(f.into_inner()) {
                Some(n) => Ok(Value::Number(n)),
                None => fail(format!(
                    "{} is not a number a spec can hold",
                    f.into_inner()
                )),
            },
            Scalar::String(s) => Ok(Value::String(s.to_string())),
        },
        // Loading resolves representations; one left is a plain string.
        YamlData::Representation(s, _, _) => Ok(Value::String(s.to_string())),
        YamlData::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                // The top-level array's items are specs: `[0]`.
                let p = format!("{path}[{i}]");
                tree(item, p, lines)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        YamlData::Mapping(entries) => {
            let mut object = Map::new();
            for (key, value) in entries {
                let key_line = key.span.start.line();
                let name = match &key.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Representation(s, _, _) => s.to_string(),
                    _ => {
                        return Err(SpecError::new(
                            None,
                            "a key that is not a string; field names are strings",
                        )
                        .on_line(key_line));
                    }
                };
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                lines.0.insert(p.clone(), key_line);
                let v = tree(value, p, lines)?;
                // The key's line, not its value's: `env:` above its list.
                if object.insert(name.clone(), v).is_some() {
                    return Err(
                        SpecError::new(Some(&name), "the field is given twice").on_line(key_line)
                    );
                }
            }
            Ok(Value::Object(object))
        }
        YamlData::Tagged(tag, _) => fail(format!(
            "YAML tags ({tag}) are not supported in a spec; write the plain value"
        )),
        YamlData::Alias(_) => fail("YAML aliases (`*name`) are not supported in a spec".into()),
        YamlData::BadValue => fail("a value that cannot be read".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Duration, parse_specs};

    fn errs(text: &str) -> Vec<String> {
        parse_specs("web.yaml", text)
            .unwrap_err()
            .errors
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_good_yaml_file_gives_the_same_specs_as_json() {
        let yaml = "# two services\n\
            - machine: m1\n  name: web\n  image: testy\n  type: binary\n  env:\n    - A=1\n    - B=no\n  \
              memory: 512M\n  cpus: 0.5\n  proxyport: 9000\n\
            - {machine: m1, name: job, image: testy, type: binary, duration: oneshot, args: [run, '080']}\n";
        let json = r#"[{"machine":"m1","name":"web","image":"testy","type":"binary","env":["A=1","B=no"],
            "memory":"512M","cpus":0.5,"proxyport":9000},
            {"machine":"m1","name":"job","image":"testy","type":"binary","duration":"oneshot","args":["run","080"]}]"#;
        let from_yaml = parse_specs("web.yml", yaml).unwrap();
        assert_eq!(from_yaml, parse_specs("web.json", json).unwrap());
        assert_eq!(from_yaml[0].memory, Some(512 << 20));
        assert_eq!(from_yaml[1].duration, Duration::Oneshot);
        // YAML 1.2: `no` is a string, not false.
        assert_eq!(from_yaml[0].env[1], "B=no");
    }

    #[test]
    fn a_type_error_names_line_and_field() {
        let e = errs(
            "machine: m1\nname: web\nimage: testy\ntype: binary\nproxyport: eighty\nenv:\n  - A=1\n  - 3\n",
        );
        let all = e.join("\n");
        assert!(
            all.contains("line 5: spec \"web\": field `proxyport`: expected a port number from 1 to 65535, got a string \"eighty\""),
            "{all}"
        );
        assert!(
            all.contains("line 8: spec \"web\": field `env[1]`: expected a string, got a number 3"),
            "{all}"
        );
        assert_eq!(e.len(), 2, "{all}");
    }

    #[test]
    fn an_unknown_field_is_on_its_line_with_a_suggestion() {
        let all = errs(
            "- machine: m1\n  name: web\n  image: testy\n  type: binary\n\
             - machine: m1\n  name: api\n  image: testy\n  type: binary\n  helthcheck: /health\n",
        )
        .join("\n");
        assert_eq!(
            all,
            "line 9: spec #2 (\"api\"): field `helthcheck`: unknown field; did you mean `healthcheck`?"
        );
    }

    #[test]
    fn validation_errors_and_syntax_errors_have_lines() {
        let all = errs("machine: m1\nname: Web_1\nimage: testy\ntype: binary\n").join("\n");
        assert!(
            all.starts_with("line 2: spec \"Web_1\": field `name`:"),
            "{all}"
        );
        let all = errs("machine: m1\nname: [web\n").join("\n");
        assert!(all.starts_with("line "), "{all}");
        assert!(all.contains("not valid YAML"), "{all}");
        let all = errs("").join("\n");
        assert!(all.contains("no YAML document"), "{all}");
        let all = errs("a: 1\n---\nb: 2\n").join("\n");
        assert!(
            all.contains("line 3: spec: the file holds more than one YAML document"),
            "{all}"
        );
        // Anchors and aliases are YAML's own: an alias reads as its anchor.
        let all =
            errs("machine: &m m1\nname: *m\nimage: testy\ntype: binary\ncpus: 0\n").join("\n");
        assert!(
            all.starts_with("line 5: spec \"m1\": field `cpus`"),
            "{all}"
        );
    }

    #[test]
    fn the_extension_decides_the_format() {
        assert!(super::super::is_yaml("a/b.YAML") && super::super::is_yaml("x.yml"));
        assert!(!super::super::is_yaml("x.json") && !super::super::is_yaml("<stdin>"));
        // JSON is YAML too, but a .json file keeps JSON's messages.
        assert!(
            parse_specs("x.json", "{")
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
    }
}
