//! Host names that may be ordered and may become file names.

/// Why a name cannot have a certificate here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host name {name:?} cannot have a certificate: {reason}")]
pub struct InvalidHost {
    pub name: String,
    pub reason: &'static str,
}

/// The canonical form of `name` (ASCII lower case) if it is a DNS name an
/// HTTP-01 order can cover: 1 to 253 characters, dot-separated labels of 1
/// to 63 letters, digits and inner hyphens, the last label not all digits
/// (an address is not a DNS name). No wildcard (HTTP-01 cannot validate
/// one), no trailing dot, no `/`, `..`, NUL or any other character, so the
/// result is safe as a file name.
pub fn canonical_host(name: &str) -> Result<String, InvalidHost> {
    let invalid = |reason| InvalidHost {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 253 {
        return Err(invalid("it is longer than 253 characters"));
    }
    if name.starts_with("*.") {
        return Err(invalid(
            "a wildcard needs the DNS-01 challenge; only HTTP-01 is supported",
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(invalid(match c {
            '\0' => "it contains a NUL byte",
            '/' | '\\' => "it contains a path separator",
            c if c.is_whitespace() => "it contains white space",
            c if !c.is_ascii() => "it is not ASCII (use its punycode A-label, xn--…)",
            _ => "only letters, digits, '-' and '.' may appear in a DNS name",
        }));
    }
    let lower = name.to_ascii_lowercase();
    let labels: Vec<&str> = lower.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err(invalid(
                "it has an empty label (a leading, trailing or double dot)",
            ));
        }
        if label.len() > 63 {
            return Err(invalid("a label is longer than 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a label starts or ends with '-'"));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid(
            "its last label is all digits (an IP address is not a DNS name)",
        ));
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_names_and_lowercases_them() {
        assert_eq!(canonical_host("Example.COM").unwrap(), "example.com");
        assert_eq!(canonical_host("a-b.c1.test").unwrap(), "a-b.c1.test");
        assert_eq!(canonical_host("localhost").unwrap(), "localhost");
        assert_eq!(
            canonical_host("xn--bcher-kva.example").unwrap(),
            "xn--bcher-kva.example"
        );
        let long_label = "a".repeat(63);
        assert!(canonical_host(&format!("{long_label}.test")).is_ok());
    }

    #[test]
    fn refuses_what_is_no_dns_name_or_no_safe_file_name() {
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\\b",
            "a\0b",
            "a..b",
            ".a",
            "a.",
            "-a.test",
            "a-.test",
            "a b",
            "a_b.test",
            "*.example.com",
            "bücher.example",
            "127.0.0.1",
            "10.1",
        ] {
            let err = canonical_host(bad).expect_err(bad);
            assert_eq!(err.name, bad);
            assert!(err.to_string().contains("cannot have a certificate"));
        }
        assert!(canonical_host(&format!("{}.test", "a".repeat(64))).is_err());
        let too_long = vec!["a".repeat(60); 5].join(".");
        assert!(too_long.len() > 253);
        assert!(canonical_host(&too_long).is_err());
    }
}
