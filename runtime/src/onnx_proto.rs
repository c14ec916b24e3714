//! ONNX's protobuf messages (`ModelProto`, `GraphProto`, `TensorProto`, ...), generated at build
//! time from `proto/onnx.proto3` (see `build.rs`). Used to read and split exported graphs
//! (`runtime import`) and by the trainer's exporter to write them.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
