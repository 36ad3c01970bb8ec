//! Generates the gRPC code from `proto/` and links libtorch with an rpath.

include!("build_support/libtorch_rpath.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    link_libtorch();

    let protos = ["../proto/flgfn.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts run on one thread, so nothing reads the
        // environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("PROTOC", protoc);
        }
    }
    tonic_prost_build::configure()
        // Weight bytes are shared between sessions without copying.
        .bytes(".flgfn.v1.Weights.safetensors")
        // Undecodable bytes are the client's error, not INTERNAL.
        .codec_path("crate::wire::codec::StrictCodec")
        .compile_protos(&protos, &["../proto"])?;
    Ok(())
}
