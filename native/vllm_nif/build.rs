//! With feature `cuda`: keeps the CUDA libraries in the NIF's NEEDED entries although they
//! may be symbol-less stubs at build time (see ../vllm_engine/build.rs).

fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    // nccl: tensor parallel (libnccl.so.2 from the nvidia-nccl wheels on the GPU machine).
    for lib in ["cuda", "cublas", "cublasLt", "curand", "nvrtc", "nccl"] {
        println!("cargo:rustc-link-arg=-l{lib}");
    }
}
