//! Small validation helpers shared by the message types.

use crate::ProtocolError;

/// `len <= max`, else [`ProtocolError::TooLong`] naming the field.
pub(crate) fn check_len(field: &'static str, len: usize, max: u32) -> Result<(), ProtocolError> {
    if len as u64 > u64::from(max) {
        return Err(ProtocolError::TooLong { field, len: len as u64, max: u64::from(max) });
    }
    Ok(())
}

/// A non-empty string of at most `max` bytes.
pub(crate) fn check_name(field: &'static str, value: &str, max: u32) -> Result<(), ProtocolError> {
    if value.is_empty() {
        return Err(ProtocolError::InvalidValue { field, reason: "must not be empty" });
    }
    check_len(field, value.len(), max)
}

/// A measurement: finite and not negative.
pub(crate) fn check_finite_non_negative(field: &'static str, value: f64) -> Result<(), ProtocolError> {
    if !value.is_finite() || value < 0.0 {
        return Err(ProtocolError::InvalidValue { field, reason: "must be finite and non-negative" });
    }
    Ok(())
}
