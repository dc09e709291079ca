// The data types of the IPC contract (docs/ipc.md). The wire types are GENERATED from the Rust
// DTOs (src-tauri/src/ipc_types.rs → ipc.gen.ts; a Rust test fails when that file drifts): they
// are re-exported here, with the few types only the UI has. Field names are the wire's (camelCase).
// Nothing here knows Svelte or the DOM.

export type {
  ApiServerSettings,
  ApiServerStatus,
  Attachment,
  DocumentInfo,
  BackupSummary,
  ImportSummary,
  ChatEvent,
  ChatModel,
  ChatSettings,
  ChatSettingsSaved,
  CommandError,
  Conversation,
  ConversationSummary,
  Device,
  DeviceInfo,
  DownloadEvent,
  ErrorKind,
  MemoryHealth,
  MemoryInfo,
  MemoryVerdict,
  Message,
  MessageStatus,
  ModelEntry,
  ModelSource,
  RegenerateResult,
  Role,
  Sampling,
  SavedMemory,
  SendResult,
  Settings,
  Stats,
  ExportFormat,
  LaunchEvent,
  Theme,
  VariantEntry,
  Versions,
} from './ipc.gen';
export { SETTINGS_LIMITS } from './ipc.gen';
