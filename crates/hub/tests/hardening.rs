//! `tptt-hub` against a misbehaving world (issue #11): downloads that run at the same time
//! (two variants sharing a base, the same variant twice, a listing refreshed meanwhile),
//! answers and files larger than they may be or that never end, and the partial files a
//! cancelled then removed variant leaves behind.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{FakeHub, Faults, ADAPTER_A, BASE, REPO, SHARD1, SHARD2};
use tptt_hub::{Error, Hub, HubConfig, LocalVariant, ProgressKind};

fn hub_for(fake: &FakeHub, cache: &Path) -> Hub {
    Hub::new(HubConfig::new(fake.url.clone(), cache)).expect("hub")
}

fn repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

fn blob_dir(cache: &Path, repo_id: &str) -> PathBuf {
    repo_dir(cache, repo_id).join("blobs")
}

/// File names in `repo_id`'s `blobs/` ending with `.incomplete`.
fn partials(cache: &Path, repo_id: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(blob_dir(cache, repo_id))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".incomplete"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn sha_of(fake: &FakeHub, repo_id: &str, path: &str) -> String {
    common::sha256_hex(&fake.repo(repo_id).file(path).bytes)
}

/// CDN `GET`s of one LFS file.
fn cdn_gets_of(fake: &FakeHub, repo_id: &str, path: &str) -> usize {
    let sha = sha_of(fake, repo_id, path);
    fake.log()
        .iter()
        .filter(|l| l.server == "cdn" && l.target.starts_with(&format!("/lfs/{sha}")))
        .count()
}

/// Waits until the fake hub has served the first bytes of `path` (the CDN has logged a
/// `GET` of it); panics after 20 s.
fn wait_for_cdn_get(fake: &FakeHub, repo_id: &str, path: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while cdn_gets_of(fake, repo_id, path) == 0 {
        assert!(Instant::now() < end, "no GET of {path} within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The blob of an LFS file exists, complete, and its content hashes to the listed SHA-256.
fn assert_verified_blob(cache: &Path, fake: &FakeHub, repo_id: &str, path: &str) {
    let sha = sha_of(fake, repo_id, path);
    let bytes = std::fs::read(blob_dir(cache, repo_id).join(&sha)).expect("blob present");
    assert_eq!(common::sha256_hex(&bytes), sha, "{path}: blob content");
}

fn spawn_download(
    fake: &FakeHub,
    cache: &Path,
    variant: &'static str,
    start: Arc<Barrier>,
) -> std::thread::JoinHandle<Result<LocalVariant, Error>> {
    let hub = hub_for(fake, cache);
    std::thread::spawn(move || {
        start.wait();
        hub.download_variant(REPO, variant, |_| {}, &AtomicBool::new(false))
    })
}

#[test]
fn two_variants_sharing_a_base_download_together_while_the_listing_refreshes() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    // The first shard takes about a second: both downloads reach it while it is in flight.
    fake.set_faults(Faults {
        slow: Some((SHARD1.into(), Duration::from_millis(25))),
        ..Faults::default()
    });
    let start = Arc::new(Barrier::new(2));
    let a = spawn_download(&fake, cache.path(), "liza-a", start.clone());
    let b = spawn_download(&fake, cache.path(), "liza-b", start);

    // A refresh of the repository's listing (what the model manager does) meanwhile.
    wait_for_cdn_get(&fake, BASE, SHARD1);
    let hub = hub_for(&fake, cache.path());
    let names: Vec<String> = hub
        .discover_variants(REPO)
        .expect("listing during the downloads")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["liza-a", "liza-b"]);
    hub.list_files(BASE, "main").expect("base listing");

    let a = a.join().expect("thread a").expect("liza-a downloaded");
    let b = b.join().expect("thread b").expect("liza-b downloaded");
    assert_eq!(a.base_snapshot, b.base_snapshot);
    for shard in [SHARD1, SHARD2] {
        assert_verified_blob(cache.path(), &fake, BASE, shard);
        assert_eq!(
            std::fs::read(a.base_dir.join(shard)).expect("shard through the snapshot"),
            fake.repo(BASE).file(shard).bytes
        );
        // One download of each shared blob: the second waited for it, then reused it.
        assert_eq!(cdn_gets_of(&fake, BASE, shard), 1, "{shard}");
    }
    assert!(partials(cache.path(), BASE).is_empty());
    assert!(partials(cache.path(), REPO).is_empty());
    let offline = Hub::new(HubConfig::new("http://127.0.0.1:9", cache.path())).expect("hub");
    assert_eq!(offline.local_variant(REPO, "liza-a").expect("a offline"), a);
    assert_eq!(offline.local_variant(REPO, "liza-b").expect("b offline"), b);
}

#[test]
fn the_same_file_fetched_by_two_downloads_at_once_is_written_once() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    fake.set_faults(Faults {
        slow: Some((ADAPTER_A.into(), Duration::from_millis(25))),
        ..Faults::default()
    });
    // Two copies of the app (two hub clients) downloading the same variant.
    let start = Arc::new(Barrier::new(2));
    let one = spawn_download(&fake, cache.path(), "liza-a", start.clone());
    let two = spawn_download(&fake, cache.path(), "liza-a", start);
    let one = one.join().expect("thread").expect("first download");
    let two = two.join().expect("thread").expect("second download");
    assert_eq!(one, two);
    assert_verified_blob(cache.path(), &fake, REPO, ADAPTER_A);
    assert_eq!(cdn_gets_of(&fake, REPO, ADAPTER_A), 1);
    assert!(partials(cache.path(), REPO).is_empty());
}

#[test]
fn a_listing_over_the_cap_or_without_end_is_refused() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let cap_mib = tptt_hub::MAX_LISTING_BYTES >> 20;

    // Valid JSON, announced with its length, one byte per space over the cap.
    fake.set_faults(Faults {
        listing_padding: Some((BASE.into(), tptt_hub::MAX_LISTING_BYTES as usize)),
        ..Faults::default()
    });
    let e = hub.list_files(BASE, "main").expect_err("oversized listing");
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    let shown = e.to_string();
    assert!(
        shown.contains(&format!("/api/models/{BASE}/revision/main")),
        "names the URL: {shown}"
    );
    assert!(
        shown.contains(&format!("{cap_mib} MiB")),
        "names the cap: {shown}"
    );

    // No length, bytes until we hang up: cut off at the cap, within seconds.
    fake.set_faults(Faults {
        endless_listing: Some(REPO.into()),
        ..Faults::default()
    });
    let t = Instant::now();
    let e = hub.discover_variants(REPO).expect_err("endless listing");
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // A file that never ends is cut off at its announced size, and its partial deleted.
    fake.set_faults(Faults {
        endless: Some(SHARD2.into()),
        ..Faults::default()
    });
    let e = hub
        .download_variant(REPO, "liza-a", |_| {}, &AtomicBool::new(false))
        .expect_err("endless file");
    assert!(
        matches!(e, Error::SizeMismatch { ref path, .. } if path == SHARD2),
        "{e:?}"
    );
    assert!(partials(cache.path(), BASE).is_empty());
    fake.set_faults(Faults::default());
    hub.download_variant(REPO, "liza-a", |_| {}, &AtomicBool::new(false))
        .expect("downloads once the server behaves");
}

