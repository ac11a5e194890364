//! Compiles `proto/lumen.proto` with protox (a pure-Rust protobuf compiler: no `protoc` needed)
//! and generates the tonic client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/lumen.proto");
    let descriptors = protox::compile(["proto/lumen.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
