//! With the `onnx` feature: Rust types for ONNX's protobuf messages, generated from the vendored
//! `proto/onnx.proto3` by a pure-Rust protobuf compiler (protox), so no system `protoc` and no
//! inference engine are needed to read and write ONNX files.

fn main() {
    println!("cargo::rerun-if-changed=proto/onnx.proto3");
    #[cfg(feature = "onnx")]
    {
        let descriptors = protox::compile(["onnx.proto3"], ["proto"])
            .unwrap_or_else(|e| panic!("proto/onnx.proto3: {e}"));
        prost_build::Config::new()
            .compile_fds(descriptors)
            .unwrap_or_else(|e| panic!("generating the ONNX types: {e}"));
    }
}
