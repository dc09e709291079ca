//! `tptt-hub` against a fake hub on 127.0.0.1 (tests/common): listing, variant discovery,
//! downloads with progress, reuse, resume, verification, cancellation, tokens, offline lookup.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{FakeHub, Faults, ADAPTER_A, BASE, REPO, SHARD1, SHARD2};
use tptt_hub::{Error, Hub, HubConfig, LocalVariant, Progress, ProgressKind};

fn hub_for(fake: &FakeHub, cache: &Path) -> Hub {
    Hub::new(HubConfig::new(fake.url.clone(), cache)).expect("hub")
}

fn repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

fn blobs(cache: &Path, repo_id: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo_dir(cache, repo_id).join("blobs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn snapshot_file(cache: &Path, fake: &FakeHub, repo_id: &str, path: &str) -> PathBuf {
    repo_dir(cache, repo_id)
        .join("snapshots")
        .join(&fake.repo(repo_id).commit)
        .join(path)
}

fn never() -> AtomicBool {
    AtomicBool::new(false)
}

/// Download, collecting every progress event.
fn download(hub: &Hub, variant: &str) -> (Result<LocalVariant, Error>, Vec<Progress>) {
    let mut events = Vec::new();
    let r = hub.download_variant(REPO, variant, |p| events.push(p.clone()), &never());
    (r, events)
}

/// Content requests (resolve or CDN), i.e. everything but the listing API.
fn file_requests(fake: &FakeHub) -> Vec<common::Logged> {
    fake.log()
        .into_iter()
        .filter(|l| !l.target.starts_with("/api/"))
        .collect()
}

fn cdn_gets_of(fake: &FakeHub, repo_id: &str, path: &str) -> Vec<common::Logged> {
    let sha = common::sha256_hex(&fake.repo(repo_id).file(path).bytes);
    fake.log()
        .into_iter()
        .filter(|l| l.server == "cdn" && l.target.starts_with(&format!("/lfs/{sha}")))
        .collect()
}

#[test]
fn lists_files_with_sizes_and_commit() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let info = hub.list_files(BASE, "main").expect("listing");
    assert_eq!(info.commit_sha, fake.repo(BASE).commit);
    assert_eq!(info.files.len(), fake.repo(BASE).files.len());
    let shard = info.file(SHARD1).expect("shard listed");
    assert_eq!(shard.size, Some(300 * 1024));
    assert_eq!(
        shard.lfs_sha256.as_deref(),
        Some(common::sha256_hex(&fake.repo(BASE).file(SHARD1).bytes).as_str())
    );
    let cfg = info.file("config.json").expect("config listed");
    assert_eq!(cfg.lfs_sha256, None);
    assert!(!info.gated);
    let api = &fake.log()[0];
    assert_eq!(
        api.target,
        format!("/api/models/{BASE}/revision/main?blobs=true")
    );

    let e = hub
        .list_files("nobody/nothing", "main")
        .expect_err("unknown repo");
    assert!(matches!(e, Error::NotFound { path: None, .. }), "{e:?}");
    assert!(e.to_string().contains("not found"), "{e}");
    let e = hub
        .list_files(BASE, "no-such-branch")
        .expect_err("unknown revision");
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(matches!(
        hub.list_files("../etc", "main"),
        Err(Error::InvalidRepoId(_))
    ));
}

