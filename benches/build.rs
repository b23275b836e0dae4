//! Builds the forwarding benchmark's XDP sink (`xdp_sink.c`) with clang into
//! `$OUT_DIR/xdp_sink.o`, which `src/bin/espgw-xdpgen.rs` embeds. Set `CLANG` to use another
//! clang than the one on `PATH`. Same recipe as `dataplane/build.rs`.

use std::{
    env,
    io::ErrorKind,
    path::PathBuf,
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let object = out_dir.join("xdp_sink.o");

    println!("cargo:rerun-if-changed=xdp_sink.c");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The asm/ headers that linux/*.h include live in the host's multiarch directory.
    let host = env_var("HOST")?;
    let arch = host.split('-').next().unwrap_or("x86_64");
    let multiarch_include = format!("/usr/include/{arch}-linux-gnu");

    let output = Command::new(&clang)
        .current_dir(&manifest_dir)
        .args(["-O2", "-g", "-Wall", "-target", "bpf"])
        .arg(format!("-I{multiarch_include}"))
        // The object must not depend on where the checkout is.
        .arg(format!(
            "-fdebug-prefix-map={}=benches",
            manifest_dir.display()
        ))
        .arg("-c")
        .arg("xdp_sink.c")
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
            "clang failed to build benches/xdp_sink.c ({}):\n{stderr}",
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
