//! The TypeScript side of the IPC contract, generated from the Rust types: every DTO of
//! [`crate::dto`] and [`crate::error`] (ts-rs derives, with the docs), the string unions the Rust
//! side keeps as enums elsewhere (device, theme, message role and status, spelled as the wire
//! spells them), and the settings' bounds. [`typescript`] is the text of
//! `ui/src/services/ipc.gen.ts`, with the commands' signatures ([`crate::ipc_commands`]); the
//! test `tests/ipc_contract.rs` fails when the checked-in file
//! differs, and writes it with `TPTT_WRITE_IPC=1`. The UI imports its wire types from there
//! (`ui/src/services/types.ts` re-exports them), so a field renamed or a bound changed in Rust
//! shows up as a type error or a failing test, not as drift.

use ts_rs::TS;

use crate::api_server::{ApiServerDto, ApiServerStatus};
use crate::device::DevicePref;
use crate::dto::{
    AttachmentDto, BackupSummary, ChatEvent, ChatModelDto, ChatSettingsDto, ChatSettingsSaved,
    ConversationDto, ConversationSummary, DeviceInfo, DownloadEvent, ExportFormat, ImportSummary,
    LaunchEvent, MemoryHealth, MemoryInfo, MessageDto, ModelEntry, ModelSource, RegenerateResult,
    SamplingDto, SavedMemory, SendResult, SettingsDto, Stats, VariantEntry, Verdict, VersionsDto,
    LAUNCH_EVENT,
};
use crate::error::{CommandError, ErrorKind};
use crate::settings::{
    KvSetting, Theme, MAX_NEW_TOKENS, MAX_REPEAT_LAST_N, MAX_SEED, MAX_SYSTEM_PROMPT_BYTES,
    MAX_TOP_K, MAX_WINDOW,
};
use tptt_store::{MessageStatus, Role};

/// The generated file, from the workspace's root.
pub const GENERATED_FILE: &str = "ui/src/services/ipc.gen.ts";

/// The text of [`GENERATED_FILE`].
pub fn typescript() -> String {
    let mut out = String::from(
        "// GENERATED from the Rust types of src-tauri (src/ipc_types.rs): do not edit.\n\
         // Regenerate: TPTT_WRITE_IPC=1 cargo test --workspace --all-targets ipc_contract\n\
         /* eslint-disable */\n\n\
         import type { Channel } from '@tauri-apps/api/core';\n\n",
    );
    out += "// ---- Values the Rust side spells as strings ----\n\n";
    out += &union(
        "Device",
        "A device preference (src/device.rs `DevicePref`).",
        devices().map(|d| d.as_str().to_string()),
    );
    out += &union(
        "Theme",
        "The UI theme (src/settings.rs `Theme`).",
        Theme::ALL.map(|t| t.as_str().to_string()),
    );
    out += &union(
        "KvFormat",
        "How a memory stores its KV cache (src/settings.rs `KvSetting`).",
        KvSetting::ALL.map(|k| k.as_str().to_string()),
    );
    out += &union(
        "Role",
        "Who wrote a message (the store's `Role`).",
        roles().map(|r| wire(&r)),
    );
    out += &union(
        "MessageStatus",
        "How far a message got (the store's `MessageStatus`).",
        statuses().map(|s| wire(&s)),
    );
    out += "// ---- Types ----\n\n";
    for decl in [
        declaration::<ErrorKind>(),
        declaration::<CommandError>(),
        declaration::<ModelSource>(),
        declaration::<VariantEntry>(),
        declaration::<ModelEntry>(),
        declaration::<DownloadEvent>(),
        declaration::<SamplingDto>(),
        declaration::<ApiServerDto>(),
        declaration::<SettingsDto>(),
        declaration::<ApiServerStatus>(),
        declaration::<DeviceInfo>(),
        declaration::<ConversationSummary>(),
        declaration::<Stats>(),
        declaration::<Verdict>(),
        declaration::<MemoryHealth>(),
        declaration::<MemoryInfo>(),
        declaration::<VersionsDto>(),
        declaration::<AttachmentDto>(),
        declaration::<crate::documents::DocumentInfo>(),
        declaration::<MessageDto>(),
        declaration::<ChatModelDto>(),
        declaration::<ChatSettingsDto>(),
        declaration::<ChatSettingsSaved>(),
        declaration::<ConversationDto>(),
        declaration::<SavedMemory>(),
        declaration::<BackupSummary>(),
        declaration::<ImportSummary>(),
        declaration::<ChatEvent>(),
        declaration::<SendResult>(),
        declaration::<RegenerateResult>(),
        declaration::<ExportFormat>(),
        declaration::<LaunchEvent>(),
    ] {
        out += &decl;
    }
    let kinds: Vec<String> = error_kinds()
        .iter()
        .map(|k| format!("{:?}", wire(k)))
        .collect();
    out += &format!(
        "/** Every `ErrorKind`, for telling a command's error from anything else. */\nexport const ERROR_KINDS: readonly ErrorKind[] = [{}];\n\n",
        kinds.join(", ")
    );
    out += &format!(
        "/** The event that carries a `LaunchEvent` (the app started again with `--model`). */\nexport const LAUNCH_EVENT = {LAUNCH_EVENT:?};\n\n"
    );
    out += "// ---- Commands ----\n\n";
    out += &crate::ipc_commands::typescript();
    out += "// ---- Bounds the backend enforces (src/settings.rs) ----\n\n";
    out += "/** The largest values `set_settings` accepts (the smallest are 0, or 1 for maxNewTokens and windowSize). */\n";
    out += &format!(
        "export const SETTINGS_LIMITS = {{\n  maxNewTokens: {MAX_NEW_TOKENS},\n  topK: {MAX_TOP_K},\n  repeatLastN: {MAX_REPEAT_LAST_N},\n  seed: {MAX_SEED},\n  windowSize: {MAX_WINDOW},\n  systemPromptBytes: {MAX_SYSTEM_PROMPT_BYTES},\n}} as const;\n"
    );
    out
}

