//! The commands of the IPC, declared once: [`handler`] registers them with Tauri, [`contract`]
//! is their signature as the UI sees it (written into `ui/src/services/ipc.gen.ts` as the
//! `Commands` interface, which types the UI's calls and its mock backend), and a function that
//! is compiled but never called checks each declaration against the command's Rust signature —
//! an argument renamed, added or retyped in `commands.rs` fails to compile until its line here
//! changes, and the generated TypeScript then fails the UI's type check where a call no longer
//! fits.
//!
//! A line: `name [context] (argument: RustType [as "TsType"], …) -> Result;` — `context` lists
//! the framework parameters the command takes first (`app`: `AppHandle`, `state`:
//! `State<AppState>`), which the UI does not send; `as` names the wire type where the Rust
//! parameter is looser than what the UI must send (a JSON value validated by the command, a
//! channel read untyped).

use tauri::ipc::Channel;
use tauri::{AppHandle, Runtime, State};
use ts_rs::TS;

use crate::api_server::ApiServerStatus;
use crate::commands;
use crate::dto::{
    BackupSummary, ChatEvent, ChatSettingsSaved, ConversationDto, ConversationSummary, DeviceInfo,
    DownloadEvent, ImportSummary, MemoryInfo, ModelEntry, RegenerateResult, SavedMemory,
    SendResult, SettingsDto, VariantEntry,
};
use crate::error::CmdResult;
use crate::state::AppState;

/// One command as the UI calls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSig {
    /// The command's name (`invoke`'s first argument).
    pub name: &'static str,
    /// Its arguments: camelCase name (as Tauri maps them) and TypeScript type.
    pub args: Vec<(String, String)>,
    /// The TypeScript type of its result.
    pub result: String,
}

/// The TypeScript type of a command argument.
pub trait WireArg {
    /// The type's name in TypeScript.
    fn ts() -> String;
}

impl WireArg for String {
    fn ts() -> String {
        "string".into()
    }
}

impl WireArg for Option<String> {
    fn ts() -> String {
        "string | null".into()
    }
}

impl<E: TS> WireArg for Channel<E> {
    fn ts() -> String {
        format!("Channel<{}>", E::name())
    }
}

/// `repo_id` → `repoId`, as Tauri maps argument names.
fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

macro_rules! wire_type {
    ($ty:ty) => {
        <$ty as WireArg>::ts()
    };
    ($ty:ty, $wire:literal) => {
        String::from($wire)
    };
}

macro_rules! context_type {
    (app) => {
        AppHandle<R>
    };
    (state) => {
        State<'static, AppState>
    };
}

macro_rules! ipc_commands {
    ($(
        $name:ident [$($ctx:ident),*] ( $($arg:ident : $ty:ty $(as $wire:literal)?),* ) -> $ret:ty;
    )*) => {
        /// Every command's signature as the UI sees it, in declaration order.
        pub fn contract() -> Vec<CommandSig> {
            vec![$(
                CommandSig {
                    name: stringify!($name),
                    args: vec![$( (camel(stringify!($arg)), wire_type!($ty $(, $wire)?)) ),*],
                    result: <$ret as TS>::name(),
                },
            )*]
        }

        /// The invoke handler of every command.
        pub fn handler<R: Runtime>() -> impl Fn(tauri::ipc::Invoke<R>) -> bool + Send + Sync + 'static {
            tauri::generate_handler![$(crate::commands::$name),*]
        }

        /// Never called: it compiles only while each line above matches its command's
        /// parameters (the context ones first) and result.
        #[allow(dead_code)]
        fn signatures<R: Runtime>() {
            $(
                let _ = |$($ctx: context_type!($ctx),)* $($arg: $ty),*| async move {
                    let result: CmdResult<$ret> = commands::$name($($ctx,)* $($arg),*).await;
                    result
                };
            )*
        }
    };
}

