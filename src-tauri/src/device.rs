//! Where the model runs: the [`DevicePref`] setting (auto / CPU / CUDA / Metal), which of them
//! this build can use (cargo features `cuda` and `metal`, forwarded to candle), and the candle
//! [`Device`] a preference resolves to.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// The device setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePref {
    /// CUDA, else Metal, else CPU: the first that is compiled in and works.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// NVIDIA GPU 0 (feature `cuda`).
    Cuda,
    /// Apple GPU (feature `metal`).
    Metal,
}

impl DevicePref {
    /// Every preference, in the settings' order.
    pub const ALL: [DevicePref; 4] = [Self::Auto, Self::Cpu, Self::Cuda, Self::Metal];

    /// From the UI's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda),
            "metal" => Some(Self::Metal),
            _ => None,
        }
    }

    /// The UI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }

    /// For people.
    pub fn label(self) -> &'static str {
        match self {
            Self::Auto => "Automatic",
            Self::Cpu => "CPU",
            Self::Cuda => "CUDA",
            Self::Metal => "Metal",
        }
    }

    /// Whether this build can use it.
    pub fn is_compiled(self) -> bool {
        match self {
            Self::Auto | Self::Cpu => true,
            Self::Cuda => cfg!(feature = "cuda"),
            Self::Metal => cfg!(feature = "metal"),
        }
    }
}

/// The devices compiled into this build, as the UI spells them.
pub fn compiled() -> Vec<String> {
    [DevicePref::Cpu, DevicePref::Cuda, DevicePref::Metal]
        .into_iter()
        .filter(|d| d.is_compiled())
        .map(|d| d.as_str().to_string())
        .collect()
}

/// A resolved device: the candle device, its kind (`cpu`, `cuda`, `metal`) and a name.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The candle device.
    pub device: Device,
    /// `cpu`, `cuda` or `metal`.
    pub kind: DevicePref,
    /// For people.
    pub name: String,
}

/// The CPU.
pub fn cpu() -> Resolved {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Resolved {
        device: Device::Cpu,
        kind: DevicePref::Cpu,
        name: format!("CPU ({threads} threads)"),
    }
}

/// The device `pref` asks for: an explicit accelerator that is missing or fails is an error
/// (the message says why); `Auto` falls back to the CPU.
pub fn resolve(pref: DevicePref) -> Result<Resolved, String> {
    match pref {
        DevicePref::Cpu => Ok(cpu()),
        DevicePref::Cuda => cuda(),
        DevicePref::Metal => metal(),
        DevicePref::Auto => Ok(cuda().or_else(|_| metal()).unwrap_or_else(|_| cpu())),
    }
}

fn cuda() -> Result<Resolved, String> {
    if !DevicePref::Cuda.is_compiled() {
        return Err("CUDA support is not compiled into this build (cargo feature `cuda`)".into());
    }
    Device::new_cuda(0)
        .map(|device| Resolved {
            device,
            kind: DevicePref::Cuda,
            name: "CUDA device 0".into(),
        })
        .map_err(|e| format!("no usable CUDA device: {e}"))
}

fn metal() -> Result<Resolved, String> {
    if !DevicePref::Metal.is_compiled() {
        return Err("Metal support is not compiled into this build (cargo feature `metal`)".into());
    }
    Device::new_metal(0)
        .map(|device| Resolved {
            device,
            kind: DevicePref::Metal,
            name: "Metal device 0".into(),
        })
        .map_err(|e| format!("no usable Metal device: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_there_and_auto_resolves() {
        assert!(compiled().contains(&"cpu".to_string()));
        assert_eq!(resolve(DevicePref::Cpu).expect("cpu").kind, DevicePref::Cpu);
        let auto = resolve(DevicePref::Auto).expect("auto never fails");
        assert!(auto.kind.is_compiled());
        if !cfg!(feature = "cuda") {
            assert!(resolve(DevicePref::Cuda)
                .expect_err("not compiled")
                .contains("not compiled"));
        }
        for d in ["auto", "cpu", "cuda", "metal"] {
            assert_eq!(DevicePref::parse(d).map(DevicePref::as_str), Some(d));
        }
    }
}
