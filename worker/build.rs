//! Compiles the CUDA kernels in `src/kernels/cuda/*.cu` with nvcc, only when the `cuda` feature
//! is on (the default build needs no CUDA toolkit). Each `.cu` file becomes one fatbin in
//! `OUT_DIR`: sm_90a machine code (Hopper loads it at once) plus compute_80 PTX (any GPU from
//! Ampere on JIT-compiles it). The Rust side embeds them with `include_bytes!`. Each file also
//! becomes `{stem}.ptx`, its compute_80 PTX alone, which `LUMEN_CUDA_KERNEL_IMAGE=ptx` loads in
//! place of the fatbin: a Hopper machine then runs the code an A10G JIT-compiles (the `ptx` step
//! of scripts/gpu/run-on-device.sh; `CUDA_FORCE_PTX_JIT` cannot do it, as it also forces cuBLAS
//! onto PTX it does not ship).
//!
//! nvcc is found through `NVCC`, then `CUDA_ROOT/bin`, `CUDA_HOME/bin`, `CUDA_PATH/bin`, then
//! `PATH`. `LUMEN_NVCC_GENCODE` replaces the default `-gencode` flags (space-separated).

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "src/kernels/cuda";
const DEFAULT_GENCODE: &[&str] = &["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=compute_80"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=LUMEN_NVCC_GENCODE");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    let gencode: Vec<String> = match std::env::var("LUMEN_NVCC_GENCODE") {
        Ok(flags) => flags.split_whitespace().map(str::to_string).collect(),
        Err(_) => DEFAULT_GENCODE.iter().map(|s| s.to_string()).collect(),
    };
    let mut sources: Vec<PathBuf> = std::fs::read_dir(KERNEL_DIR)
        .unwrap_or_else(|e| panic!("cannot list {KERNEL_DIR}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    sources.sort();
    // The directory itself too, so that a new kernel file triggers a rebuild.
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for source in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let stem = source.file_stem().and_then(|s| s.to_str()).expect("UTF-8 kernel file name");
        let output = out_dir.join(format!("{stem}.fatbin"));
        let status = Command::new(&nvcc)
            .arg("--fatbin")
            .args(&gencode)
            .args(["-O3", "-std=c++17", "-Xptxas=--warn-on-spills"])
            .arg("-I")
            .arg(KERNEL_DIR)
            .arg("-o")
            .arg(&output)
            .arg(source)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (set NVCC or CUDA_ROOT)", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", source.display());
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17"])
            .arg("-I")
            .arg(KERNEL_DIR)
            .arg("-o")
            .arg(&ptx)
            .arg(source)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (set NVCC or CUDA_ROOT)", nvcc.display()));
        assert!(status.success(), "nvcc --ptx failed on {}", source.display());
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let candidate = Path::new(&root).join("bin/nvcc");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("nvcc")
}