#[test]
fn a_config_over_the_cap_is_refused_before_its_bytes_come() {
    let mut repo = common::tptt_repo();
    // A valid config padded past the cap.
    let config = &mut repo.file_mut("liza-a/config.json").bytes;
    config.extend(std::iter::repeat_n(
        b' ',
        tptt_hub::MAX_JSON_FILE_BYTES as usize,
    ));
    let fake = FakeHub::start(vec![repo, common::base_repo(false)], None);
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    let cap_mib = tptt_hub::MAX_JSON_FILE_BYTES >> 20;

    let e = hub
        .download_variant(REPO, "liza-a", |_| {}, &AtomicBool::new(false))
        .expect_err("oversized config");
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    let shown = e.to_string();
    assert!(shown.contains("liza-a/config.json"), "{shown}");
    assert!(shown.contains(&format!("{cap_mib} MiB")), "{shown}");
    let fetched = |path: &str| {
        fake.log()
            .iter()
            .any(|l| l.method == "GET" && l.target.ends_with(path))
    };
    assert!(!fetched("liza-a/config.json"), "refused from the listing");
    // The listing skips that folder and shows the others.
    let names: Vec<String> = hub
        .discover_variants(REPO)
        .expect("discovery")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["liza-b"]);

    // A listing that says small but a HEAD that says large: refused after the HEAD.
    fake.set_faults(Faults {
        lie_size: Some((
            "liza-b/config.json".into(),
            tptt_hub::MAX_JSON_FILE_BYTES + 1,
        )),
        ..Faults::default()
    });
    let cache = tempfile::tempdir().expect("temp dir");
    let hub = hub_for(&fake, cache.path());
    fake.clear_log();
    let e = hub
        .download_variant(REPO, "liza-b", |_| {}, &AtomicBool::new(false))
        .expect_err("config announced too large");
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert!(!fetched("liza-b/config.json"));
}

