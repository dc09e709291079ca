//! [`Error`]: everything that can go wrong talking to the hub or writing the cache, each with a
//! message a user can act on. No message ever contains the token.

use std::path::{Path, PathBuf};

/// Errors of hub access and downloads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The hub (or the CDN a file redirects to) could not be reached, or the connection broke
    /// and stayed broken through [`crate::HubConfig::max_retries`] resumptions. Partial data
    /// is kept: the next call resumes it.
    #[error("network error talking to {url}: {message}")]
    Network {
        /// The URL, without its query string (CDN URLs carry signatures).
        url: String,
        /// The cause with its whole chain (e.g. `error sending request: … Connection refused`).
        message: String,
    },

    /// HTTP 401/403: the repository is gated or private and no token was sent, or the token
    /// sent does not grant access (invalid, or the gated model's terms are not accepted).
    #[error("{}", unauthorized_message(repo_id, *status, *token_sent))]
    Unauthorized {
        /// The repository asked for.
        repo_id: String,
        /// 401 or 403.
        status: u16,
        /// Whether a token was sent with the request.
        token_sent: bool,
    },

    /// HTTP 404 (or the hub's `RepoNotFound` / `RevisionNotFound` / `EntryNotFound`): the
    /// repository, revision or file does not exist.
    #[error("{}", not_found_message(repo_id, revision, path.as_deref(), *token_sent))]
    NotFound {
        /// The repository asked for.
        repo_id: String,
        /// The revision asked for (branch, tag or commit).
        revision: String,
        /// The file, when a file (not the repository) is missing.
        path: Option<String>,
        /// Whether a token was sent (a private repository looks missing without one).
        token_sent: bool,
    },

    /// Any other unexpected HTTP status (a 5xx that outlived the retries, 429, …).
    #[error("the hub answered HTTP {status} for {url}")]
    Http {
        /// The URL, without its query string.
        url: String,
        /// The status code.
        status: u16,
    },

    /// The server's answer cannot be used: unparsable JSON, a missing `ETag`, a file path or
    /// blob name that would escape the cache folder.
    #[error("unexpected answer from {url}: {message}")]
    Protocol {
        /// The URL, without its query string.
        url: String,
        /// What was wrong.
        message: String,
    },

    /// A downloaded file does not have the size the hub announced. The corrupt file was
    /// deleted; downloading again starts it from scratch.
    #[error("{path} from {repo_id}: expected {expected} bytes, received {actual}; the corrupt file was deleted, download it again")]
    SizeMismatch {
        /// The repository.
        repo_id: String,
        /// The file within the repository.
        path: String,
        /// Announced size.
        expected: u64,
        /// Received size.
        actual: u64,
    },

    /// A downloaded file's SHA-256 differs from the one the hub announced (LFS files). The
    /// corrupt file was deleted; downloading again starts it from scratch.
    #[error(
        "{path} from {repo_id} is corrupt (sha256 {actual}, expected {expected}); it was deleted, download it again"
    )]
    ChecksumMismatch {
        /// The repository.
        repo_id: String,
        /// The file within the repository.
        path: String,
        /// Announced SHA-256 (hex).
        expected: String,
        /// SHA-256 of what was received (hex).
        actual: String,
    },

    /// The disk (or the user's quota) is full. The partial file is kept so that the download
    /// resumes once space is freed.
    #[error("not enough disk space to write {}: free some space, then resume the download", path.display())]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },

    /// Any other file-system failure in the cache folder (permissions, read-only disk, …).
    #[error("cannot write or read {}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The caller's cancel flag was raised. Partial data is kept for a later resume; no
    /// incomplete file is ever visible as complete.
    #[error("download cancelled")]
    Cancelled,

    /// Not a hub repository id (`owner/name` of letters, digits, `-`, `_`, `.`).
    #[error("{0:?} is not a Hugging Face repository id (expected owner/name)")]
    InvalidRepoId(String),

    /// The endpoint URL cannot be parsed, or the HTTP client cannot start.
    #[error("cannot use hub endpoint {endpoint:?}: {message}")]
    InvalidEndpoint {
        /// The configured endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },

    /// The repository has no variant of that name (no `<variant>/config.json` that is a TPTT
    /// config).
    #[error(
        "{repo_id} has no TPTT variant {variant:?}{}",
        available_message(available)
    )]
    VariantNotFound {
        /// The repository.
        repo_id: String,
        /// The variant asked for.
        variant: String,
        /// Folders that hold a `config.json` (candidates; empty when none).
        available: Vec<String>,
    },

    /// A config or index file is not what a TPTT variant or its base needs (not JSON, no
    /// `base_model_name`, a `base_model_name` that is not a hub id, an index without a
    /// `weight_map`).
    #[error("{repo_id}/{path}: {message}")]
    InvalidConfig {
        /// The repository.
        repo_id: String,
        /// The file within the repository.
        path: String,
        /// What is wrong.
        message: String,
    },

    /// The base model offers no safetensors weights this app can load (neither
    /// `model.safetensors` nor `model.safetensors.index.json` with its shards).
    #[error("base model {repo_id} has no loadable weights: {message}")]
    MissingWeights {
        /// The base repository.
        repo_id: String,
        /// What was looked for.
        message: String,
    },

    /// An answer or file is larger than this app accepts for its kind (a repository listing
    /// over [`crate::MAX_LISTING_BYTES`], a `config.json` or index over
    /// [`crate::MAX_JSON_FILE_BYTES`]): the server is broken or hostile. It was cut off and
    /// nothing of it was kept.
    #[error("{what} is larger than {} MiB, the most accepted for {kind}; it was refused", limit >> 20)]
    TooLarge {
        /// The URL (without its query string) or the repository file (`owner/name/path`).
        what: String,
        /// What it was meant to be, e.g. `a repository listing`.
        kind: &'static str,
        /// The limit in bytes.
        limit: u64,
    },

    /// A download is writing the files this operation would delete (a variant being removed
    /// while it downloads, here or in another program using the same cache). Nothing was
    /// changed.
    #[error(
        "{what} is downloading right now: cancel that download (or let it finish), then try again"
    )]
    Busy {
        /// What is downloading, e.g. `variant "liza-a" of org/repo`.
        what: String,
    },

    /// Offline lookup: the repository or variant is not (completely) in the local cache.
    #[error("{what} is not in the local cache {}; download it first", cache.display())]
    NotCached {
        /// What is missing, e.g. `variant "x" of org/repo` or `base model org/base`.
        what: String,
        /// The cache folder searched.
        cache: PathBuf,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn unauthorized_message(repo_id: &str, status: u16, token_sent: bool) -> String {
    if token_sent {
        format!(
            "access to {repo_id} was refused (HTTP {status}): the Hugging Face token is invalid or \
             your account has not been granted access; accept the model's terms on its page and \
             check the token"
        )
    } else {
        format!(
            "{repo_id} needs a Hugging Face token (HTTP {status}: gated or private repository): \
             accept the model's terms on its page, then set a token with read access"
        )
    }
}

fn not_found_message(
    repo_id: &str,
    revision: &str,
    path: Option<&str>,
    token_sent: bool,
) -> String {
    match path {
        Some(p) => format!("{p} not found in {repo_id} at revision {revision}"),
        None if token_sent => {
            format!("repository {repo_id} (revision {revision}) not found on the hub")
        }
        None => format!(
            "repository {repo_id} (revision {revision}) not found on the hub; if it is private or \
             gated, set a Hugging Face token"
        ),
    }
}

fn available_message(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!("; folders with a config.json: {}", available.join(", "))
    }
}

