//! A fake Hugging Face hub on 127.0.0.1, for tests (this crate's, and the desktop app's):
//! enabled by the `testing` cargo feature, never part of a release build. Two listeners, the
//! hub itself and a "CDN" on another port (another origin, as LFS redirects go to another host),
//! speaking the URL paths and headers of the real hub:
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}?blobs=true`: JSON with `sha` and `siblings`
//!   (`rfilename`, `size`, `blobId`, `lfs: {sha256, size, pointerSize}`);
//! - `HEAD|GET /{org}/{name}/resolve/{rev}/{path}`: small files 200/206 with `ETag`,
//!   `X-Repo-Commit`, `Content-Length`, `Content-Range`; LFS files 302 to the CDN with
//!   `X-Linked-Etag`, `X-Linked-Size`, `X-Repo-Commit`;
//! - CDN `GET /lfs/{sha256}` with `Range` → 206 + `Content-Range`;
//! - errors with `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
//!   `GatedRepo`).
//!
//! Every request is logged; faults (dropped connection, corrupt bytes, a lying size, slow
//! bodies, bodies that never end, padded listings) are injected per file path or repository. Requests per test are few and bounded; the accept
//! threads end with the test process. Being test scaffolding, it panics on setup failures
//! (a port that cannot be bound, an unreadable fixture) instead of returning errors.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The TPTT repository of the tests.
pub const REPO: &str = "tptt-org/Titans-Tiny";
/// Its base model.
pub const BASE: &str = "base-org/Tiny-Base";
pub const SHARD1: &str = "model-00001-of-00002.safetensors";
pub const SHARD2: &str = "model-00002-of-00002.safetensors";
pub const ADAPTER_A: &str = "liza-a/adapter_model.safetensors";

/// One file of a fake repository.
#[derive(Clone)]
pub struct FakeFile {
    pub path: String,
    pub bytes: Vec<u8>,
    /// Stored with Git LFS: served through the CDN, `X-Linked-Etag` = SHA-256.
    pub lfs: bool,
}

/// A fake repository.
#[derive(Clone)]
pub struct FakeRepo {
    pub id: String,
    pub commit: String,
    pub files: Vec<FakeFile>,
    /// Resolve needs `Authorization: Bearer {token}`.
    pub gated: bool,
}

impl FakeRepo {
    pub fn file(&self, path: &str) -> &FakeFile {
        self.files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("fixture has no {path}"))
    }

    /// A repository holding every file under `dir` (recursively, `/`-separated paths, sorted);
    /// `*.safetensors` files are served as LFS files. The commit is derived from `id`.
    pub fn from_dir(id: &str, dir: &std::path::Path) -> Self {
        fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<FakeFile>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .map(|e| e.expect("directory entry").path())
                .collect();
            entries.sort();
            for p in entries {
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).expect("under root");
                    let path = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/");
                    let bytes = std::fs::read(&p)
                        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
                    out.push(FakeFile {
                        lfs: path.ends_with(".safetensors"),
                        path,
                        bytes,
                    });
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, dir, &mut files);
        FakeRepo {
            id: id.into(),
            commit: sha256_hex(format!("commit of {id}").as_bytes())[..40].to_string(),
            files,
            gated: false,
        }
    }

    /// The file at `path`, for changing it before the hub starts.
    pub fn file_mut(&mut self, path: &str) -> &mut FakeFile {
        self.files
            .iter_mut()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("fixture has no {path}"))
    }
}

/// Faults, per file path (within its repository).
#[derive(Default, Clone)]
pub struct Faults {
    /// `(path, n, times)`: send the headers of the full answer, then only `n` body bytes,
    /// then close the connection; `times` times.
    pub drop_after: Option<(String, usize, usize)>,
    /// Serve these files with one byte flipped.
    pub corrupt: Vec<String>,
    /// `(path, size)`: announce this size in `X-Linked-Size` / `Content-Length` of `HEAD`.
    pub lie_size: Option<(String, u64)>,
    /// `(path, pause)`: send the body in 8 KiB pieces with a pause after each.
    pub slow: Option<(String, Duration)>,
    /// Answer `GET`s of this file with a body that never ends: no `Content-Length`, filler
    /// bytes until the client hangs up (or [`ENDLESS_CAP`] bytes, so the server thread ends).
    pub endless: Option<String>,
    /// Answer the listing of this repository with a body that never ends (as `endless`).
    pub endless_listing: Option<String>,
    /// `(repo id, n)`: pad the listing of this repository with `n` spaces (still valid JSON,
    /// `Content-Length` announced).
    pub listing_padding: Option<(String, usize)>,
}

/// What an endless body sends at most before the server gives up on it.
pub const ENDLESS_CAP: usize = 1 << 30;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    /// `"hub"` or `"cdn"`.
    pub server: &'static str,
    pub method: String,
    pub target: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    /// Body bytes the answer carries (fewer when a fault cuts it).
    pub body_bytes: usize,
    pub status: u16,
}

