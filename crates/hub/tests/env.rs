//! `HubConfig::from_env` in a real process environment: `HF_HOME`, `HF_HUB_CACHE`,
//! `HF_ENDPOINT`, `HF_TOKEN`. One test in this binary, so changing the environment races
//! with nothing.

mod common;

use std::sync::atomic::AtomicBool;

use common::{FakeHub, REPO};
use tptt_hub::{Hub, HubConfig};

#[test]
fn hf_home_and_hf_hub_cache_are_respected() {
    let fake = FakeHub::standard();
    let home = tempfile::tempdir().expect("temp dir");
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
    ] {
        std::env::remove_var(var);
    }
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", &fake.url);

    let config = HubConfig::from_env();
    assert_eq!(config.cache_dir, home.path().join("hub"));
    assert_eq!(config.endpoint, fake.url);
    assert_eq!(config.token, None);
    let hub = Hub::new(config).expect("hub");
    let local = hub
        .download_variant(REPO, "liza-a", |_| {}, &AtomicBool::new(false))
        .expect("download");
    assert!(local.repo_snapshot.starts_with(
        home.path()
            .join("hub")
            .join("models--tptt-org--Titans-Tiny")
    ));
    assert!(local
        .variant_dir
        .join("adapter_model.safetensors")
        .is_file());

    // HF_HUB_CACHE wins over HF_HOME; the token file under HF_HOME is read.
    let other = tempfile::tempdir().expect("temp dir");
    std::env::set_var("HF_HUB_CACHE", other.path());
    std::fs::write(home.path().join("token"), "hf_from_file\n").expect("token file");
    let config = HubConfig::from_env();
    assert_eq!(config.cache_dir, other.path());
    assert_eq!(config.token.as_deref(), Some("hf_from_file"));
    let hub = Hub::new(config).expect("hub");
    assert!(
        hub.local_variant(REPO, "liza-a").is_err(),
        "another cache is another cache"
    );
}