ipc_commands! {
    list_models [state] () -> Vec<ModelEntry>;
    refresh_variants [state] (repo_id: String) -> Vec<VariantEntry>;
    add_model [state] (repo_id: String) -> ModelEntry;
    import_local_model [state] (path: String) -> ModelEntry;
    pick_model_folder [app] () -> Option<String>;
    download_variant [state] (repo_id: String, variant: String, on_event: Channel<DownloadEvent>) -> ();
    cancel_download [state] (repo_id: String, variant: String) -> ();
    remove_variant [state] (repo_id: String, variant: String) -> ();
    get_settings [state] () -> SettingsDto;
    set_settings [state] (settings: serde_json::Value as "Settings") -> SettingsDto;
    set_hf_token [state] (token: Option<String>) -> ();
    api_server_status [state] () -> ApiServerStatus;
    device_info [state] () -> DeviceInfo;
    list_conversations [state] (query: Option<String>) -> Vec<ConversationSummary>;
    list_archived_conversations [state] () -> Vec<ConversationSummary>;
    set_conversation_pinned [state] (id: String, pinned: serde_json::Value as "boolean") -> ConversationSummary;
    set_conversation_archived [state] (id: String, archived: serde_json::Value as "boolean") -> ConversationSummary;
    create_conversation [state] () -> ConversationSummary;
    get_conversation [state] (id: String) -> ConversationDto;
    set_conversation_settings [state] (id: String, settings: serde_json::Value as "ChatSettings") -> ChatSettingsSaved;
    branch_conversation [state] (id: String, message_id: String) -> ConversationSummary;
    save_memory [state] (conversation_id: String, name: String) -> SavedMemory;
    list_memories [state] () -> Vec<SavedMemory>;
    rename_memory [state] (id: String, name: String) -> ();
    delete_memory [state] (id: String) -> ();
    new_chat_from_memory [state] (id: String) -> ConversationSummary;
    switch_version [state] (conversation_id: String, message_id: String, version: serde_json::Value as "number") -> ConversationDto;
    rename_conversation [state] (id: String, title: String) -> ();
    delete_conversation [state] (id: String) -> ();
    export_conversation [state] (id: String, format: String as "ExportFormat") -> String;
    save_conversation [app, state] (id: String, format: String as "ExportFormat") -> Option<String>;
    export_backup [app, state] (include_states: serde_json::Value as "boolean") -> Option<BackupSummary>;
    import_backup [app, state] () -> Option<ImportSummary>;
    open_logs_folder [state] () -> String;
    send_message [state] (conversation_id: String, content: String, on_event: Channel<ChatEvent>) -> SendResult;
    pick_document [app] () -> Option<crate::documents::DocumentInfo>;
    inspect_document [] (path: String) -> crate::documents::DocumentInfo;
    send_document [state] (conversation_id: String, path: String, content: String, on_event: Channel<ChatEvent>) -> SendResult;
    regenerate [state] (conversation_id: String, on_event: Channel<tauri::ipc::InvokeResponseBody> as "Channel<ChatEvent>") -> RegenerateResult;
    edit_and_resend [state] (conversation_id: String, message_id: String, content: String, on_event: Channel<ChatEvent>) -> SendResult;
    stop_generation [state] (conversation_id: String) -> ();
    reset_memory [state] (conversation_id: String) -> MemoryInfo;
    open_url [] (url: String) -> ();
}

/// The `Commands` interface of the generated TypeScript: per command, its `args` and `result`.
pub fn typescript() -> String {
    let mut out = String::from(
        "/**\n * Every command of the IPC (src-tauri/src/ipc_commands.rs): its arguments and its result.\n * `api.ts` calls them through this, so a call that no longer fits fails the type check.\n */\nexport interface Commands {\n",
    );
    for c in contract() {
        let args: Vec<String> = c.args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        let args = if args.is_empty() {
            "Record<string, never>".to_string()
        } else {
            format!("{{ {} }}", args.join("; "))
        };
        out += &format!("  {}: {{ args: {args}; result: {} }};\n", c.name, c.result);
    }
    out += "}\n\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_camel_cased_as_tauri_does() {
        assert_eq!(camel("repo_id"), "repoId");
        assert_eq!(camel("on_event"), "onEvent");
        assert_eq!(camel("id"), "id");
    }

    #[test]
    fn every_command_is_declared_once() {
        let c = contract();
        let mut names: Vec<&str> = c.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), c.len(), "a command is declared twice");
        let send = c
            .iter()
            .find(|s| s.name == "send_message")
            .expect("send_message");
        assert_eq!(
            send.args,
            [
                ("conversationId".to_string(), "string".to_string()),
                ("content".into(), "string".into()),
                ("onEvent".into(), "Channel<ChatEvent>".into()),
            ]
        );
        assert_eq!(send.result, "SendResult");
    }
}