/// Starts downloading `variant` on a thread and raises its cancel flag once `path` has
/// received bytes; returns the thread (it ends with `Cancelled`).
fn cancel_during(
    fake: &FakeHub,
    cache: &Path,
    variant: &'static str,
    path: &'static str,
) -> std::thread::JoinHandle<Result<LocalVariant, Error>> {
    let hub = hub_for(fake, cache);
    std::thread::spawn(move || {
        let cancel = AtomicBool::new(false);
        hub.download_variant(
            REPO,
            variant,
            |p| {
                if p.path == path && p.kind == ProgressKind::Bytes && p.file_bytes > 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
            &cancel,
        )
    })
}

#[test]
fn removing_a_cancelled_variant_deletes_its_partial_files() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    const ADAPTER_B: &str = "liza-b/adapter_model.safetensors";
    fake.set_faults(Faults {
        slow: Some((ADAPTER_A.into(), Duration::from_millis(20))),
        ..Faults::default()
    });
    let r = cancel_during(&fake, cache.path(), "liza-a", ADAPTER_A).join();
    assert!(matches!(r, Ok(Err(Error::Cancelled))), "{r:?}");
    fake.set_faults(Faults {
        slow: Some((ADAPTER_B.into(), Duration::from_millis(20))),
        ..Faults::default()
    });
    let r = cancel_during(&fake, cache.path(), "liza-b", ADAPTER_B).join();
    assert!(matches!(r, Ok(Err(Error::Cancelled))), "{r:?}");
    let partial_a = format!("{}.incomplete", sha_of(&fake, REPO, ADAPTER_A));
    let partial_b = format!("{}.incomplete", sha_of(&fake, REPO, ADAPTER_B));
    assert_eq!(partials(cache.path(), REPO), {
        let mut v = vec![partial_a.clone(), partial_b.clone()];
        v.sort();
        v
    });

    let hub = hub_for(&fake, cache.path());
    let freed = hub.remove_variant(REPO, "liza-a").expect("remove a");
    assert!(freed > 0, "the partial's bytes count as freed");
    assert_eq!(
        partials(cache.path(), REPO),
        [partial_b],
        "liza-a's partial is gone, liza-b's (cancelled, not removed) stays for a resume"
    );

    // Cancel and remove at once, as the app's buttons do: the removal waits for the download
    // to stop, then deletes its partial.
    fake.set_faults(Faults {
        slow: Some((ADAPTER_B.into(), Duration::from_millis(20))),
        ..Faults::default()
    });
    let hub2 = hub_for(&fake, cache.path());
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let running = std::thread::spawn(move || hub2.download_variant(REPO, "liza-b", |_| {}, &c2));
    // It resumes liza-b's adapter: wait for that GET, then cancel and remove immediately.
    let end = Instant::now() + Duration::from_secs(20);
    while cdn_gets_of(&fake, REPO, ADAPTER_B) < 2 {
        assert!(Instant::now() < end, "the resume never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    cancel.store(true, Ordering::SeqCst);
    hub.remove_variant(REPO, "liza-b").expect("remove b");
    assert!(matches!(running.join(), Ok(Err(Error::Cancelled))));
    assert!(partials(cache.path(), REPO).is_empty());
    // The base's partials (none here) and blobs are not the variants' to remove.
    assert!(blob_dir(cache.path(), BASE).is_dir() || !repo_dir(cache.path(), BASE).exists());
}

#[test]
fn a_variant_cannot_be_removed_while_it_downloads() {
    let fake = FakeHub::standard();
    let cache = tempfile::tempdir().expect("temp dir");
    // A download that outlasts the removal's wait: its shard crawls (38 pieces, 150 ms apart).
    fake.set_faults(Faults {
        slow: Some((SHARD1.into(), Duration::from_millis(150))),
        ..Faults::default()
    });
    let hub = hub_for(&fake, cache.path());
    let hub2 = hub.clone();
    let running = std::thread::spawn(move || {
        hub2.download_variant(REPO, "liza-a", |_| {}, &AtomicBool::new(false))
    });
    wait_for_cdn_get(&fake, BASE, SHARD1);
    let e = hub
        .remove_variant(REPO, "liza-a")
        .expect_err("busy while downloading");
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    assert!(e.to_string().contains("liza-a"), "{e}");
    // Nothing was removed: the download goes on and completes.
    let local = running.join().expect("thread").expect("download completes");
    assert_eq!(hub.local_variant(REPO, "liza-a").expect("complete"), local);
    hub.remove_variant(REPO, "liza-a")
        .expect("removable once done");
}
