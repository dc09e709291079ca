// What each error kind of the contract means to a person, and the way forward from it.
// Stores attach these to notices; the backend's own message is shown beside as detail.

import type { ErrorKind } from '../services/types';

/** A step the UI can take for the user: open a screen, or retry what failed. */
export type Remedy = 'open-models' | 'open-settings' | 'retry' | 'none';

export interface ErrorHelp {
  title: string;
  hint: string;
  remedy: Remedy;
}

const HELP: Record<ErrorKind, ErrorHelp> = {
  no_model: {
    title: 'No model is ready yet',
    hint: 'Download a model in the model manager, then pick it in Settings.',
    remedy: 'open-models',
  },
  model_load: {
    title: 'The model could not be loaded',
    hint: 'Its files may be incomplete or removed. Download the variant again or choose another.',
    remedy: 'open-models',
  },
  download: {
    title: 'The download failed',
    hint: 'Retry: files already complete are kept, the rest resumes.',
    remedy: 'retry',
  },
  network: {
    title: 'Hugging Face cannot be reached',
    hint: 'Check the connection and retry. Downloaded models keep working offline.',
    remedy: 'retry',
  },
  auth: {
    title: 'A Hugging Face token is needed',
    hint: "This model's base is gated: accept its licence on huggingface.co, then add a token in Settings.",
    remedy: 'open-settings',
  },
  disk_full: {
    title: 'The disk is full',
    hint: 'Free some space, then retry. Nothing already saved was lost.',
    remedy: 'retry',
  },
  invalid_settings: {
    title: 'That value is not valid',
    hint: 'Correct the field named below and save again.',
    remedy: 'none',
  },
  invalid_repo_id: {
    title: 'That is not a repository id',
    hint: 'Use the form owner/name, for example ffurfaro/Titans-OLMo-1B-hf.',
    remedy: 'none',
  },
  not_a_tptt_repo: {
    title: 'That folder is not a TPTT model',
    hint: 'Choose a folder with one subfolder per variant, each holding a TPTT config.json.',
    remedy: 'none',
  },
  not_found: {
    title: 'It is no longer there',
    hint: 'It may have been deleted or moved; the lists have been refreshed.',
    remedy: 'none',
  },
  busy: {
    title: 'A reply is still being written',
    hint: 'Wait for it to finish, or press Esc to stop it.',
    remedy: 'none',
  },
  database: {
    title: 'Conversations could not be saved or read',
    hint: 'Your text is kept. Retry; if it keeps failing, restart the app.',
    remedy: 'retry',
  },
  generation: {
    title: 'The reply stopped with an error',
    hint: 'The partial answer is kept. Regenerate to try again.',
    remedy: 'retry',
  },
  input_too_long: {
    title: 'The message is too long',
    hint: 'Shorten it or send it in parts; your text is kept in the message box.',
    remedy: 'none',
  },
  internal: {
    title: 'Something went wrong',
    hint: 'Retry; if it keeps happening, restart the app.',
    remedy: 'retry',
  },
};

export function helpFor(kind: ErrorKind): ErrorHelp {
  return HELP[kind] ?? HELP.internal;
}
