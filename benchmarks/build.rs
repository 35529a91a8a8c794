//! Compiles the minimal etcd v3 client definitions (the baseline of `sov-bench metad`) with a
//! vendored protoc, so no system protoc is needed. Client side only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_build::configure()
        .build_server(false)
        .bytes(["."])
        .compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
