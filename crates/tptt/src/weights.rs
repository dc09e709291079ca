//! Loading weights: safetensors (single or sharded, f32/f16/bf16, always widened to f32 here),
//! and the TPTT adapter file (LoRA merged into the base projections, or full projection weights),
//! strictly: an unknown key, a missing expected key or a wrong shape is an error (the reference
//! silently ignores them, SPEC §1.3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::config::{read_json_object, LoraSettings};
use crate::error::{Error, Result};

/// Named tensors, f32, on one device.
pub type TensorMap = HashMap<String, Tensor>;

/// A weight: dense f32, or quantized (GGUF) used through candle's quantized matmul.
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32.
    Dense(Tensor),
    /// Quantized blocks (Q4_0, Q4_1, Q8_0, K-quants ...).
    Quant(Arc<QTensor>),
    /// A quantized matrix already repacked for the CPU's decode kernels as it was read (a GGUF
    /// base on an AVX-512 VNNI CPU, `gguf::load_as`): never in memory twice while loading.
    Packed(Arc<crate::model::Packed>),
}

impl Weight {
    /// The weight's shape.
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quant(q) => q.shape().dims(),
            Weight::Packed(p) => p.dims_ref(),
        }
    }

    /// Bytes the weight occupies (what a matmul with it reads).
    pub fn size_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.storage_size_in_bytes(),
            Weight::Packed(p) => p.size_in_bytes(),
        }
    }
}

/// Named weights.
pub type WeightMap = HashMap<String, Weight>;

/// Dense tensors as weights.
pub fn dense(map: TensorMap) -> WeightMap {
    map.into_iter()
        .map(|(k, v)| (k, Weight::Dense(v)))
        .collect()
}

/// A LoRA kept beside a quantized weight: `y += scale · B(A x)`.
#[derive(Debug, Clone)]
pub struct LoraSide {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `lora_alpha / r` (or `/ sqrt(r)`).
    pub scale: f64,
}

/// The safetensors files of a model folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let map = read_json_object(&index)?;
        let wm = map
            .get("weight_map")
            .and_then(|v| v.as_object())
            .ok_or_else(|| Error::Json {
                path: index.clone(),
                message: "no weight_map object".into(),
            })?;
        let mut files: Vec<String> = wm
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(Error::NotFound(format!(
                "shard {} listed in {} does not exist",
                missing.display(),
                index.display()
            )));
        }
        return Ok(files);
    }
    Err(Error::NotFound(format!(
        "no model.safetensors or model.safetensors.index.json in {}",
        dir.display()
    )))
}

/// Read every tensor of a safetensors file as f32.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<TensorMap> {
    load_safetensors_as(path, device, false)
}

/// Read every tensor of a safetensors file as f32, or with `keep_half` its f16 / bf16 matrices
/// (2-D tensors) as stored.
pub fn load_safetensors_as(path: &Path, device: &Device, keep_half: bool) -> Result<TensorMap> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: describe_bad_file(&bytes, &e),
    })?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            other => {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    message: format!("tensor {name:?} has unsupported dtype {other:?}"),
                })
            }
        };
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let kept = dtype == DType::F32 || (keep_half && half && view.shape().len() == 2);
        let t = if kept && device.is_cpu() {
            // Kept as stored: copied into memory backed by huge pages (`alloc`).
            match dtype {
                DType::F16 => kept_on_huge_pages::<half::f16>(view.data(), view.shape(), device),
                DType::BF16 => kept_on_huge_pages::<half::bf16>(view.data(), view.shape(), device),
                _ => kept_on_huge_pages::<f32>(view.data(), view.shape(), device),
            }
        } else {
            Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
        }
        .map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            message: format!("tensor {name:?}: {e}"),
        })?;
        let t = if kept { t } else { t.to_dtype(DType::F32)? };
        out.insert(name, t);
    }
    Ok(out)
}