struct State {
    repos: Vec<FakeRepo>,
    token: Option<String>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Logged>>,
    cdn_base: String,
}

/// A running fake hub.
pub struct FakeHub {
    /// The hub endpoint, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    state: Arc<State>,
}

impl FakeHub {
    /// Serve `repos`; gated repositories accept `token`.
    pub fn start(repos: Vec<FakeRepo>, token: Option<&str>) -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind hub");
        let cdn = TcpListener::bind("127.0.0.1:0").expect("bind cdn");
        let url = format!(
            "http://127.0.0.1:{}",
            hub.local_addr().expect("addr").port()
        );
        let cdn_base = format!(
            "http://127.0.0.1:{}",
            cdn.local_addr().expect("addr").port()
        );
        let state = Arc::new(State {
            repos,
            token: token.map(str::to_string),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            cdn_base,
        });
        for (listener, server) in [(hub, "hub"), (cdn, "cdn")] {
            let state = state.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = state.clone();
                    std::thread::spawn(move || serve(stream, &state, server));
                }
            });
        }
        Self { url, state }
    }

    /// The standard fixture: [`tptt_repo`] and [`base_repo`].
    pub fn standard() -> Self {
        Self::start(vec![tptt_repo(), base_repo(false)], None)
    }

    pub fn set_faults(&self, f: Faults) {
        *self.state.faults.lock().expect("faults lock") = f;
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().expect("log lock").clone()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().expect("log lock").clear();
    }

    pub fn repo(&self, id: &str) -> &FakeRepo {
        self.state
            .repos
            .iter()
            .find(|r| r.id == id)
            .expect("fixture repo")
    }
}

/// Deterministic filler bytes.
pub fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A stand-in for a git blob id: 40 hex digits derived from the content.
fn blob_id(b: &[u8]) -> String {
    sha256_hex(&[b"blob ".as_slice(), b].concat())[..40].to_string()
}

fn small(path: &str, text: &str) -> FakeFile {
    FakeFile {
        path: path.into(),
        bytes: text.as_bytes().to_vec(),
        lfs: false,
    }
}

fn lfs(path: &str, seed: u64, len: usize) -> FakeFile {
    FakeFile {
        path: path.into(),
        bytes: filler(seed, len),
        lfs: true,
    }
}

