//! The one public error type. Every kind maps to a gRPC-style status code so
//! integrators can forward it unchanged.

use std::fmt;

/// gRPC-style status code of an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    InvalidArgument,
    NotFound,
    DeadlineExceeded,
    Unavailable,
    Cancelled,
    ResourceExhausted,
    FailedPrecondition,
    Internal,
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::NotFound => "NOT_FOUND",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::Unavailable => "UNAVAILABLE",
            Code::Cancelled => "CANCELLED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Internal => "INTERNAL",
        };
        f.write_str(s)
    }
}

/// Error returned by every fallible call of the engine. The message says what
/// happened and, where there is one, what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// The gRPC-style code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Cancelled(_) => Code::Cancelled,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The message without the code prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::DeadlineExceeded(m)
            | Error::Unavailable(m)
            | Error::Cancelled(m)
            | Error::ResourceExhausted(m)
            | Error::FailedPrecondition(m)
            | Error::Internal(m) => m,
        }
    }

    pub(crate) fn io(context: &str, err: std::io::Error) -> Error {
        let msg = format!("{context}: {err}");
        match err.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) | Some(libc::EAGAIN) => {
                Error::ResourceExhausted(msg)
            }
            _ => Error::Internal(msg),
        }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
