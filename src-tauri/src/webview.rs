//! How the webview paints, on Linux. WebKitGTK composites the page through OpenGL; on a machine
//! without a GPU render node (no `/dev/dri/renderD*`: a virtual machine, a server, a CI box
//! under Xvfb) that OpenGL is Mesa's llvmpipe, which composites the whole window again in
//! software at every change — a caret blink, a progress update — on the very cores the model
//! computes on (on a 2-core machine reading a long paste, WebKit took about as much CPU as the
//! model). Without a render node the app asks WebKit for its non-composited mode instead
//! (`WEBKIT_DISABLE_COMPOSITING_MODE=1`), which paints only what changed. A value the user set
//! is left alone; other systems are not touched.

use std::path::Path;

/// The variable WebKitGTK reads.
pub const DISABLE_COMPOSITING: &str = "WEBKIT_DISABLE_COMPOSITING_MODE";

/// Whether `dri` (normally `/dev/dri`) holds a GPU render node (`renderD128`, ...).
pub fn has_render_node(dri: &Path) -> bool {
    std::fs::read_dir(dri).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    })
}

/// Whether WebKit should be asked for its non-composited mode: no render node, and the user
/// did not choose (`user_choice`: the variable's value, if set).
pub fn should_disable_compositing(render_node: bool, user_choice: Option<&str>) -> bool {
    !render_node && user_choice.is_none()
}

/// Sets [`DISABLE_COMPOSITING`] when [`should_disable_compositing`] says so (Linux only).
/// Call it first thing in `main`, before any thread starts: it changes the environment.
pub fn paint_cheaply_without_gpu() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let user = std::env::var(DISABLE_COMPOSITING).ok();
    if should_disable_compositing(has_render_node(Path::new("/dev/dri")), user.as_deref()) {
        std::env::set_var(DISABLE_COMPOSITING, "1");
        tracing::info!(
            "no GPU render node: the webview paints without compositing (cheaper on the CPU)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_is_disabled_only_without_a_render_node_and_a_user_choice() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(!has_render_node(dir.path()));
        assert!(!has_render_node(&dir.path().join("missing")));
        std::fs::write(dir.path().join("card0"), b"").expect("card");
        assert!(
            !has_render_node(dir.path()),
            "a display card is not a render node"
        );
        std::fs::write(dir.path().join("renderD128"), b"").expect("node");
        assert!(has_render_node(dir.path()));

        assert!(should_disable_compositing(false, None));
        assert!(!should_disable_compositing(true, None));
        assert!(
            !should_disable_compositing(false, Some("0")),
            "the user's choice stands"
        );
    }
}
