//! Which instruction set our CPU kernels run, chosen once per process: AVX-512 (the packed 16-lane kernels, the
//! Winograd gathers, bf16 where AVX512-BF16 is present), AVX2 + FMA (the Winograd transforms compiled for AVX2;
//! products through `gemm`) or the portable path (plain Rust; `gemm` still picks its own kernels).
//!
//! `RESNET_CPU=avx512|avx2|portable` forces a lower level than the machine has, so that every level can be
//! tested on one machine; a level the CPU lacks, or an unknown value, is reported once on stderr and the
//! detected level is used. Code for x86-64 only is gated by `target_arch`; elsewhere the level is portable.

use std::sync::OnceLock;

/// An instruction-set level, ordered: a higher level can run everything a lower one can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F (BW/VL are not required by our kernels).
    Avx512,
}

impl Level {
    const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// The highest level this CPU runs.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// The level the kernels run at: the detected one, or the lower one `RESNET_CPU` names.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let found = detected();
        let Some(asked) = std::env::var_os("RESNET_CPU") else { return found };
        let asked = asked.to_string_lossy();
        match Level::parse(&asked) {
            Some(l) if l <= found => l,
            Some(_) => {
                eprintln!("RESNET_CPU={asked}: this CPU runs at most {}; using {}", found.name(), found.name());
                found
            }
            None => {
                eprintln!("RESNET_CPU={asked}: expected avx512, avx2 or portable; using {}", found.name());
                found
            }
        }
    })
}

/// Every level this CPU runs, lowest first: what the kernel tests iterate.
pub fn available() -> Vec<Level> {
    Level::ALL.into_iter().filter(|&l| l <= detected()).collect()
}

/// Whether the AVX-512 kernels run (the detected or forced level is AVX-512).
pub fn avx512() -> bool {
    level() == Level::Avx512
}

/// Whether AVX512-VNNI's `vpdpbusd` runs (AVX-512 level and the extension present).
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512() && std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Whether AVX512-BF16's `vdpbf16ps` runs (AVX-512 level and the extension present).
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512() && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Defines `fn $name` as `$body`, compiled three times — for AVX-512, for AVX2+FMA and for the baseline — and
/// run as the best the CPU supports. Lane-wise loops (the Winograd transforms, the element-wise kernels) vectorise;
/// built for the x86-64 baseline they get 4-wide SSE, a third of what the GEMMs they feed run at. Arithmetic is the
/// same in every version (Rust never fuses a multiply and an add by itself), so results do not depend on the CPU.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                match $crate::engine::cpu::isa::level() {
                    // SAFETY: `avx512` only differs from `generic` in the instructions it may use, and
                    // `isa::level` checked the CPU has them (a forced level is never above the detected one).
                    $crate::engine::cpu::isa::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for AVX2 and FMA.
                    $crate::engine::cpu::isa::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::engine::cpu::isa::Level::Portable => {}
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;
