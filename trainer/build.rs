//! Bakes libtorch's folder into the binaries' rpath, so they run without LD_LIBRARY_PATH. With the
//! `cuda` feature it also keeps libtorch_cuda linked: it registers the CUDA backend only when loaded,
//! and the linker drops it otherwise (then `Cuda::is_available()` is false).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
            // The CUDA libraries libtorch_cuda needs (cuBLAS, cuDNN, ...) may exist only where it runs.
            println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
