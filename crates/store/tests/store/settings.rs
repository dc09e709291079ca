//! Application settings: typed get/set, overwrite, delete, a value of the wrong shape.

use serde::{Deserialize, Serialize};
use tptt_store::Error;

use crate::common::{exec, fresh};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Window {
    width: u32,
    height: u32,
}

#[tokio::test]
async fn settings_get_set_overwrite_delete() {
    let db = fresh().await;
    let s = &db.store;
    assert_eq!(s.get_setting::<String>("theme").await.unwrap(), None);
    s.set_setting("theme", "dark").await.unwrap();
    assert_eq!(
        s.get_setting::<String>("theme").await.unwrap().as_deref(),
        Some("dark")
    );
    s.set_setting("theme", "light").await.unwrap();
    assert_eq!(
        s.get_setting::<String>("theme").await.unwrap().as_deref(),
        Some("light")
    );

    let w = Window {
        width: 1280,
        height: 800,
    };
    s.set_setting("window", &w).await.unwrap();
    assert_eq!(s.get_setting::<Window>("window").await.unwrap(), Some(w));
    s.set_setting("recent", &vec!["a", "b"]).await.unwrap();
    assert_eq!(
        s.get_setting::<Vec<String>>("recent").await.unwrap(),
        Some(vec!["a".into(), "b".into()])
    );
    s.set_setting("odd key ' \" %", &1.5f64).await.unwrap();
    assert_eq!(
        s.get_setting::<f64>("odd key ' \" %").await.unwrap(),
        Some(1.5)
    );

    assert!(s.delete_setting("theme").await.unwrap());
    assert!(!s.delete_setting("theme").await.unwrap());
    assert_eq!(s.get_setting::<String>("theme").await.unwrap(), None);
}

#[tokio::test]
async fn a_setting_of_the_wrong_shape_names_its_key() {
    let db = fresh().await;
    let s = &db.store;
    s.set_setting("device", "cuda").await.unwrap();
    let err = s.get_setting::<Window>("device").await.unwrap_err();
    assert!(
        matches!(&err, Error::SettingValue { key, .. } if key == "device"),
        "{err:?}"
    );
    // Not even JSON, written by hand: the same error, and setting it again repairs it.
    exec(
        &db.path,
        "UPDATE settings SET value = '{broken' WHERE key = 'device'",
    )
    .await;
    let err = s.get_setting::<String>("device").await.unwrap_err();
    assert!(err.to_string().contains("`device`"), "{err}");
    s.set_setting("device", "cpu").await.unwrap();
    assert_eq!(
        s.get_setting::<String>("device").await.unwrap().as_deref(),
        Some("cpu")
    );
}