#[test]
fn discovers_variants_from_their_configs() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let variants = hub.discover_variants(REPO).expect("discovery");
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        ["liza-a", "liza-b"],
        "notes/ has a non-TPTT config, docs/ none"
    );
    for v in &variants {
        assert_eq!(v.base_model_name.as_deref(), Some(BASE));
        assert_eq!(v.base_model_subfolder, None);
    }
    assert_eq!(variants[0].config_json["operator_mode"], "delta_rule");
    assert_eq!(variants[1].config_json["operator_mode"], "delta_product");
    // Only config.json files were fetched, at the listed commit, and nothing from the CDN.
    let commit = &fake.repo(REPO).commit;
    for l in file_requests(&fake) {
        assert_eq!(l.server, "hub", "{l:?}");
        assert!(l.target.ends_with("/config.json"), "{l:?}");
        assert!(
            l.target.contains(&format!("/resolve/{commit}/")),
            "pinned to the commit: {l:?}"
        );
    }
    // A repository without variants is an empty list, not an error.
    assert!(hub.discover_variants(BASE).expect("discovery").is_empty());
}

#[test]
fn downloads_a_variant_with_its_base_then_reuses_everything() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    // A slow shard, so that byte events and a speed show within it (they are throttled).
    fake.set_faults(Faults {
        slow: Some((SHARD1.into(), Duration::from_millis(10))),
        ..Faults::default()
    });
    let hub = hub_for(&fake, cache.path());
    let (r, events) = download(&hub, "liza-a");
    let local = r.expect("download");
    fake.set_faults(Faults::default());

    // Progress: the plan's totals, monotone, ending at the total.
    let plan = common::liza_a_plan();
    let total: u64 = plan
        .iter()
        .map(|(r, p)| fake.repo(r).file(p).bytes.len() as u64)
        .sum();
    let last = events.last().expect("events");
    assert_eq!(last.kind, ProgressKind::Finished);
    assert_eq!((last.done_bytes, last.total_bytes), (total, total));
    assert_eq!(
        (last.files_done, last.files_total),
        (plan.len(), plan.len())
    );
    assert!(
        events
            .windows(2)
            .all(|w| w[0].done_bytes <= w[1].done_bytes),
        "done_bytes never goes back"
    );
    assert!(events
        .iter()
        .all(|e| e.total_bytes == total && e.done_bytes <= total));
    assert!(
        events
            .iter()
            .any(|e| e.kind == ProgressKind::Bytes && e.path == SHARD1),
        "byte progress within a file"
    );
    assert!(
        events.iter().any(|e| e.bytes_per_sec > 0.0),
        "a speed is reported"
    );
    let finished: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| matches!(e.kind, ProgressKind::FileDone | ProgressKind::FileReused))
        .map(|e| (e.repo_id.as_str(), e.path.as_str()))
        .collect();
    assert_eq!(finished, plan, "every planned file, in plan order");

    // The standard cache layout.
    let adapter = snapshot_file(cache.path(), &fake, REPO, ADAPTER_A);
    let sha = common::sha256_hex(&fake.repo(REPO).file(ADAPTER_A).bytes);
    #[cfg(unix)]
    assert_eq!(
        std::fs::read_link(&adapter).expect("symlink"),
        Path::new("../../../blobs").join(&sha)
    );
    assert_eq!(
        std::fs::read(&adapter).expect("adapter"),
        fake.repo(REPO).file(ADAPTER_A).bytes
    );
    for (repo_id, path) in &plan {
        let p = snapshot_file(cache.path(), &fake, repo_id, path);
        assert_eq!(
            std::fs::read(&p).expect("snapshot file"),
            fake.repo(repo_id).file(path).bytes,
            "{repo_id}/{path}"
        );
    }
    assert!(!snapshot_file(cache.path(), &fake, BASE, "consolidated.safetensors").exists());
    assert!(!snapshot_file(cache.path(), &fake, REPO, "liza-a/README.md").exists());
    assert!(!snapshot_file(
        cache.path(),
        &fake,
        REPO,
        "liza-b/adapter_model.safetensors"
    )
    .exists());
    assert!(blobs(cache.path(), BASE)
        .iter()
        .all(|b| !b.ends_with(".incomplete")));
    let refs =
        std::fs::read_to_string(repo_dir(cache.path(), BASE).join("refs/main")).expect("refs/main");
    assert_eq!(refs, fake.repo(BASE).commit);

    // What the loader needs.
    assert_eq!(
        local.variant_dir,
        snapshot_file(cache.path(), &fake, REPO, "liza-a")
    );
    assert_eq!(
        local.repo_snapshot,
        snapshot_file(cache.path(), &fake, REPO, "")
    );
    assert_eq!(local.base_dir, snapshot_file(cache.path(), &fake, BASE, ""));
    assert_eq!(local.base_model_name, BASE);
    assert!(local.base_dir.join(SHARD2).is_file());

    // Second call: nothing is fetched again, not even a HEAD.
    fake.clear_log();
    let (r, events) = download(&hub, "liza-a");
    assert_eq!(r.expect("second download"), local);
    assert_eq!(file_requests(&fake).len(), 0, "{:?}", file_requests(&fake));
    assert!(events
        .iter()
        .filter(|e| e.kind != ProgressKind::Finished)
        .all(|e| e.kind == ProgressKind::FileReused));
    let last = events.last().expect("events");
    assert_eq!(
        (last.kind, last.done_bytes, last.total_bytes),
        (ProgressKind::Finished, total, total)
    );

    // The other variant fetches only its own files: the base is shared.
    fake.clear_log();
    let (r, _) = download(&hub, "liza-b");
    r.expect("liza-b");
    let fetched: Vec<String> = file_requests(&fake)
        .into_iter()
        .filter(|l| l.server == "hub")
        .map(|l| l.target)
        .collect();
    assert!(!fetched.is_empty());
    assert!(
        fetched.iter().all(|t| t.contains("/liza-b/")),
        "{fetched:?}"
    );
}

