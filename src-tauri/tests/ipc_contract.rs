//! The UI's wire types are generated from the Rust ones (src/ipc_types.rs): the checked-in
//! `ui/src/services/ipc.gen.ts` must be what the DTOs generate today. `TPTT_WRITE_IPC=1` writes
//! it instead (then the UI's type check, `ui/tests/run`, says what the UI must follow).

use std::path::Path;

use tptt_chat::ipc_types::{typescript, GENERATED_FILE};

#[test]
fn ipc_contract_the_typescript_types_are_the_rust_ones() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(GENERATED_FILE);
    let want = typescript();
    if std::env::var_os("TPTT_WRITE_IPC").is_some_and(|v| v == "1") {
        std::fs::write(&path, &want).expect("write the generated types");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .map_or(have.lines().count().min(want.lines().count()) + 1, |i| {
                i + 1
            });
        panic!(
            "{GENERATED_FILE} is not what the Rust DTOs generate (first difference at line {line}). \
             Regenerate it: TPTT_WRITE_IPC=1 cargo test --workspace --all-targets ipc_contract"
        );
    }
}

#[test]
fn ipc_contract_numbers_are_numbers_and_names_are_the_uis() {
    let ts = typescript();
    assert!(
        !ts.contains("bigint"),
        "every integer is a number on the wire"
    );
    for name in [
        "export type Settings = ",
        "export type Sampling = ",
        "export type Message = ",
        "export type Conversation = ",
        "export type MemoryVerdict = ",
        "export type ChatEvent = ",
        "export type Device = \"auto\" | \"cpu\" | \"cuda\" | \"metal\";",
        "export type Role = \"system\" | \"user\" | \"assistant\";",
        "maxNewTokens: 65536",
    ] {
        assert!(ts.contains(name), "{name} missing from the generated types");
    }
}
