//! Run-time choice of the CPU instruction set.
//!
//! Kernels come in a portable scalar form (also the reference in tests) and an AVX2+FMA+F16C form.
//! AVX-512 and AMX are deliberately not used: some hosts list AMX in /proc/cpuinfo yet fault on it.
//! `LUMEN_CPU_ISA=scalar` forces the portable path (for comparisons and debugging).

use std::sync::OnceLock;

/// The instruction set the CPU kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports (cached; honours `LUMEN_CPU_ISA=scalar`).
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if std::env::var("LUMEN_CPU_ISA").is_ok_and(|v| v.eq_ignore_ascii_case("scalar")) {
                return Isa::Scalar;
            }
            if Isa::avx2_available() { Isa::Avx2 } else { Isa::Scalar }
        })
    }

    /// Whether AVX2, FMA and F16C are all available.
    pub fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Every instruction set usable on this machine (tests run each kernel under all of them).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if Isa::avx2_available() {
            v.push(Isa::Avx2);
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma+f16c",
        }
    }
}
