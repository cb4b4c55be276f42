//! Identifiers: the rule that tenant, device, group, type, policy and CA ids follow.
//!
//! Identifiers appear in topics (`devices/{id}/…`), in MQTT user names (`tenant/device`) and in
//! URL paths, so `/`, `+`, `#`, `$`, spaces and control characters are excluded. The registry
//! checks every id it stores with [`is_valid_id`]; telemetry written for devices that are not in
//! the registry (InfluxDB line protocol) is held to the same rule for its device ids.

/// Longest identifier, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// What an identifier may contain, as people read it (for error messages).
pub const ID_RULE: &str = "1-128 characters from A-Z a-z 0-9 . _ : -, not `.` or `..`";

/// Whether `id` is a valid identifier: 1 to [`MAX_ID_LEN`] characters of `A-Z a-z 0-9 . _ : -`,
/// other than `.` and `..` (URL clients collapse those path segments, so they could not be
/// addressed).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in [
            "d1",
            "boiler-17",
            "a.b_c:d-E",
            "web1.example.com",
            "...",
            ".hidden",
            &"x".repeat(128),
        ] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            ".",
            "..",
            "x#y",
            "a+b",
            "$sys",
            "a b",
            "tab\t",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }
}