/// A tensor of `T` from its little-endian bytes, in an allocation advised to be backed by huge
/// pages before it is written (`alloc::advise_huge_pages`).
fn kept_on_huge_pages<T: candle_core::WithDType>(
    bytes: &[u8],
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    if cfg!(target_endian = "big") {
        return Tensor::from_raw_buffer(bytes, T::DTYPE, shape, device);
    }
    let size = std::mem::size_of::<T>();
    let elems = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if !bytes.len().is_multiple_of(size) || Some(bytes.len() / size) != elems {
        candle_core::bail!("{} bytes for shape {shape:?}", bytes.len());
    }
    let n = bytes.len() / size;
    let mut v: Vec<T> = Vec::with_capacity(n);
    crate::alloc::advise_huge_pages(&mut v);
    // SAFETY: the capacity holds `n` values of `T` (`bytes.len()` bytes), all written by the
    // copy before the length is set; `T` is one of candle's element types (plain numbers, for
    // which every bit pattern is a value), read as the file's little-endian bytes on a
    // little-endian target (big-endian ones returned above).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), bytes.len());
        v.set_len(n);
    }
    Tensor::from_vec(v, shape, device)
}

/// Why a file is not a readable safetensors file, in words a user can act on.
fn describe_bad_file(bytes: &[u8], e: &safetensors::SafeTensorError) -> String {
    if bytes.starts_with(b"version https://git-lfs") {
        return format!(
            "a Git LFS pointer ({} bytes), not the weights: fetch the real file (git lfs pull)",
            bytes.len()
        );
    }
    format!(
        "not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
        bytes.len()
    )
}

/// Load all shards of a model folder into one map.
pub fn load_model_dir(dir: &Path, device: &Device) -> Result<TensorMap> {
    load_model_dir_as(dir, device, false)
}

/// [`load_model_dir`], keeping the f16 / bf16 matrices (2-D tensors) of the files in their
/// stored precision when `keep_half` (vectors still become f32).
pub fn load_model_dir_as(dir: &Path, device: &Device, keep_half: bool) -> Result<TensorMap> {
    let mut all = TensorMap::new();
    for f in weight_files(dir)? {
        all.extend(load_safetensors_as(&f, device, keep_half)?);
    }
    Ok(all)
}

/// Map an adapter key's module path to the base weight name:
/// `model.model.layers.0.self_attn.base_attn.q_proj` → `model.layers.0.self_attn.q_proj`.
fn base_name(module: &str, base: &WeightMap, suffix: &str) -> Option<String> {
    let plain = module.replace(".base_attn.", ".");
    let mut candidates = vec![format!("{plain}.{suffix}")];
    if let Some(rest) = plain.strip_prefix("model.") {
        candidates.push(format!("{rest}.{suffix}"));
    }
    candidates.into_iter().find(|c| base.contains_key(c))
}

/// The two LoRA factors of one base weight, each with its adapter key.
#[derive(Default)]
struct LoraPair {
    a: Option<(String, Tensor)>,
    b: Option<(String, Tensor)>,
}

/// What applying an adapter did, for `inspect`.
#[derive(Debug, Clone, Default)]
pub struct AdapterReport {
    /// Number of LoRA pairs merged into dense weights.
    pub lora_pairs: usize,
    /// Number of full tensors replaced.
    pub replaced: usize,
    /// LoRA pairs kept unmerged beside quantized weights, by base weight name.
    pub unmerged: HashMap<String, LoraSide>,
}

