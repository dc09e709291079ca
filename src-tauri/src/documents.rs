//! Documents read into a chat's memory: a text, Markdown, source code, HTML or PDF file becomes
//! the text of a user message (with the question typed beside it), and the model reads it once
//! like any message — the long prompt's progress, speed and Stop included —, past its softmax
//! window into its recurrent memory when it is long. The message records the attachment (name,
//! kind, size, where its text lies in the content), so the chat shows the attachment and not
//! the text, and a reopened chat continues from its snapshot without reading it again.
//!
//! Everything is checked before anything is stored, within seconds: a missing or unreadable
//! file, an empty one, one over [`MAX_DOCUMENT_FILE_BYTES`], a binary file (NUL bytes, not
//! UTF-8), a PDF that cannot be parsed or has no text (a scan), or text over
//! [`MAX_DOCUMENT_TEXT_BYTES`] each get a message naming the file; a PDF parser that panics or
//! takes longer than [`PDF_DEADLINE`] is one of those failures, not a crash or a hang.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tptt_store::Attachment;
use ts_rs::TS;

use crate::dto::AttachmentDto;
use crate::error::{CmdResult, CommandError, ErrorKind};

/// The largest file read.
pub const MAX_DOCUMENT_FILE_BYTES: u64 = 256 << 20;
/// The most text a document may give (with the question it must fit in a message).
pub const MAX_DOCUMENT_TEXT_BYTES: usize = crate::chat::MAX_MESSAGE_BYTES - (64 << 10);
/// How long a PDF may take to parse.
pub const PDF_DEADLINE: Duration = Duration::from_secs(60);

/// A document read from disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The file's name.
    pub name: String,
    /// `text`, `markdown`, `code`, `html` or `pdf`.
    pub kind: &'static str,
    /// The file's size.
    pub bytes: u64,
    /// Its text.
    pub text: String,
}

/// `DocumentInfo`: a document chosen to attach — where it is (sent back with the message) and
/// what its attachment will show; its text stays in the backend.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct DocumentInfo {
    /// Where it is.
    pub path: String,
    /// Its name, kind, size and characters.
    #[serde(flatten)]
    #[ts(flatten)]
    pub attachment: AttachmentDto,
}

impl DocumentInfo {
    /// The summary of `doc`, read from `path`.
    pub fn of(path: &Path, doc: &Document) -> Self {
        Self {
            path: path.display().to_string(),
            attachment: AttachmentDto {
                name: doc.name.clone(),
                kind: doc.kind.to_string(),
                bytes: doc.bytes,
                chars: doc.text.chars().count() as u64,
            },
        }
    }
}

const CODE: &[&str] = &[
    "rs",
    "py",
    "js",
    "mjs",
    "ts",
    "tsx",
    "jsx",
    "c",
    "h",
    "cc",
    "cpp",
    "hpp",
    "java",
    "kt",
    "go",
    "rb",
    "php",
    "swift",
    "cs",
    "scala",
    "lua",
    "r",
    "jl",
    "sh",
    "bash",
    "zsh",
    "ps1",
    "sql",
    "toml",
    "yaml",
    "yml",
    "json",
    "xml",
    "ini",
    "cfg",
    "css",
    "scss",
    "svelte",
    "vue",
    "tex",
    "hs",
    "ml",
    "ex",
    "exs",
    "erl",
    "dart",
    "zig",
    "nim",
    "pl",
    "m",
    "mm",
    "cmake",
    "make",
    "dockerfile",
    "gradle",
];

/// The kind of a file by its extension (`None`: unknown, judged by its bytes).
fn kind_of(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "txt" | "text" | "log" | "csv" | "tsv" | "rst" | "org" | "adoc" => "text",
        "md" | "markdown" | "mdown" => "markdown",
        "html" | "htm" | "xhtml" => "html",
        "pdf" => "pdf",
        e if CODE.contains(&e) => "code",
        _ => return None,
    })
}

fn refused(path: &Path, why: impl std::fmt::Display) -> CommandError {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    CommandError::new(ErrorKind::InvalidSettings, format!("{name}: {why}"))
}