#[test]
fn an_interrupted_download_resumes_after_a_restart() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let size = fake.repo(BASE).file(SHARD1).bytes.len();
    fake.set_faults(Faults {
        drop_after: Some((SHARD1.into(), 100_000, 1)),
        ..Faults::default()
    });
    let mut cfg = HubConfig::new(fake.url.clone(), cache.path());
    cfg.max_retries = 0;
    let hub = Hub::new(cfg.clone()).expect("hub");
    let (r, _) = download(&hub, "liza-a");
    let e = r.expect_err("the connection was dropped");
    assert!(matches!(e, Error::Network { .. }), "{e:?}");
    let sha = common::sha256_hex(&fake.repo(BASE).file(SHARD1).bytes);
    let part = repo_dir(cache.path(), BASE)
        .join("blobs")
        .join(format!("{sha}.incomplete"));
    assert_eq!(
        std::fs::metadata(&part).expect("partial kept").len(),
        100_000
    );
    assert!(
        !repo_dir(cache.path(), BASE)
            .join("blobs")
            .join(&sha)
            .exists(),
        "no blob from a partial file"
    );
    assert!(!snapshot_file(cache.path(), &fake, BASE, SHARD1).exists());
    assert!(hub.local_variant(REPO, "liza-a").is_err());
    assert!(
        hub.local_snapshot(BASE).is_none(),
        "refs/main waits for a complete download"
    );

    // A new process: a fresh Hub on the same cache continues from byte 100000.
    drop(hub);
    let hub = Hub::new(cfg).expect("hub");
    let (r, events) = download(&hub, "liza-a");
    r.expect("resumed download");
    let gets = cdn_gets_of(&fake, BASE, SHARD1);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[1].range.as_deref(), Some("bytes=100000-"));
    assert_eq!(
        gets[0].body_bytes + gets[1].body_bytes,
        size,
        "no byte transferred twice"
    );
    let started = events
        .iter()
        .find(|e| e.kind == ProgressKind::FileStarted && e.path == SHARD1)
        .expect("started");
    assert_eq!(
        started.file_bytes, 100_000,
        "progress counts the resumed bytes"
    );
    assert_eq!(
        std::fs::read(snapshot_file(cache.path(), &fake, BASE, SHARD1)).expect("shard"),
        fake.repo(BASE).file(SHARD1).bytes
    );
    assert!(!part.exists());
}

