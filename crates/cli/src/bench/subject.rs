//! What is benchmarked: a plain model folder (TPTT injected) or a TPTT repository, loaded once.

use super::*;

/// The model under test and where it came from.
pub(super) struct Subject {
    pub(super) model: Model,
    pub(super) identity: ModelIdentity,
    /// Folder given to the reference script (the plain base folder).
    pub(super) base_dir: PathBuf,
    pub(super) label: String,
    pub(super) weight_bytes: u64,
    /// The variant's files (a TPTT repository), or `None` for a plain folder (its tokenizer
    /// files are in it).
    pub(super) files: Option<tptt::repo::VariantFiles>,
    /// The folder given.
    pub(super) dir: PathBuf,
}

pub(super) fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

pub(super) fn default_model_dir() -> PathBuf {
    std::env::var_os("TPTT_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/smollm2-135m-instruct"))
}

pub(super) fn load_subject(dir: &Path, variant: Option<&str>) -> Result<Subject> {
    if !dir.is_dir() {
        bail!(
            "model folder {} does not exist (pass MODEL_DIR, or set TPTT_SMOLLM2_DIR; scripts/smollm2/fetch.sh makes models/smollm2-135m-instruct)",
            dir.display()
        );
    }
    let cfg_path = dir.join("config.json");
    let plain = cfg_path.is_file()
        && !tptt::config::is_tptt_config(&tptt::config::read_json_object(&cfg_path)?);
    let opts = LoadOptions::default();
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let (model, variant_name, base_dir, label, files) = if plain {
        if let Some(v) = variant {
            bail!(
                "--variant {v}: {} is a plain Hugging Face model folder, not a TPTT repo",
                dir.display()
            );
        }
        let settings =
            TpttSettings::injected(INJECT_MODE, INJECT_MAG, &canonical.display().to_string())?;
        let model = Model::load_plain(dir, settings, &opts)
            .with_context(|| format!("loading {}", dir.display()))?;
        let label = format!(
            "{} + injected {INJECT_MODE}, mag {INJECT_MAG}",
            dir.display()
        );
        (
            model,
            format!("{INJECT_MODE}_mag{INJECT_MAG}"),
            dir.to_path_buf(),
            label,
            None,
        )
    } else {
        let repo = TpttRepo::open(dir)?;
        let files = repo.variant(variant, None)?;
        let model = Model::load(&files, &opts)
            .with_context(|| format!("loading variant {}", files.name))?;
        let label = format!("{} variant {}", dir.display(), files.name);
        let (name, base_dir) = (files.name.clone(), files.base_dir.clone());
        (model, name, base_dir, label, Some(files))
    };
    let b = &model.config().base;
    // Decoding reads every weight once, lm_head included; of the embedding only one row, so a
    // separate (untied) embedding does not count. LoadOptions::default() re-ties lm_head.
    let tied = opts.retie_lm_head || b.tie_word_embeddings;
    let params = model.num_params()
        - if tied {
            0
        } else {
            b.vocab_size * b.hidden_size
        };
    let weight_bytes = (params * std::mem::size_of::<f32>()) as u64;
    // The bench saves and restores its own snapshots within one run, on weights it loaded
    // once: they need no fingerprint.
    let identity = ModelIdentity {
        model: canonical.display().to_string(),
        variant: variant_name,
        config_hash: config_hash(model.config()),
        weights: "this bench run".into(),
        v4: Default::default(),
    };
    Ok(Subject {
        model,
        identity,
        base_dir,
        label,
        weight_bytes,
        files,
        dir: dir.to_path_buf(),
    })
}

/// The TPTT settings [`load_subject`] gives the model in `dir`, read without loading weights,
/// and the tokenizer file beside them (for a child process measuring another copy of the base).
pub(super) fn subject_settings(
    dir: &Path,
    variant: Option<&str>,
) -> Result<(TpttSettings, Option<tptt::repo::VariantFiles>)> {
    let cfg_path = dir.join("config.json");
    let plain = cfg_path.is_file()
        && !tptt::config::is_tptt_config(&tptt::config::read_json_object(&cfg_path)?);
    if plain {
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok((
            TpttSettings::injected(INJECT_MODE, INJECT_MAG, &canonical.display().to_string())?,
            None,
        ))
    } else {
        let files = TpttRepo::open(dir)?.variant(variant, None)?;
        Ok((files.config.tptt.clone(), Some(files)))
    }
}