/// `export type T = …;` with its docs.
fn declaration<T: TS>() -> String {
    let docs = T::docs().unwrap_or_default();
    format!("{docs}export {}\n\n", T::decl())
}

/// `export type NAME = "a" | "b";` with a one-line doc.
fn union<const N: usize>(name: &str, doc: &str, values: [String; N]) -> String {
    let values: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    format!(
        "/** {doc} */\nexport type {name} = {};\n\n",
        values.join(" | ")
    )
}

/// How serde writes `value` (for a unit enum variant, its name; the JSON text otherwise, which
/// the type check of the UI then refuses).
fn wire<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// Every [`DevicePref`] and [`Theme`] is in its `ALL` (a variant added fails to compile here
/// until it is listed there and here).
fn devices() -> [DevicePref; 4] {
    for d in DevicePref::ALL {
        match d {
            DevicePref::Auto | DevicePref::Cpu | DevicePref::Cuda | DevicePref::Metal => {}
        }
    }
    for t in Theme::ALL {
        match t {
            Theme::Light | Theme::Dark | Theme::System => {}
        }
    }
    DevicePref::ALL
}

/// Every [`Role`]: a variant added to the store fails to compile here until it is listed.
fn roles() -> [Role; 3] {
    let all = [Role::System, Role::User, Role::Assistant];
    for r in all {
        match r {
            Role::System | Role::User | Role::Assistant => {}
        }
    }
    all
}

/// Every [`ErrorKind`] (as [`roles`]).
fn error_kinds() -> [ErrorKind; 15] {
    use ErrorKind as K;
    let all = [
        K::NoModel,
        K::ModelLoad,
        K::Download,
        K::Network,
        K::Auth,
        K::DiskFull,
        K::InvalidSettings,
        K::InvalidRepoId,
        K::NotATpttRepo,
        K::NotFound,
        K::Busy,
        K::Database,
        K::Generation,
        K::InputTooLong,
        K::Internal,
    ];
    for k in all {
        match k {
            K::NoModel
            | K::ModelLoad
            | K::Download
            | K::Network
            | K::Auth
            | K::DiskFull
            | K::InvalidSettings
            | K::InvalidRepoId
            | K::NotATpttRepo
            | K::NotFound
            | K::Busy
            | K::Database
            | K::Generation
            | K::InputTooLong
            | K::Internal => {}
        }
    }
    all
}

/// Every [`MessageStatus`] (as [`roles`]).
fn statuses() -> [MessageStatus; 3] {
    let all = [
        MessageStatus::Complete,
        MessageStatus::Partial,
        MessageStatus::Error,
    ];
    for s in all {
        match s {
            MessageStatus::Complete | MessageStatus::Partial | MessageStatus::Error => {}
        }
    }
    all
}
