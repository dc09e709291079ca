//! The fake Hugging Face hub of `tptt_hub::testing` as a program, for the app's end-to-end test
//! (`tests/e2e/run`): serves folders as hub repositories on 127.0.0.1 until it is killed, or
//! until `--exit-after` seconds have passed (a safety net: it never outlives a test run).
//!
//! ```text
//! cargo run -p tptt-hub --features testing --example fake_hub -- \
//!     --repo owner/name=DIR [--repo ...] [--slow PATH=MS] [--url-file FILE] [--exit-after SECS]
//! ```
//!
//! Every file under `DIR` is served (`*.safetensors` as LFS files, through the fake CDN). `--slow`
//! sends the file at `PATH` (within its repository) in 8 KiB pieces with `MS` milliseconds
//! between them, so that a download takes long enough for its progress to be seen. The hub's URL
//! (the value for `HF_ENDPOINT`) is printed on stdout and, with `--url-file`, written to that file
//! once the listeners are up.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tptt_hub::testing::{FakeHub, FakeRepo, Faults};

struct Args {
    repos: Vec<(String, PathBuf)>,
    slow: Option<(String, Duration)>,
    url_file: Option<PathBuf>,
    exit_after: Duration,
}

const USAGE: &str =
    "usage: fake_hub --repo owner/name=DIR [--repo ...] [--slow PATH=MS] [--url-file FILE] [--exit-after SECS]";

fn parse() -> Result<Args, String> {
    let mut args = Args {
        repos: Vec::new(),
        slow: None,
        url_file: None,
        exit_after: Duration::from_secs(3600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--repo" => {
                let v = value()?;
                let (id, dir) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--repo {v}: expected owner/name=DIR"))?;
                let dir = PathBuf::from(dir);
                if !dir.is_dir() {
                    return Err(format!("--repo {v}: {} is not a folder", dir.display()));
                }
                args.repos.push((id.to_string(), dir));
            }
            "--slow" => {
                let v = value()?;
                let (path, ms) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--slow {v}: expected PATH=MS"))?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("--slow {v}: MS must be a whole number"))?;
                args.slow = Some((path.to_string(), Duration::from_millis(ms)));
            }
            "--url-file" => args.url_file = Some(PathBuf::from(value()?)),
            "--exit-after" => {
                let v = value()?;
                args.exit_after = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--exit-after {v}: seconds expected"))?,
                );
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if args.repos.is_empty() {
        return Err(format!("no --repo given\n{USAGE}"));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake_hub: {e}");
            return ExitCode::from(2);
        }
    };
    let repos: Vec<FakeRepo> = args
        .repos
        .iter()
        .map(|(id, dir)| FakeRepo::from_dir(id, dir))
        .collect();
    for r in &repos {
        eprintln!(
            "fake_hub: serving {} ({} files, commit {})",
            r.id,
            r.files.len(),
            r.commit
        );
    }
    let hub = FakeHub::start(repos, None);
    if let Some(slow) = args.slow {
        hub.set_faults(Faults {
            slow: Some(slow),
            ..Default::default()
        });
    }
    println!("{}", hub.url);
    if let Some(f) = &args.url_file {
        // Written whole, then renamed: a reader never sees half a URL.
        let tmp = f.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, format!("{}\n", hub.url)).and_then(|()| std::fs::rename(&tmp, f))
        {
            eprintln!("fake_hub: cannot write {}: {e}", f.display());
            return ExitCode::FAILURE;
        }
    }
    std::thread::sleep(args.exit_after);
    eprintln!(
        "fake_hub: --exit-after reached, {} requests served",
        hub.log().len()
    );
    ExitCode::SUCCESS
}
