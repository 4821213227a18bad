//! Run-time CPU feature detection: which SIMD kernels this process may call.
//!
//! Detection runs once (`OnceLock`); every dispatcher then matches on the cached [`Isa`].
//! Setting `EDGEFUSION_NO_SIMD` to any non-empty value other than `0` forces [`Isa::Scalar`],
//! which is how CI exercises the reference paths on SIMD-capable machines. Setting
//! `EDGEFUSION_ISA` to an ISA's name (`scalar`, `avx2`, `avx512`, `avx512vnni`, `neon`) that
//! this machine can run uses that one instead of the widest: an AVX-512 machine then runs, and
//! can measure and test, what an AVX2 machine runs.

use std::sync::OnceLock;

/// The widest instruction set the kernels use on this machine.
///
/// Variants are ordered by capability on x86: `Avx512Vnni` implies `Avx512` implies `Avx2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust only.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX2 plus AVX-512 F, BW and VL.
    Avx512,
    /// [`Isa::Avx512`] plus AVX-512 VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// aarch64 with Advanced SIMD (always present on aarch64).
    Neon,
}

impl Isa {
    /// Short lowercase name, as printed in logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
        }
    }

    /// True when the AVX2 (+FMA, F16C) kernels may run.
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni)
    }

    /// True when the AVX-512 F/BW/VL kernels may run.
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Vnni)
    }
}

/// Name of the environment variable that forces the scalar kernels.
pub const NO_SIMD_ENV: &str = "EDGEFUSION_NO_SIMD";

/// Name of the environment variable that names the ISA to use (one this machine can run).
pub const ISA_ENV: &str = "EDGEFUSION_ISA";

static ISA: OnceLock<Isa> = OnceLock::new();

/// The ISA the dispatchers use, detected on first call and cached for the process. An
/// `EDGEFUSION_ISA` this machine cannot run (or that names none) is reported on stderr and
/// the detected ISA used.
pub fn isa() -> Isa {
    *ISA.get_or_init(|| {
        let no_simd = std::env::var_os(NO_SIMD_ENV);
        let no_simd = no_simd.as_ref().and_then(|v| v.to_str());
        let named = std::env::var_os(ISA_ENV);
        let named = named.as_ref().map(|v| v.to_str().unwrap_or("(not UTF-8)"));
        choose_named_isa(no_simd, named, detect()).unwrap_or_else(|err| {
            eprintln!("warning: {err}; using {}", detect().name());
            choose_isa(no_simd, detect())
        })
    })
}

/// The ISA to use given the `EDGEFUSION_NO_SIMD` value (which wins), the `EDGEFUSION_ISA`
/// value and what the hardware offers. Pure, so testable without the process environment.
///
/// # Errors
/// If the named ISA is unknown or cannot run on a machine whose widest ISA is `detected`.
pub fn choose_named_isa(
    no_simd: Option<&str>,
    named: Option<&str>,
    detected: Isa,
) -> Result<Isa, String> {
    let name = match named.map(str::trim) {
        Some(name) if !name.is_empty() && !simd_disabled_by(no_simd) => name,
        _ => return Ok(choose_isa(no_simd, detected)),
    };
    let all = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Neon,
    ];
    let runnable: Vec<&str> = all
        .into_iter()
        .filter(|&isa| runs_on(isa, detected))
        .map(Isa::name)
        .collect();
    match all
        .into_iter()
        .find(|isa| isa.name().eq_ignore_ascii_case(name))
    {
        Some(isa) if runs_on(isa, detected) => Ok(isa),
        Some(_) => Err(format!(
            "{ISA_ENV}={name}: this CPU cannot run it (it runs {})",
            runnable.join(", ")
        )),
        None => Err(format!(
            "{ISA_ENV}={name}: not an ISA name (this CPU runs {})",
            runnable.join(", ")
        )),
    }
}

/// Whether an `EDGEFUSION_NO_SIMD` value asks for scalar kernels: any non-empty value but `0`.
pub fn simd_disabled_by(env_value: Option<&str>) -> bool {
    matches!(env_value.map(str::trim), Some(v) if !v.is_empty() && v != "0")
}

/// The ISA to use given the env override value and what the hardware offers.
/// Pure, so the override logic is testable without touching the process environment.
pub fn choose_isa(env_value: Option<&str>, detected: Isa) -> Isa {
    if simd_disabled_by(env_value) {
        Isa::Scalar
    } else {
        detected
    }
}

/// The widest ISA the hardware supports, ignoring the environment (probed once).
pub fn detect() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(probe)
}

