//! Build script: Tauri's code generation (config, capabilities, icons, the embedded UI).
//!
//! The UI is built separately (`npm ci && npm run build` in `ui/`, giving `ui/dist`). When it
//! has not been built, a placeholder page is written there so that the Rust side still compiles
//! and its tests run; the app then shows how to build the UI instead of failing to start.

use std::path::Path;

fn main() {
    let dist = Path::new("../ui/dist");
    // Run again when the UI is built, rebuilt or removed (tauri-build's own rerun list does not
    // cover a missing folder).
    println!("cargo:rerun-if-changed=../ui/dist");
    println!("cargo:rerun-if-changed=build.rs");
    if !dist.join("index.html").exists() {
        let page = "<!doctype html><html><head><meta charset=\"utf-8\"><title>TPTT Chat</title></head>\
<body><h1>TPTT Chat</h1><p>The web UI has not been built. Run <code>npm ci &amp;&amp; npm run build</code> \
in <code>ui/</code>, then rebuild the app.</p></body></html>\n";
        if let Err(e) = std::fs::create_dir_all(dist)
            .and_then(|()| std::fs::write(dist.join("index.html"), page))
        {
            println!("cargo:warning=cannot write the placeholder UI in ui/dist: {e}");
        } else {
            println!("cargo:warning=ui/dist was missing: wrote a placeholder page (build the UI with npm run build in ui/)");
        }
    }
    tauri_build::build();
}
