//! What an API caller sees when a request fails.
//!
//! Each variant is one [`ErrorKind`] on the wire, so the CLI can tell a typo
//! (invalid) from a missing name (not found), a clash with the cluster's
//! state (conflict), a machine that is down (unavailable) and a fault of
//! the master itself (internal), and exit with a code for each. The message
//! says what and why, for people.

use phoenix_model::proto::ErrorKind;
use phoenix_model::spec::SpecErrors;

use crate::registry::RegistryError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The input is malformed or fails validation; for a spec file, every
    /// error at once.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A machine the request needs is not connected, or waiting timed out.
    #[error("{0}")]
    Unavailable(String),
    /// The master's store or disk failed; nothing the caller can fix.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Invalid(_) => ErrorKind::Invalid,
            ApiError::NotFound(_) => ErrorKind::NotFound,
            ApiError::Conflict(_) => ErrorKind::Conflict,
            ApiError::Unavailable(_) => ErrorKind::Unavailable,
            ApiError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The kind and message, as [`phoenix_model::proto::Reply::of`] takes them.
    pub fn into_wire(self) -> (ErrorKind, String) {
        (self.kind(), self.to_string())
    }

    pub(crate) fn no_service(name: &str) -> ApiError {
        ApiError::NotFound(format!("no service {name:?} (see `phoenix services`)"))
    }
}

impl From<SpecErrors> for ApiError {
    fn from(e: SpecErrors) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::Missing { .. } => ApiError::NotFound(message),
            RegistryError::BadName { .. } => ApiError::Invalid(message),
            RegistryError::Changed { .. } => ApiError::Conflict(message),
            RegistryError::Io { .. } | RegistryError::Chunks(_) => ApiError::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::spec::SpecError;

    #[test]
    fn each_error_has_its_kind_and_keeps_its_message() {
        let spec = SpecErrors {
            file: "web.json".into(),
            errors: vec![SpecError::new(Some("machine"), "unknown machine \"m9\"")],
        };
        let e = ApiError::from(spec);
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().starts_with("web.json: rejected"), "{e}");
        let missing = RegistryError::Missing {
            name: "app".into(),
            dir: "/r".into(),
        };
        assert_eq!(ApiError::from(missing).kind(), ErrorKind::NotFound);
        let bad = RegistryError::BadName {
            name: "../x".into(),
            reason: "no slashes".into(),
        };
        assert_eq!(ApiError::from(bad).kind(), ErrorKind::Invalid);
        let store = StoreError::Corrupt {
            what: "spec",
            detail: "eof".into(),
        };
        assert_eq!(
            ApiError::from(store).into_wire(),
            (
                ErrorKind::Internal,
                "store holds a malformed spec: eof".to_owned()
            )
        );
        assert_eq!(ApiError::no_service("web").kind(), ErrorKind::NotFound);
        assert_eq!(
            ApiError::Unavailable("m1 is down".into()).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(ApiError::Conflict("x".into()).kind(), ErrorKind::Conflict);
    }
}