/// Map an I/O error on `path`: a full disk or quota gets its own variant.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    if is_disk_full(&source) {
        Error::DiskFull {
            path: path.to_path_buf(),
        }
    } else {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// ENOSPC / EDQUOT (and their Windows counterparts, which std maps to the same kinds).
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
        return true;
    }
    // Belt and braces for platforms whose mapping lags: ENOSPC (28) and EDQUOT (122) on Linux,
    // ERROR_HANDLE_DISK_FULL (39) and ERROR_DISK_FULL (112) on Windows.
    let codes: &[i32] = if cfg!(windows) {
        &[39, 112]
    } else if cfg!(target_os = "linux") {
        &[28, 122]
    } else {
        &[28]
    };
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

/// A network failure on `url`, its cause flattened with the whole `source()` chain (a UI
/// shows one line; reqwest's own top line alone says only "error sending request").
pub(crate) fn network(url: &reqwest::Url, cause: &(dyn std::error::Error + 'static)) -> Error {
    let mut message = cause.to_string();
    let mut next = cause.source();
    while let Some(e) = next {
        let s = e.to_string();
        if !message.contains(&s) {
            message.push_str(": ");
            message.push_str(&s);
        }
        next = e.source();
    }
    Error::Network {
        url: display_url(url),
        message,
    }
}

/// A URL for messages: the query string (CDN signatures) and any user info are dropped.
pub(crate) fn display_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_becomes_disk_full() {
        #[cfg(unix)]
        {
            let e = io_error(Path::new("/x/blob"), std::io::Error::from_raw_os_error(28));
            assert!(matches!(e, Error::DiskFull { .. }), "{e:?}");
            assert!(e.to_string().contains("not enough disk space"), "{e}");
        }
        let e = io_error(
            Path::new("/x/blob"),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        );
        assert!(matches!(e, Error::DiskFull { .. }), "{e:?}");
        let e = io_error(
            Path::new("/x/blob"),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }

    /// A real ENOSPC from the kernel: `/dev/full` refuses every write with it.
    #[cfg(target_os = "linux")]
    #[test]
    fn dev_full_is_disk_full() {
        use std::io::Write;
        let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let err = f
            .write_all(&[0u8; 4096])
            .and_then(|_| f.flush())
            .expect_err("/dev/full accepts no data");
        assert!(matches!(
            io_error(Path::new("/dev/full"), err),
            Error::DiskFull { .. }
        ));
    }

    #[test]
    fn urls_lose_their_signature() {
        let u = reqwest::Url::parse("https://user:pw@cdn.example/x/y?X-Amz-Signature=abc#f")
            .expect("url");
        assert_eq!(display_url(&u), "https://cdn.example/x/y");
    }

    #[test]
    fn token_messages_say_what_to_do() {
        let e = Error::Unauthorized {
            repo_id: "meta-llama/Llama-3.2-1B".into(),
            status: 401,
            token_sent: false,
        };
        assert!(e.to_string().contains("needs a Hugging Face token"), "{e}");
        let e = Error::Unauthorized {
            repo_id: "meta-llama/Llama-3.2-1B".into(),
            status: 403,
            token_sent: true,
        };
        assert!(e.to_string().contains("token is invalid"), "{e}");
    }
}