fn probe() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if !avx2 {
            return Isa::Scalar;
        }
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if !avx512 {
            return Isa::Avx2;
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            Isa::Avx512Vnni
        } else {
            Isa::Avx512
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            Isa::Neon
        } else {
            Isa::Scalar
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Isa::Scalar
    }
}

/// Whether kernels for `isa` may run on this machine (`Scalar` always may).
pub fn is_runnable(isa: Isa) -> bool {
    runs_on(isa, detect())
}

/// Whether kernels for `isa` may run on a machine whose widest ISA is `detected`.
fn runs_on(isa: Isa, detected: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        Isa::Avx2 => detected.has_avx2(),
        Isa::Avx512 => detected.has_avx512(),
        Isa::Avx512Vnni => detected == Isa::Avx512Vnni,
        Isa::Neon => detected == Isa::Neon,
    }
}

/// Every ISA whose kernels can run on this machine, narrowest first (always starts with
/// `Scalar`). Tests iterate this to check each SIMD kernel against its scalar twin.
pub fn available_isas() -> Vec<Isa> {
    let best = detect();
    let mut isas = vec![Isa::Scalar];
    match best {
        Isa::Scalar => {}
        Isa::Neon => isas.push(Isa::Neon),
        Isa::Avx2 => isas.push(Isa::Avx2),
        Isa::Avx512 => isas.extend([Isa::Avx2, Isa::Avx512]),
        Isa::Avx512Vnni => isas.extend([Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni]),
    }
    isas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_override_parsing() {
        assert!(!simd_disabled_by(None));
        assert!(!simd_disabled_by(Some("")));
        assert!(!simd_disabled_by(Some("0")));
        assert!(!simd_disabled_by(Some(" 0 ")));
        assert!(simd_disabled_by(Some("1")));
        assert!(simd_disabled_by(Some("yes")));
        assert!(simd_disabled_by(Some("true")));
    }

    #[test]
    fn choose_isa_honours_override() {
        assert_eq!(choose_isa(Some("1"), Isa::Avx512Vnni), Isa::Scalar);
        assert_eq!(choose_isa(Some("0"), Isa::Avx2), Isa::Avx2);
        assert_eq!(choose_isa(None, Isa::Neon), Isa::Neon);
        assert_eq!(choose_isa(Some(""), Isa::Avx512), Isa::Avx512);
    }

    #[test]
    fn named_isa_is_used_where_it_runs() {
        let vnni = Isa::Avx512Vnni;
        assert_eq!(choose_named_isa(None, Some("avx2"), vnni), Ok(Isa::Avx2));
        assert_eq!(
            choose_named_isa(None, Some(" AVX512 "), vnni),
            Ok(Isa::Avx512)
        );
        assert_eq!(
            choose_named_isa(None, Some("scalar"), Isa::Neon),
            Ok(Isa::Scalar)
        );
        assert_eq!(choose_named_isa(None, Some(""), vnni), Ok(vnni));
        assert_eq!(choose_named_isa(None, None, Isa::Avx2), Ok(Isa::Avx2));
        // EDGEFUSION_NO_SIMD wins.
        assert_eq!(
            choose_named_isa(Some("1"), Some("avx2"), vnni),
            Ok(Isa::Scalar)
        );
        let err = choose_named_isa(None, Some("avx512"), Isa::Avx2).unwrap_err();
        assert!(
            err.contains("EDGEFUSION_ISA=avx512") && err.contains("scalar, avx2"),
            "{err}"
        );
        let err = choose_named_isa(None, Some("sse9"), Isa::Avx2).unwrap_err();
        assert!(err.contains("not an ISA name"), "{err}");
        assert!(choose_named_isa(None, Some("neon"), vnni).is_err());
    }

    #[test]
    fn cached_isa_is_runnable() {
        let chosen = isa();
        assert!(is_runnable(chosen));
        assert_eq!(isa(), chosen, "isa() must be stable across calls");
        assert!(available_isas().contains(&chosen));
        for listed in available_isas() {
            assert!(
                is_runnable(listed),
                "{} listed but not runnable",
                listed.name()
            );
        }
        assert!(is_runnable(Isa::Scalar));
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn aarch64_always_has_neon() {
        assert_eq!(detect(), Isa::Neon);
        assert_eq!(available_isas(), vec![Isa::Scalar, Isa::Neon]);
    }

    #[test]
    fn capability_helpers_are_consistent() {
        assert!(Isa::Avx512Vnni.has_avx512() && Isa::Avx512Vnni.has_avx2());
        assert!(Isa::Avx512.has_avx2() && !Isa::Avx2.has_avx512());
        assert!(!Isa::Scalar.has_avx2() && !Isa::Neon.has_avx2());
    }
}
