//! Compiles the gRPC definitions with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // Messages that carry secrets get a hand-written `Debug` (src/lib.rs) that hides them.
    tonic_build::configure()
        .bytes(["."])
        .skip_debug("sov.metad.v1.AccessKeySecret")
        .skip_debug("sov.metad.v1.CreateAccessKeyRequest")
        .skip_debug("sov.metad.v1.DataKey")
        .compile_protos(
            &[
                "proto/storaged.proto",
                "proto/metad.proto",
                "proto/manifest.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