/// Two variants (one with `model_type: "tptt"`, one with only `base_model_name`), a folder
/// whose config is not TPTT, and files a loader does not need.
pub fn tptt_repo() -> FakeRepo {
    FakeRepo {
        id: REPO.into(),
        commit: sha256_hex(b"tptt commit 1")[..40].to_string(),
        gated: false,
        files: vec![
            small(
                ".gitattributes",
                "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            ),
            small("README.md", "# Titans-Tiny\n"),
            small("modeling_tptt.py", "# code\n"),
            small(
                "tokenizer.json",
                r#"{"version":"1.0","model":{"type":"BPE"}}"#,
            ),
            small(
                "liza-a/config.json",
                &format!(
                    r#"{{"model_type":"tptt","base_model_name":"{BASE}","operator_mode":"delta_rule","lora_config":{{"r":4}}}}"#
                ),
            ),
            lfs(ADAPTER_A, 11, 96 * 1024),
            small("liza-a/README.md", "# variant a\n"),
            small(
                "liza-a/tokenizer_config.json",
                r#"{"model_max_length":2048}"#,
            ),
            small(
                "liza-b/config.json",
                &format!(r#"{{"base_model_name":"{BASE}","operator_mode":"delta_product"}}"#),
            ),
            lfs("liza-b/adapter_model.safetensors", 12, 64 * 1024),
            small("notes/config.json", r#"{"model_type":"llama"}"#),
            small("docs/guide.md", "nothing\n"),
        ],
    }
}

/// A base with a sharded index, plus files that must not be downloaded.
pub fn base_repo(gated: bool) -> FakeRepo {
    let index = format!(
        r#"{{"metadata":{{"total_size":512000}},"weight_map":{{"a.weight":"{SHARD1}","b.weight":"{SHARD2}","c.weight":"{SHARD1}"}}}}"#
    );
    FakeRepo {
        id: BASE.into(),
        commit: sha256_hex(b"base commit 1")[..40].to_string(),
        gated,
        files: vec![
            small(
                "config.json",
                r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1}"#,
            ),
            small("generation_config.json", r#"{"eos_token_id":2}"#),
            small(
                "tokenizer.json",
                r#"{"version":"1.0","model":{"type":"BPE","base":true}}"#,
            ),
            small("tokenizer_config.json", r#"{"bos_token":"<s>"}"#),
            small("special_tokens_map.json", r#"{"bos_token":"<s>"}"#),
            small("model.safetensors.index.json", &index),
            lfs(SHARD1, 21, 300 * 1024),
            lfs(SHARD2, 22, 200 * 1024),
            lfs("consolidated.safetensors", 23, 50 * 1024),
            small("original/params.json", "{}"),
        ],
    }
}

/// The files `download_variant(REPO, "liza-a")` must fetch, as `(repo, path)`.
pub fn liza_a_plan() -> Vec<(&'static str, &'static str)> {
    vec![
        (REPO, "liza-a/config.json"),
        (REPO, ADAPTER_A),
        (REPO, "liza-a/tokenizer_config.json"),
        (REPO, "tokenizer.json"),
        (BASE, "config.json"),
        (BASE, "generation_config.json"),
        (BASE, "tokenizer.json"),
        (BASE, "tokenizer_config.json"),
        (BASE, "special_tokens_map.json"),
        (BASE, "model.safetensors.index.json"),
        (BASE, SHARD1),
        (BASE, SHARD2),
    ]
}

// ---- the server ----

struct Req {
    method: String,
    target: String,
    headers: HashMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Option<Req> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some(Req {
        method,
        target,
        headers,
    })
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Fault: send only this many body bytes, then close.
    cut_at: Option<usize>,
    /// Fault: pause after each 8 KiB.
    pause: Option<Duration>,
    /// Fault: no `Content-Length`, filler bytes after `body` until the client hangs up.
    endless: bool,
}

impl Answer {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
            pause: None,
            endless: false,
        }
    }
    fn header(mut self, k: &str, v: impl ToString) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    fn error(status: u16, code: &str) -> Self {
        Self::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", code)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

fn serve(mut stream: TcpStream, state: &State, server: &'static str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(req) = read_request(&stream) else {
        return;
    };
    let answer = if server == "hub" {
        route_hub(&req, state)
    } else {
        route_cdn(&req, state)
    };
    let head_only = req.method == "HEAD";
    let mut head = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
    let is_len = |k: &str| k.eq_ignore_ascii_case("content-length");
    let has_len = answer.headers.iter().any(|(k, _)| is_len(k));
    for (k, v) in &answer.headers {
        // An endless body has no length: it ends when the connection does.
        if !(answer.endless && is_len(k)) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if !has_len && !answer.endless {
        head.push_str(&format!("Content-Length: {}\r\n", answer.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let end = if head_only {
        0
    } else {
        answer
            .cut_at
            .unwrap_or(answer.body.len())
            .min(answer.body.len())
    };
    // Logged before answering: the client may act on the answer before this thread runs on.
    state.log.lock().expect("log lock").push(Logged {
        server,
        method: req.method.clone(),
        target: req.target.clone(),
        range: req.headers.get("range").cloned(),
        authorization: req.headers.get("authorization").cloned(),
        body_bytes: end,
        status: answer.status,
    });
    let mut sent = 0usize;
    let _ = stream.write_all(head.as_bytes());
    if !head_only {
        let piece = if answer.pause.is_some() {
            8 * 1024
        } else {
            64 * 1024
        };
        while sent < end {
            let n = piece.min(end - sent);
            if stream.write_all(&answer.body[sent..sent + n]).is_err() {
                break;
            }
            sent += n;
            if let Some(p) = answer.pause {
                let _ = stream.flush();
                std::thread::sleep(p);
            }
        }
        if answer.endless {
            let more = filler(7, 64 * 1024);
            while sent < ENDLESS_CAP && stream.write_all(&more).is_ok() {
                sent += more.len();
            }
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn route_hub(req: &Req, state: &State) -> Answer {
    let (path, _query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo_id, rev)) = rest.split_once("/revision/") else {
            return Answer::new(400);
        };
        return api_revision(state, repo_id, rev);
    }
    let Some((repo_id, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return Answer::new(404);
    };
    let Some((rev, file_path)) = rest.split_once('/') else {
        return Answer::new(404);
    };
    resolve(req, state, repo_id, rev, &percent_decode(file_path))
}

fn find_repo<'a>(state: &'a State, repo_id: &str) -> Option<&'a FakeRepo> {
    state.repos.iter().find(|r| r.id == repo_id)
}

fn api_revision(state: &State, repo_id: &str, rev: &str) -> Answer {
    // Like the real hub without a token: an unknown repository is a 401 RepoNotFound.
    let Some(repo) = find_repo(state, repo_id) else {
        return Answer::error(401, "RepoNotFound");
    };
    if rev != "main" && rev != repo.commit {
        return Answer::error(404, "RevisionNotFound");
    }
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|f| {
            let mut s = serde_json::json!({"rfilename": f.path, "size": f.bytes.len(), "blobId": blob_id(&f.bytes)});
            if f.lfs {
                s["lfs"] =
                    serde_json::json!({"sha256": sha256_hex(&f.bytes), "size": f.bytes.len(), "pointerSize": 134});
            }
            s
        })
        .collect();
    let body = serde_json::json!({
        "_id": "x", "id": repo.id, "modelId": repo.id, "sha": repo.commit, "private": false,
        "gated": if repo.gated { serde_json::json!("manual") } else { serde_json::json!(false) },
        "siblings": siblings,
    });
    let mut a = Answer::new(200).header("Content-Type", "application/json");
    a.body = serde_json::to_vec(&body).expect("json");
    let faults = state.faults.lock().expect("faults lock");
    if let Some((_, n)) = faults
        .listing_padding
        .as_ref()
        .filter(|(r, _)| r == repo_id)
    {
        a.body.extend(std::iter::repeat_n(b' ', *n));
    }
    if faults.endless_listing.as_deref() == Some(repo_id) {
        a.endless = true;
    }
    a
}

fn resolve(req: &Req, state: &State, repo_id: &str, rev: &str, path: &str) -> Answer {
    let Some(repo) = find_repo(state, repo_id) else {
        return Answer::error(401, "RepoNotFound");
    };
    if rev != "main" && rev != repo.commit {
        return Answer::error(404, "RevisionNotFound");
    }
    if repo.gated {
        let expected = state.token.as_ref().map(|t| format!("Bearer {t}"));
        match req.headers.get("authorization") {
            None => return Answer::error(401, "GatedRepo"),
            Some(a) if Some(a) != expected.as_ref() => return Answer::error(403, "GatedRepo"),
            Some(_) => {}
        }
    }
    let Some(file) = repo.files.iter().find(|f| f.path == path) else {
        return Answer::error(404, "EntryNotFound");
    };
    let lie = state.faults.lock().expect("faults lock").lie_size.clone();
    let announced = match &lie {
        Some((p, n)) if p == path => *n,
        _ => file.bytes.len() as u64,
    };
    if file.lfs {
        let sha = sha256_hex(&file.bytes);
        let mut a = Answer::new(302)
            .header(
                "Location",
                format!("{}/lfs/{sha}?X-Amz-Signature=sig", state.cdn_base),
            )
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", announced)
            .header("X-Repo-Commit", &repo.commit)
            .header("ETag", format!("\"{}\"", blob_id(b"pointer")));
        a.headers.push(("Content-Length".into(), "0".into()));
        return a;
    }
    let mut a = content(req, &file.bytes, path, state)
        .header("ETag", format!("\"{}\"", blob_id(&file.bytes)))
        .header("X-Repo-Commit", &repo.commit)
        .header("Accept-Ranges", "bytes");
    if req.method == "HEAD" {
        a.headers.retain(|(k, _)| k != "Content-Length");
        a.headers
            .push(("Content-Length".into(), announced.to_string()));
    }
    a
}

fn route_cdn(req: &Req, state: &State) -> Answer {
    let path = req
        .target
        .split_once('?')
        .map(|(p, _)| p)
        .unwrap_or(&req.target);
    let Some(sha) = path.strip_prefix("/lfs/") else {
        return Answer::new(404);
    };
    let found = state
        .repos
        .iter()
        .flat_map(|r| r.files.iter())
        .find(|f| f.lfs && sha256_hex(&f.bytes) == sha);
    let Some(file) = found else {
        return Answer::new(404);
    };
    content(req, &file.bytes, &file.path, state).header("ETag", format!("\"{sha}\""))
}

/// 200 or 206 for the file bytes, with the faults for `path` applied.
fn content(req: &Req, bytes: &[u8], path: &str, state: &State) -> Answer {
    let mut faults = state.faults.lock().expect("faults lock");
    let mut bytes = bytes.to_vec();
    if faults.corrupt.iter().any(|p| p == path) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let total = bytes.len();
    let start = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let mut a = match start {
        Some(s) if s >= total => {
            return Answer::new(416).header("Content-Range", format!("bytes */{total}"))
        }
        Some(s) => {
            let mut a = Answer::new(206)
                .header("Content-Range", format!("bytes {s}-{}/{total}", total - 1));
            a.body = bytes[s..].to_vec();
            a
        }
        None => {
            let mut a = Answer::new(200);
            a.body = bytes;
            a
        }
    };
    let len = a.body.len();
    a.headers.push(("Content-Length".into(), len.to_string()));
    if req.method == "GET" {
        if let Some((p, n, times)) = faults.drop_after.as_mut() {
            if p == path && *times > 0 {
                *times -= 1;
                a.cut_at = Some(*n);
            }
        }
        if let Some((p, pause)) = &faults.slow {
            if p == path {
                a.pause = Some(*pause);
            }
        }
        if faults.endless.as_deref() == Some(path) {
            a.endless = true;
        }
    }
    a
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
