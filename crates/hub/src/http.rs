//! The hub's HTTP protocol, as `huggingface_hub` speaks it.
//!
//! - Listing: `GET {endpoint}/api/models/{repo_id}/revision/{revision}?blobs=true` returns JSON
//!   with `sha` (the commit) and `siblings`: `{rfilename, size, blobId, lfs: {sha256, size}}`;
//!   read up to [`crate::MAX_LISTING_BYTES`], refused past it ([`read_capped`]).
//! - File metadata: `HEAD {endpoint}/{repo_id}/resolve/{commit}/{path}` without following
//!   redirects to other origins. A small file answers 200 with `ETag` (its git blob id),
//!   `Content-Length` and `X-Repo-Commit`; an LFS file answers 302 to a CDN with
//!   `X-Linked-Etag` (its SHA-256), `X-Linked-Size` and `X-Repo-Commit`. Same-origin redirects
//!   (a renamed repository) are followed.
//! - Content: `GET` of the resolved URL with `Range: bytes={from}-` when resuming; 206 with
//!   `Content-Range: bytes {from}-{last}/{size}` continues, 200 means the server sent it all.
//! - Errors: the status, refined by the hub's `X-Error-Code` header (`RepoNotFound`,
//!   `RevisionNotFound`, `EntryNotFound`, `GatedRepo`).
//!
//! Redirects are followed by hand so that `Authorization` goes to the endpoint's origin only.

use std::io::Read;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LOCATION, RANGE,
};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use crate::error::{display_url, network, Error, Result};
use crate::{RepoFile, RepoInfo};

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 10;

/// A connected client for one endpoint.
#[derive(Clone)]
pub(crate) struct Http {
    client: Client,
    endpoint: Url,
    /// Prepared, marked sensitive so that no `Debug` of a request shows it.
    auth: Option<HeaderValue>,
}

/// What a `HEAD` on a resolve URL says about a file.
#[derive(Debug, Clone)]
pub(crate) struct FileMeta {
    /// Blob name: `X-Linked-Etag` or `ETag`, without quotes or `W/`.
    pub etag: String,
    /// `X-Linked-Size` or `Content-Length`.
    pub size: u64,
    /// Where the bytes are (the CDN for LFS files, else the resolve URL).
    pub download_url: Url,
}

/// The part of the hub's repo JSON we use.
#[derive(Deserialize)]
struct RawRepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<RawSibling>,
    #[serde(default)]
    gated: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<RawLfs>,
}

#[derive(Deserialize)]
struct RawLfs {
    sha256: Option<String>,
    size: Option<u64>,
}

