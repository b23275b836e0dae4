//! Builds the XDP steering program (`ebpf/xdp_steer.c`) with clang into `$OUT_DIR/xdp_steer.o`,
//! which `src/xdp.rs` embeds. Set `CLANG` to use another clang than the one on `PATH`.

use std::{
    env,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // cargo shows a failing build script's stderr.
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or("CARGO_MANIFEST_DIR has no parent")?
        .join("ebpf");
    let source = ebpf_dir.join("xdp_steer.c");
    let object = out_dir.join("xdp_steer.o");

    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The asm/ headers that linux/*.h include live in the host's multiarch directory.
    let host = env_var("HOST")?;
    let arch = host.split('-').next().unwrap_or("x86_64");
    let multiarch_include = format!("/usr/include/{arch}-linux-gnu");

    let output = Command::new(&clang)
        .current_dir(&ebpf_dir)
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(format!("-I{multiarch_include}"))
        // The object (its DWARF and BTF line info) must not depend on where the checkout is.
        .arg(format!("-fdebug-prefix-map={}=ebpf", ebpf_dir.display()))
        .arg("-c")
        .arg("xdp_steer.c")
        .arg("-o")
        .arg(&object)
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                format!("clang not found: run scripts/setup.sh (looked for `{clang}`)")
            } else {
                format!("could not run `{clang}`: {e}")
            }
        })?;

    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "clang failed to build {} ({}):\n{stderr}",
            display_relative(&source, &manifest_dir),
            output.status
        ));
    }
    for line in stderr.lines() {
        println!("cargo:warning={line}");
    }
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set (is this run by cargo?)"))
}

fn display_relative(path: &Path, base: &Path) -> String {
    base.parent()
        .and_then(|root| path.strip_prefix(root).ok())
        .unwrap_or(path)
        .display()
        .to_string()
}
