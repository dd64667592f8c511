//! docs/protocol.md's close-code table says what `potluck_protocol::close` says: every code,
//! with its number, and no code the table lacks.

use potluck_protocol::close::*;

#[test]
fn the_close_code_table_matches_the_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
    let codes = [
        ("LEAVING", LEAVING),
        ("COORDINATOR_PROOF_FAILED", COORDINATOR_PROOF_FAILED),
        ("NO_IDENTITY", NO_IDENTITY),
        ("NOT_A_MEMBER", NOT_A_MEMBER),
        ("DATA_PROTOCOL_ERROR", DATA_PROTOCOL_ERROR),
        ("BAD_HELLO", BAD_HELLO),
        ("IDENTITY_MISMATCH", IDENTITY_MISMATCH),
        ("BAD_JOIN_TOKEN", BAD_JOIN_TOKEN),
        ("REMOVED", REMOVED),
        ("UNEXPECTED_NODE_ID", UNEXPECTED_NODE_ID),
    ];
    let section = doc.split("\n## Close codes\n").nth(1).expect("docs/protocol.md has no \"## Close codes\" section");
    let section = section.split("\n## ").next().unwrap();
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| ")).collect();
    for (name, code) in codes {
        let row = format!("| {code} | `{name}` |");
        assert!(rows.iter().any(|r| r.starts_with(&row)), "docs/protocol.md lacks the row {row}");
    }
    let table_rows = rows.iter().filter(|r| r.split('|').nth(1).is_some_and(|c| c.trim().parse::<u32>().is_ok())).count();
    assert_eq!(table_rows, codes.len(), "docs/protocol.md's close-code table has rows the code lacks");
}