impl Http {
    pub(crate) fn new(endpoint: &str, token: Option<&str>) -> Result<Self> {
        let bad = |message: String| Error::InvalidEndpoint {
            endpoint: endpoint.to_string(),
            message,
        };
        let mut parsed =
            Url::parse(endpoint.trim_end_matches('/')).map_err(|e| bad(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
            return Err(bad("expected an http:// or https:// URL".into()));
        }
        // Keep a path prefix (mirrors under /hf/), with no trailing slash: URLs are built as
        // `{endpoint}/...`.
        let path = parsed.path().trim_end_matches('/').to_string();
        parsed.set_path(&path);
        let auth = match token.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    bad("the token contains characters not allowed in an HTTP header".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut headers = HeaderMap::new();
        // Sizes must be the file's, not a compressed transfer's.
        headers.insert(
            reqwest::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let client = Client::builder()
            .user_agent(concat!("tptt-hub/", env!("CARGO_PKG_VERSION"), "; rust"))
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(20))
            // In the blocking client this bounds each wait (headers, then each read), not the
            // whole transfer: it is a stall timeout.
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| bad(format!("cannot start the HTTP client: {e}")))?;
        Ok(Self {
            client,
            endpoint: parsed,
            auth,
        })
    }

    pub(crate) fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    pub(crate) fn has_token(&self) -> bool {
        self.auth.is_some()
    }

    fn url(&self, tail: &str) -> Result<Url> {
        let s = format!("{}{}", self.endpoint.as_str().trim_end_matches('/'), tail);
        Url::parse(&s).map_err(|e| Error::Protocol {
            url: s.clone(),
            message: format!("bad URL: {e}"),
        })
    }

    /// `{endpoint}/{repo_id}/resolve/{revision}/{path}`.
    pub(crate) fn resolve_url(&self, repo_id: &str, revision: &str, path: &str) -> Result<Url> {
        self.url(&format!(
            "/{repo_id}/resolve/{}/{}",
            encode(revision, false),
            encode(path, true)
        ))
    }

    /// A request; the token goes only to the endpoint's own origin.
    fn request(&self, method: Method, url: &Url) -> RequestBuilder {
        let mut rb = self.client.request(method, url.clone());
        if let Some(auth) = &self.auth {
            if url.origin() == self.endpoint.origin() {
                rb = rb.header(AUTHORIZATION, auth.clone());
            }
        }
        rb
    }

    fn send(&self, rb: RequestBuilder, url: &Url) -> Result<Response> {
        rb.send().map_err(|e| network(url, &e.without_url()))
    }

    /// Send, following redirects; `same_origin_only` stops at the first redirect to another
    /// origin and returns that 3xx response (its headers carry the LFS metadata).
    fn send_following(
        &self,
        method: Method,
        mut url: Url,
        range_from: u64,
        same_origin_only: bool,
    ) -> Result<(Response, Url)> {
        for _ in 0..MAX_REDIRECTS {
            let mut rb = self.request(method.clone(), &url);
            if range_from > 0 {
                rb = rb.header(RANGE, format!("bytes={range_from}-"));
            }
            let resp = self.send(rb, &url)?;
            if !resp.status().is_redirection() {
                return Ok((resp, url));
            }
            let next = location(&resp, &url)?;
            if same_origin_only && next.origin() != url.origin() {
                return Ok((resp, url));
            }
            url = next;
        }
        Err(Error::Protocol {
            url: display_url(&url),
            message: "too many redirects".into(),
        })
    }

    /// List a repository at `revision` (see the module doc).
    pub(crate) fn repo_info(&self, repo_id: &str, revision: &str) -> Result<RepoInfo> {
        let url = self.url(&format!(
            "/api/models/{repo_id}/revision/{}?blobs=true",
            encode(revision, false)
        ))?;
        let (resp, url) = self.send_following(Method::GET, url, 0, true)?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, &url, repo_id, revision, None));
        }
        let body = read_capped(resp, &url, crate::MAX_LISTING_BYTES, "a repository listing")?;
        let raw: RawRepoInfo = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
            url: display_url(&url),
            message: format!("repository JSON: {e}"),
        })?;
        let commit_sha = raw
            .sha
            .filter(|s| is_safe_name(s))
            .ok_or_else(|| Error::Protocol {
                url: display_url(&url),
                message: "no usable \"sha\" (commit) in the repository JSON".into(),
            })?;
        let mut files = Vec::with_capacity(raw.siblings.len());
        for s in raw.siblings {
            if !is_safe_repo_path(&s.rfilename) {
                // A path that could escape the cache folder is never written; it is not a file
                // the app needs either.
                tracing::warn!(repo_id, path = %s.rfilename, "ignoring unsafe file path in listing");
                continue;
            }
            let lfs_sha256 = s
                .lfs
                .as_ref()
                .and_then(|l| l.sha256.clone())
                .filter(|h| is_sha256(h));
            let size = s.size.or_else(|| s.lfs.as_ref().and_then(|l| l.size));
            files.push(RepoFile {
                path: s.rfilename,
                size,
                lfs_sha256,
                blob_id: s.blob_id.filter(|b| is_safe_name(b)),
            });
        }
        let gated = match &raw.gated {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => !s.is_empty(),
            _ => false,
        };
        Ok(RepoInfo {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            commit_sha,
            files,
            gated,
        })
    }

    /// `HEAD` a file at a commit (see the module doc).
    pub(crate) fn file_meta(&self, repo_id: &str, commit: &str, path: &str) -> Result<FileMeta> {
        let url = self.resolve_url(repo_id, commit, path)?;
        let (resp, url) = self.send_following(Method::HEAD, url, 0, true)?;
        let status = resp.status();
        if !(status.is_success() || status.is_redirection()) {
            return Err(self.status_error(&resp, &url, repo_id, commit, Some(path)));
        }
        let h = resp.headers();
        let header = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let etag = header("x-linked-etag")
            .or_else(|| h.get(ETAG).and_then(|v| v.to_str().ok()))
            .map(normalize_etag)
            .ok_or_else(|| Error::Protocol {
                url: display_url(&url),
                message: "no ETag header".into(),
            })?;
        if !is_safe_name(&etag) {
            return Err(Error::Protocol {
                url: display_url(&url),
                message: format!("unusable ETag {etag:?}"),
            });
        }
        let size = header("x-linked-size")
            .or_else(|| h.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Protocol {
                url: display_url(&url),
                message: "no file size (X-Linked-Size / Content-Length)".into(),
            })?;
        if let Some(c) = header("x-repo-commit") {
            if c != commit {
                tracing::debug!(
                    repo_id,
                    path,
                    served = c,
                    listed = commit,
                    "X-Repo-Commit differs from the listed commit"
                );
            }
        }
        let download_url = if status.is_redirection() {
            location(&resp, &url)?
        } else {
            url
        };
        Ok(FileMeta {
            etag,
            size,
            download_url,
        })
    }

    /// `GET` file content from byte `from` on. Returns the response (status checked: 200, 206
    /// or 416) and the final URL.
    pub(crate) fn get_from(
        &self,
        url: &Url,
        from: u64,
        repo_id: &str,
        commit: &str,
        path: &str,
    ) -> Result<(Response, Url)> {
        let (resp, url) = self.send_following(Method::GET, url.clone(), from, false)?;
        let st = resp.status();
        if st.is_success() || st == StatusCode::RANGE_NOT_SATISFIABLE {
            Ok((resp, url))
        } else {
            Err(self.status_error(&resp, &url, repo_id, commit, Some(path)))
        }
    }

    /// Map a failed response to an [`Error`].
    pub(crate) fn status_error(
        &self,
        resp: &Response,
        url: &Url,
        repo_id: &str,
        revision: &str,
        path: Option<&str>,
    ) -> Error {
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let token_sent = self.has_token() && url.origin() == self.endpoint.origin();
        let not_found = |path: Option<&str>| Error::NotFound {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            path: path.map(str::to_string),
            token_sent,
        };
        match (code, status) {
            ("GatedRepo", _) => Error::Unauthorized {
                repo_id: repo_id.to_string(),
                status,
                token_sent,
            },
            ("RepoNotFound" | "RevisionNotFound", _) => not_found(None),
            ("EntryNotFound", _) => not_found(path),
            (_, 401 | 403) => Error::Unauthorized {
                repo_id: repo_id.to_string(),
                status,
                token_sent,
            },
            (_, 404) => not_found(path),
            _ => Error::Http {
                url: display_url(url),
                status,
            },
        }
    }
}