#[test]
fn a_broken_connection_is_resumed_within_the_call() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    fake.set_faults(Faults {
        drop_after: Some((SHARD2.into(), 70_000, 2)),
        ..Faults::default()
    });
    let hub = hub_for(&fake, cache.path());
    let (r, _) = download(&hub, "liza-a");
    r.expect("retries resume the transfer");
    let gets = cdn_gets_of(&fake, BASE, SHARD2);
    let ranges: Vec<Option<&str>> = gets.iter().map(|g| g.range.as_deref()).collect();
    assert_eq!(ranges, [None, Some("bytes=70000-"), Some("bytes=140000-")]);
    assert_eq!(
        std::fs::read(snapshot_file(cache.path(), &fake, BASE, SHARD2)).expect("shard"),
        fake.repo(BASE).file(SHARD2).bytes
    );
}

#[test]
fn a_corrupt_file_is_rejected_and_deleted() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    fake.set_faults(Faults {
        corrupt: vec![SHARD2.into()],
        ..Faults::default()
    });
    let hub = hub_for(&fake, cache.path());
    let (r, _) = download(&hub, "liza-a");
    let e = r.expect_err("checksum mismatch");
    let Error::ChecksumMismatch {
        ref path,
        ref expected,
        ..
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(path, SHARD2);
    assert_eq!(
        expected,
        &common::sha256_hex(&fake.repo(BASE).file(SHARD2).bytes)
    );
    assert!(e.to_string().contains("deleted"), "{e}");
    let sha = expected.clone();
    assert!(
        !blobs(cache.path(), BASE)
            .iter()
            .any(|b| b.starts_with(&sha)),
        "neither blob nor partial kept: {:?}",
        blobs(cache.path(), BASE)
    );
    assert!(!snapshot_file(cache.path(), &fake, BASE, SHARD2).exists());
    assert!(matches!(
        hub.local_variant(REPO, "liza-a"),
        Err(Error::NotCached { .. })
    ));

    // Once the server is healthy, the download completes from scratch.
    fake.set_faults(Faults::default());
    fake.clear_log();
    let (r, _) = download(&hub, "liza-a");
    r.expect("clean download");
    let gets = cdn_gets_of(&fake, BASE, SHARD2);
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].range, None, "a deleted file starts over");
}

#[test]
fn a_file_larger_than_announced_is_rejected() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let real = fake.repo(REPO).file(ADAPTER_A).bytes.len() as u64;
    fake.set_faults(Faults {
        lie_size: Some((ADAPTER_A.into(), real - 10)),
        ..Faults::default()
    });
    let hub = hub_for(&fake, cache.path());
    let (r, _) = download(&hub, "liza-a");
    let e = r.expect_err("size mismatch");
    assert!(
        matches!(e, Error::SizeMismatch { expected, .. } if expected == real - 10),
        "{e:?}"
    );
    let sha = common::sha256_hex(&fake.repo(REPO).file(ADAPTER_A).bytes);
    assert!(
        !blobs(cache.path(), REPO)
            .iter()
            .any(|b| b.starts_with(&sha)),
        "{:?}",
        blobs(cache.path(), REPO)
    );
    assert!(!snapshot_file(cache.path(), &fake, REPO, ADAPTER_A).exists());
}

