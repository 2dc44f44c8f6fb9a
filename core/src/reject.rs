//! Why an event could not be applied. Codes are stable: users match on them in
//! `ecst.dead_letters.error_code`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The payload is not valid JSON (or nests deeper than the parser allows).
    InvalidJson,
    /// The payload is JSON but not an object.
    NotAnObject,
    /// A key field is absent or null.
    MissingKey,
    /// A key field is an object/array or cannot be used as a key.
    InvalidKey,
    /// `oldState`/`newState` (or the object at `state_path`) has the wrong type.
    InvalidState,
    /// Neither `oldState` nor `newState` is present.
    NoState,
    /// A versioned stream received an event without a version.
    MissingVersion,
    /// The version is neither a JSON number nor an RFC 3339 timestamp, or is out of range.
    InvalidVersion,
    /// The event id is not a string or number.
    InvalidEventId,
    /// A value does not fit its column's type.
    InvalidValue,
    /// Two JSON fields of one object map to the same column.
    FieldCollision,
    /// An aggregate's child array is not an array of objects.
    InvalidChildren,
    /// An aggregate's child array repeats a child key.
    DuplicateChildKey,
    /// `oldState` disagrees with the replica and `on_conflict => 'dead_letter'`.
    Conflict,
    /// PostgreSQL refused the write (constraint, trigger, permissions...).
    WriteFailed,
    /// The inbox row names a stream that does not exist.
    UnknownStream,
    /// A route has no stream for the event's value (or the event has none).
    Unrouted,
    /// The event does not match the stream's JSON Schema (`create_stream(..., schema)`).
    SchemaViolation,
}

impl RejectCode {
    pub const ALL: [RejectCode; 18] = [
        RejectCode::InvalidJson,
        RejectCode::NotAnObject,
        RejectCode::MissingKey,
        RejectCode::InvalidKey,
        RejectCode::InvalidState,
        RejectCode::NoState,
        RejectCode::MissingVersion,
        RejectCode::InvalidVersion,
        RejectCode::InvalidEventId,
        RejectCode::InvalidValue,
        RejectCode::FieldCollision,
        RejectCode::InvalidChildren,
        RejectCode::DuplicateChildKey,
        RejectCode::Conflict,
        RejectCode::WriteFailed,
        RejectCode::UnknownStream,
        RejectCode::Unrouted,
        RejectCode::SchemaViolation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::NotAnObject => "not_an_object",
            RejectCode::MissingKey => "missing_key",
            RejectCode::InvalidKey => "invalid_key",
            RejectCode::InvalidState => "invalid_state",
            RejectCode::NoState => "no_state",
            RejectCode::MissingVersion => "missing_version",
            RejectCode::InvalidVersion => "invalid_version",
            RejectCode::InvalidEventId => "invalid_event_id",
            RejectCode::InvalidValue => "invalid_value",
            RejectCode::FieldCollision => "field_collision",
            RejectCode::InvalidChildren => "invalid_children",
            RejectCode::DuplicateChildKey => "duplicate_child_key",
            RejectCode::Conflict => "conflict",
            RejectCode::WriteFailed => "write_failed",
            RejectCode::UnknownStream => "unknown_stream",
            RejectCode::Unrouted => "unrouted",
            RejectCode::SchemaViolation => "schema_violation",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that goes to the dead letters: a stable code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Rejection { code, message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Rejection {}