/// The body of `resp`, refused ([`Error::TooLarge`]) once longer than `limit` bytes, whatever
/// its `Content-Length` says (or whether it has one): a broken or hostile server cannot make
/// us read or allocate more.
pub(crate) fn read_capped(
    resp: Response,
    url: &Url,
    limit: u64,
    kind: &'static str,
) -> Result<Vec<u8>> {
    let too_large = || Error::TooLarge {
        what: display_url(url),
        kind,
        limit,
    };
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    resp.take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|e| network(url, &e))?;
    if body.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(body)
}

/// The `Location` of a redirect, resolved against the request URL.
fn location(resp: &Response, url: &Url) -> Result<Url> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Protocol {
            url: display_url(url),
            message: "redirect without Location".into(),
        })?;
    url.join(loc).map_err(|e| Error::Protocol {
        url: display_url(url),
        message: format!("bad Location: {e}"),
    })
}

/// `Content-Range: bytes {start}-{end}/{total}` → `start`.
pub(crate) fn content_range_start(resp: &Response) -> Option<u64> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

/// `W/"abc"` → `abc`.
pub(crate) fn normalize_etag(v: &str) -> String {
    let v = v.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"').to_string()
}

/// Percent-encode for a URL path; `/` kept only when `keep_slash` (file paths, not revisions).
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/');
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A name safe as one file name in the cache (blob names, commit ids).
pub(crate) fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A repository file path that stays inside a snapshot folder: relative, `/`-separated,
/// no empty, `.` or `..` component, no backslash or NUL.
pub(crate) fn is_safe_repo_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && !p.contains(':')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// 64 hex digits.
pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalized() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag(" abc "), "abc");
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(encode("refs/pr/2", false), "refs%2Fpr%2F2");
        assert_eq!(encode("a b/c#d.json", true), "a%20b/c%23d.json");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for p in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "C:/x",
            "a\\b",
            "",
        ] {
            assert!(!is_safe_repo_path(p), "{p:?}");
        }
        for p in [
            "config.json",
            "v1/adapter_model.safetensors",
            ".gitattributes",
            "a/.b/c",
        ] {
            assert!(is_safe_repo_path(p), "{p:?}");
        }
        assert!(!is_safe_name("../x"));
        assert!(!is_safe_name(".."));
        assert!(is_safe_name("0123abcdef"));
    }

    #[test]
    fn endpoint_must_be_http() {
        assert!(matches!(
            Http::new("ftp://x", None),
            Err(Error::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            Http::new("not a url", None),
            Err(Error::InvalidEndpoint { .. })
        ));
        let h = Http::new("http://127.0.0.1:9/hf/", None).expect("valid endpoint");
        assert_eq!(
            h.resolve_url("o/n", "main", "a b.json")
                .expect("url")
                .as_str(),
            "http://127.0.0.1:9/hf/o/n/resolve/main/a%20b.json"
        );
    }
}