/// Reads `path` as a document (module doc): its text, or a clear refusal.
pub fn read(path: &Path) -> CmdResult<Document> {
    let meta =
        std::fs::metadata(path).map_err(|e| refused(path, format!("cannot be read ({e})")))?;
    if !meta.is_file() {
        return Err(refused(path, "is not a file"));
    }
    if meta.len() == 0 {
        return Err(refused(path, "is empty"));
    }
    if meta.len() > MAX_DOCUMENT_FILE_BYTES {
        return Err(refused(
            path,
            format!(
                "is {} MiB; documents of at most {} MiB can be read",
                meta.len() >> 20,
                MAX_DOCUMENT_FILE_BYTES >> 20
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| refused(path, format!("cannot be read ({e})")))?;
    let kind = kind_of(path);
    let (kind, text) = match kind {
        Some("pdf") => ("pdf", pdf_text(path, bytes)?),
        Some(k) => (k, utf8_text(path, bytes)?),
        None if bytes.starts_with(b"%PDF-") => ("pdf", pdf_text(path, bytes)?),
        None => ("text", utf8_text(path, bytes)?),
    };
    let text = if kind == "html" {
        html_text(&text)
    } else {
        text
    };
    if text.trim().is_empty() {
        return Err(refused(
            path,
            if kind == "pdf" {
                "has no text to read (a scanned PDF holds images of pages)"
            } else {
                "has no text to read"
            },
        ));
    }
    if text.len() > MAX_DOCUMENT_TEXT_BYTES {
        return Err(refused(
            path,
            format!(
                "gives {:.1} MiB of text; at most {:.1} MiB can be read at once — split it, the memory keeps what it has read",
                text.len() as f64 / (1 << 20) as f64,
                MAX_DOCUMENT_TEXT_BYTES as f64 / (1 << 20) as f64
            ),
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Document {
        name,
        kind,
        bytes: meta.len(),
        text,
    })
}

/// The text of a text file: UTF-8 (a BOM dropped), no NUL bytes.
fn utf8_text(path: &Path, bytes: Vec<u8>) -> CmdResult<String> {
    if bytes.contains(&0) {
        return Err(refused(path, "is a binary file, not text"));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| {
        refused(
            path,
            "is not UTF-8 text (a binary file, or another encoding)",
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..3);
    }
    Ok(text.replace("\r\n", "\n"))
}

/// The text of a PDF, parsed on its own thread: a panic or a parse past [`PDF_DEADLINE`] is a
/// refusal (the thread of a parse that hangs is left to finish on its own).
fn pdf_text(path: &Path, bytes: Vec<u8>) -> CmdResult<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("pdf-text".into())
        .spawn(move || {
            let out = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(&bytes));
            let _ = tx.send(out);
        });
    if let Err(e) = spawned {
        return Err(CommandError::internal("Cannot start reading the PDF", e));
    }
    match rx.recv_timeout(PDF_DEADLINE) {
        Ok(Ok(Ok(text))) => Ok(text),
        Ok(Ok(Err(e))) => Err(refused(
            path,
            format!("is not a PDF that can be read ({e})"),
        )),
        Ok(Err(_)) => {
            tracing::warn!(path = %path.display(), "the PDF parser panicked");
            Err(refused(
                path,
                "is a PDF its reader could not parse (it may be damaged)",
            ))
        }
        Err(_) => Err(refused(
            path,
            format!(
                "is a PDF that took longer than {} s to read",
                PDF_DEADLINE.as_secs()
            ),
        )),
    }
}

/// The text of an HTML page: what is inside `script`, `style` and comments goes, tags become
/// line breaks where they break lines, entities are decoded, blank lines go.
pub fn html_text(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len() / 2);
    let mut i = 0;
    while i < html.len() {
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(rest.len(), |e| e + 3);
        } else if rest.starts_with("<script") || rest.starts_with("<style") {
            let close = if rest.starts_with("<script") {
                "</script"
            } else {
                "</style"
            };
            let end = rest.find(close).map_or(rest.len(), |e| e + close.len());
            let after = lower[i + end..]
                .find('>')
                .map_or(lower.len() - i - end, |g| g + 1);
            i += end + after;
        } else if rest.starts_with('<') {
            let end = rest.find('>').map_or(rest.len(), |e| e + 1);
            let tag = &rest[1..end.saturating_sub(1).max(1)];
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if matches!(
                name.as_str(),
                "p" | "br"
                    | "div"
                    | "li"
                    | "tr"
                    | "h1"
                    | "h2"
                    | "h3"
                    | "h4"
                    | "h5"
                    | "h6"
                    | "pre"
                    | "blockquote"
                    | "section"
                    | "article"
                    | "table"
                    | "ul"
                    | "ol"
            ) {
                out.push('\n');
            }
            i += end;
        } else {
            let next = rest.find('<').unwrap_or(rest.len());
            out.push_str(&decode_entities(&html[i..i + next]));
            i += next;
        }
    }
    let lines: Vec<&str> = out
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines.join("\n").trim().to_string()
}

/// `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&#39;`, `&nbsp;` and numeric references.
fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let end = rest.find(';').filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                n if n.starts_with("#x") || n.starts_with("#X") => u32::from_str_radix(&n[2..], 16)
                    .ok()
                    .and_then(char::from_u32),
                n if n.starts_with('#') => n[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The content of a message carrying `doc` with `question` (the question after the document),
/// and its attachment record.
pub fn message_content(doc: &Document, question: &str) -> (String, Attachment) {
    let name = doc.name.replace('"', "'");
    let block = format!(
        "<document name=\"{name}\">\n{}\n</document>",
        doc.text.trim_end()
    );
    let question = question.trim();
    let content = if question.is_empty() {
        block.clone()
    } else {
        format!("{block}\n\n{question}")
    };
    let attachment = Attachment {
        name: doc.name.clone(),
        kind: doc.kind.to_string(),
        bytes: doc.bytes,
        start: 0,
        end: block.len(),
    };
    (content, attachment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_loses_its_markup_scripts_and_entities() {
        let html = "<html><head><style>p{color:red}</style><script>alert('x<y')</script></head>\
            <body><h1>Title &amp; more</h1><!-- hidden --><p>One&nbsp;two &lt;b&gt; &#233;&#x263A;</p>\
            <ul><li>a</li><li>b</li></ul>&unknown; & done</body></html>";
        assert_eq!(
            html_text(html),
            "Title & more\nOne two <b> é☺\na\nb\n&unknown; & done"
        );
        assert_eq!(html_text("<p>unclosed <b"), "unclosed");
        assert_eq!(html_text("<script>never closed"), "");
    }

    #[test]
    fn a_message_holds_the_document_then_the_question() {
        let doc = Document {
            name: "a \"b\".md".into(),
            kind: "markdown",
            bytes: 12,
            text: "# Notes\nline\n".into(),
        };
        let (content, a) = message_content(&doc, "  What is it?  ");
        assert_eq!(
            content,
            "<document name=\"a 'b'.md\">\n# Notes\nline\n</document>\n\nWhat is it?"
        );
        assert_eq!(
            &content[a.start..a.end],
            "<document name=\"a 'b'.md\">\n# Notes\nline\n</document>"
        );
        assert!(a.fits(&content));
        let (alone, a) = message_content(&doc, "");
        assert_eq!(a.end, alone.len());
    }

    #[test]
    fn bad_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("dir");
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let cases = [
            (write("empty.txt", b""), "empty.txt: is empty"),
            (write("blank.md", b"  \n\n "), "blank.md: has no text"),
            (
                write("bin.dat", &[0x7f, 0x45, 0x4c, 0x46, 0, 1, 2]),
                "bin.dat: is a binary file",
            ),
            (
                write("latin.txt", &[0x63, 0x61, 0x66, 0xe9]),
                "latin.txt: is not UTF-8",
            ),
            (
                write("fake.pdf", b"%PDF-1.4 garbage that is no pdf"),
                "fake.pdf: is ",
            ),
            (dir.path().join("absent.txt"), "absent.txt: cannot be read"),
            (dir.path().to_path_buf(), "is not a file"),
        ];
        for (path, says) in cases {
            let e = read(&path).expect_err("refused");
            assert_eq!(e.kind, ErrorKind::InvalidSettings, "{}", e.message);
            assert!(e.message.contains(says), "{} — {}", e.message, says);
        }
        let ok = read(&write("notes.md", "\u{feff}# Hi\r\nthere ✓".as_bytes())).expect("read");
        assert_eq!(
            (ok.kind, ok.text.as_str(), ok.bytes),
            ("markdown", "# Hi\nthere ✓", 18)
        );
        let code = read(&write("main.rs", b"fn main() {}")).expect("read");
        assert_eq!(code.kind, "code");
        let big = write("big.txt", &vec![b'a'; MAX_DOCUMENT_TEXT_BYTES + 1]);
        let e = read(&big).expect_err("too much text");
        assert!(e.message.contains("MiB of text"), "{}", e.message);
    }
}