#[test]
fn cancelling_leaves_no_complete_file_and_resumes_later() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    fake.set_faults(Faults {
        slow: Some((SHARD1.into(), Duration::from_millis(15))),
        ..Faults::default()
    });
    let hub = hub_for(&fake, cache.path());
    let cancel = AtomicBool::new(false);
    let r = hub.download_variant(
        REPO,
        "liza-a",
        |p| {
            if p.path == SHARD1 && p.kind == ProgressKind::Bytes && p.file_bytes > 0 {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    let sha = common::sha256_hex(&fake.repo(BASE).file(SHARD1).bytes);
    let blob_dir = repo_dir(cache.path(), BASE).join("blobs");
    assert!(!blob_dir.join(&sha).exists(), "no complete blob");
    assert!(
        !snapshot_file(cache.path(), &fake, BASE, SHARD1).exists(),
        "no snapshot entry"
    );
    let partial = std::fs::metadata(blob_dir.join(format!("{sha}.incomplete")))
        .expect("partial kept")
        .len();
    assert!(partial > 0 && partial < 300 * 1024, "{partial}");
    assert!(matches!(
        hub.local_variant(REPO, "liza-a"),
        Err(Error::NotCached { .. })
    ));
    assert!(hub.local_snapshot(REPO).is_none());

    // A cancel flag already raised stops before any request.
    fake.clear_log();
    let raised = AtomicBool::new(true);
    assert!(matches!(
        hub.download_variant(REPO, "liza-a", |_| {}, &raised),
        Err(Error::Cancelled)
    ));
    assert!(fake.log().is_empty());

    // Resume.
    fake.set_faults(Faults::default());
    let (r, _) = download(&hub, "liza-a");
    r.expect("resumed");
    let gets = cdn_gets_of(&fake, BASE, SHARD1);
    assert_eq!(
        gets.last().and_then(|g| g.range.clone()),
        Some(format!("bytes={partial}-"))
    );
}

#[test]
fn a_gated_base_needs_a_token_that_only_the_hub_sees() {
    const TOKEN: &str = "hf_fake_token_0123456789";
    let fake = FakeHub::start(
        vec![common::tptt_repo(), common::base_repo(true)],
        Some(TOKEN),
    );
    let cache = tempfile::tempdir().expect("temp dir");

    let hub = hub_for(&fake, cache.path());
    assert!(
        hub.list_files(BASE, "main")
            .expect("listing is public")
            .gated
    );
    let (r, _) = download(&hub, "liza-a");
    let e = r.expect_err("gated");
    assert!(
        matches!(
            e,
            Error::Unauthorized {
                status: 401,
                token_sent: false,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("needs a Hugging Face token"), "{e}");

    let wrong = Hub::new(
        HubConfig::new(fake.url.clone(), cache.path()).with_token(Some("hf_wrong".into())),
    )
    .expect("hub");
    let (r, _) = download(&wrong, "liza-a");
    let e = r.expect_err("refused token");
    assert!(
        matches!(
            e,
            Error::Unauthorized {
                status: 403,
                token_sent: true,
                ..
            }
        ),
        "{e:?}"
    );

    fake.clear_log();
    let config = HubConfig::new(fake.url.clone(), cache.path()).with_token(Some(TOKEN.into()));
    let hub = Hub::new(config.clone()).expect("hub");
    let (r, _) = download(&hub, "liza-a");
    let local = r.expect("download with a token");
    let log = fake.log();
    assert!(log.iter().any(|l| l.server == "cdn"));
    for l in &log {
        match l.server {
            "hub" => assert_eq!(
                l.authorization.as_deref(),
                Some(format!("Bearer {TOKEN}").as_str()),
                "{l:?}"
            ),
            _ => assert_eq!(
                l.authorization, None,
                "the token never leaves the hub's origin: {l:?}"
            ),
        }
    }
    // Nowhere in what could be printed or logged.
    let shown = [
        format!("{hub:?}"),
        format!("{config:?}"),
        format!("{local:?}"),
        format!("{e}"),
        format!("{e:?}"),
    ];
    for s in shown {
        assert!(!s.contains(TOKEN), "token leaked into {s}");
    }
}

#[test]
fn missing_variants_are_reported_with_the_candidates() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let (r, _) = download(&hub, "liza-z");
    let e = r.expect_err("no such variant");
    let Error::VariantNotFound { ref available, .. } = e else {
        panic!("{e:?}")
    };
    assert!(available.contains(&"liza-a".to_string()), "{available:?}");
    assert!(
        e.to_string().contains("folders with a config.json: liza-a"),
        "{e}"
    );
    let (r, _) = download(&hub, "notes");
    assert!(
        matches!(r, Err(Error::VariantNotFound { .. })),
        "a non-TPTT config is no variant"
    );
    let (r, _) = download(&hub, "../liza-a");
    assert!(matches!(r, Err(Error::VariantNotFound { .. })));
}

#[test]
fn a_completed_download_is_found_offline() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let (r, _) = download(&hub, "liza-a");
    let local = r.expect("download");

    // No server at this address: every lookup below is offline.
    let offline = Hub::new(HubConfig::new("http://127.0.0.1:9", cache.path())).expect("hub");
    assert_eq!(
        offline.local_snapshot(REPO),
        Some(local.repo_snapshot.clone())
    );
    assert_eq!(
        offline.local_snapshot(BASE),
        Some(local.base_snapshot.clone())
    );
    assert_eq!(
        offline
            .local_variant(REPO, "liza-a")
            .expect("offline lookup"),
        local
    );
    assert!(matches!(
        offline.local_variant(REPO, "liza-b"),
        Err(Error::NotCached { .. })
    ));
    let all = offline.local_variants(REPO);
    assert_eq!(all, vec![local.clone()]);
    // The cache's usable repositories: the TPTT one, not its base (no TPTT variant), nor an
    // empty or foreign folder.
    for junk in [
        "models--someone--empty",
        "datasets--someone--text",
        "models--..--x",
        ".locks",
    ] {
        std::fs::create_dir_all(cache.path().join(junk)).expect("junk folder");
    }
    assert_eq!(offline.cached_repos(), vec![REPO.to_string()]);
    let (r, _) = download(&offline, "liza-a");
    assert!(matches!(r, Err(Error::Network { .. })), "{r:?}");

    // A cache filled by another tool (no download record) is recognised by its files.
    std::fs::remove_dir_all(repo_dir(cache.path(), REPO).join(".tptt")).expect("remove records");
    assert_eq!(
        offline
            .local_variant(REPO, "liza-a")
            .expect("heuristic lookup"),
        local
    );
    // ... but not once a shard is gone.
    std::fs::remove_file(local.base_dir.join(SHARD2)).expect("remove shard");
    assert!(offline.local_variant(REPO, "liza-a").is_err());
}

#[test]
fn a_removed_variant_frees_its_blobs_and_keeps_the_rest() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let a = download(&hub, "liza-a").0.expect("download a");
    let b = download(&hub, "liza-b").0.expect("download b");
    let adapter_a = fake.repo(REPO).file(ADAPTER_A).bytes.len() as u64;
    let base_blobs = blobs(cache.path(), BASE);

    let freed = hub.remove_variant(REPO, "liza-a").expect("remove");
    // The adapter is liza-a's only LFS blob; its small files (config, tokenizer config) go too.
    assert!(freed >= adapter_a, "{freed} < {adapter_a}");
    assert!(matches!(
        hub.local_variant(REPO, "liza-a"),
        Err(Error::NotCached { .. })
    ));
    assert!(!a.variant_dir.exists());
    assert_eq!(hub.local_variant(REPO, "liza-b").expect("b stays"), b);
    assert_eq!(
        blobs(cache.path(), BASE),
        base_blobs,
        "the base is shared and stays"
    );
    assert!(
        a.repo_snapshot.join("tokenizer.json").is_file(),
        "root files stay"
    );
    assert_eq!(hub.local_variants(REPO), vec![b]);
    // Removing it again finds nothing to free; it downloads again afterwards.
    assert_eq!(hub.remove_variant(REPO, "liza-a").expect("remove again"), 0);
    assert_eq!(download(&hub, "liza-a").0.expect("download again"), a);
}