/// Apply `adapter_model.safetensors` to the base weights (SPEC §1.3).
///
/// With `lora`, every `…lora_A[.default].weight`/`…lora_B[.default].weight` pair is merged as
/// `W += scale · B·A` into a dense weight, or kept beside a quantized one
/// ([`AdapterReport::unmerged`]); every targeted projection of every layer must have its pair. Other keys
/// (and all keys without LoRA) replace the base tensor of the same name and shape.
pub fn apply_adapter(
    base: &mut WeightMap,
    path: &Path,
    lora: Option<&LoraSettings>,
    target_modules: &[String],
    device: &Device,
) -> Result<AdapterReport> {
    let adapter = load_safetensors(path, device)?;
    let mut report = AdapterReport::default();
    // Base weight name → (lora_A, lora_B), each with the adapter key it came from.
    let mut pairs: HashMap<String, LoraPair> = HashMap::new();
    let unexpected = |key: &str| Error::UnexpectedAdapterKey {
        path: path.to_path_buf(),
        key: key.to_string(),
    };
    let shape_error = |key: &str, got: &[usize], expected: Vec<usize>, detail: String| {
        Error::AdapterShapeMismatch {
            path: path.to_path_buf(),
            key: key.to_string(),
            got: got.into(),
            expected: expected.into(),
            detail,
        }
    };
    let mut keys: Vec<&String> = adapter.keys().collect();
    keys.sort();
    for key in keys {
        let t = &adapter[key];
        let lora_part = [
            (".lora_A.default.weight", 0),
            (".lora_A.weight", 0),
            (".lora_B.default.weight", 1),
            (".lora_B.weight", 1),
        ]
        .iter()
        .find_map(|(suf, which)| key.strip_suffix(suf).map(|m| (m.to_string(), *which)));
        if let Some((module, which)) = lora_part {
            if lora.is_none() {
                return Err(Error::Config {
                    path: Some(path.to_path_buf()),
                    message: format!("adapter holds LoRA key {key:?} but the variant's config.json has lora_config: null"),
                });
            }
            let name = base_name(&module, base, "weight").ok_or_else(|| unexpected(key))?;
            let e = pairs.entry(name).or_default();
            let slot = if which == 0 { &mut e.a } else { &mut e.b };
            *slot = Some((key.clone(), t.clone()));
        } else {
            let (module, suffix) = key.rsplit_once('.').ok_or_else(|| unexpected(key))?;
            let name = base_name(module, base, suffix).ok_or_else(|| unexpected(key))?;
            let want = base[&name].dims().to_vec();
            if t.dims() != want.as_slice() {
                return Err(shape_error(
                    key,
                    t.dims(),
                    want,
                    format!("it replaces base weight {name}"),
                ));
            }
            base.insert(name, Weight::Dense(t.clone()));
            report.replaced += 1;
        }
    }
    if let Some(lora) = lora {
        // Every targeted projection of every decoder layer must be adapted.
        let mut expected: Vec<&String> = base
            .keys()
            .filter(|n| {
                n.contains(".layers.")
                    && n.ends_with(".weight")
                    && target_modules
                        .iter()
                        .any(|t| n.trim_end_matches(".weight").ends_with(&format!(".{t}")))
            })
            .collect();
        expected.sort();
        if let Some(missing) = expected.iter().find(|n| !pairs.contains_key(n.as_str())) {
            return Err(Error::MissingTensor {
                name: format!("lora_A and lora_B for {missing} (a target module of lora_config)"),
                location: path.display().to_string(),
            });
        }
        let scale = lora.scale();
        let mut names: Vec<String> = pairs.keys().cloned().collect();
        names.sort();
        for name in names {
            let LoraPair { a, b } = pairs.remove(&name).unwrap_or_default();
            let missing = |present: &str, from: &str, to: &str| Error::MissingTensor {
                name: present.replace(from, to),
                location: path.display().to_string(),
            };
            let ((a_key, a), (b_key, b)) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some((k, _)), None) => return Err(missing(&k, ".lora_A.", ".lora_B.")),
                (None, Some((k, _))) => return Err(missing(&k, ".lora_B.", ".lora_A.")),
                (None, None) => continue,
            };
            let w = &base[&name];
            let &[out_dim, in_dim] = w.dims() else {
                // A projection is 2-D; report the shape the LoRA factors imply for it.
                let implied = vec![
                    b.dims().first().copied().unwrap_or(0),
                    a.dims().last().copied().unwrap_or(0),
                ];
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    got: w.dims().to_vec(),
                    expected: implied,
                });
            };
            let detail = |which: &str| {
                format!(
                    "{which} of base weight {name} [{out_dim}, {in_dim}] with lora_config r = {}",
                    lora.r
                )
            };
            if a.dims() != [lora.r, in_dim] {
                return Err(shape_error(
                    &a_key,
                    a.dims(),
                    vec![lora.r, in_dim],
                    detail("lora_A"),
                ));
            }
            if b.dims() != [out_dim, lora.r] {
                return Err(shape_error(
                    &b_key,
                    b.dims(),
                    vec![out_dim, lora.r],
                    detail("lora_B"),
                ));
            }
            match w {
                // A matrix kept in half precision: merging would round the small LoRA update
                // into f16 / bf16 steps; it stays beside the matrix as for quantized ones.
                Weight::Dense(w) if w.dtype() != DType::F32 => {
                    report.unmerged.insert(name, LoraSide { a, b, scale });
                }
                Weight::Dense(w) => {
                    let merged = (w + (b.matmul(&a)? * scale)?)?;
                    base.insert(name, Weight::Dense(merged));
                    report.lora_pairs += 1;
                }
                Weight::Quant(_) | Weight::Packed(_) => {
                    report.unmerged.insert(name, LoraSide { a, b, scale });
                }
            }
        }
    }
    Ok(report)
}
