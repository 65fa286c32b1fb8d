# Sourced by the GPU scripts, from the repository root: unpacks the carried binaries of
# $GPU_DIR (default .gpu) and puts the CUDA 13 libraries that cudarc links against on
# LD_LIBRARY_PATH, wherever this machine keeps them. Sets gpu, out and bin.
gpu=${GPU_DIR:-$PWD/.gpu}
out=${OUT:-$PWD/gpu-results}
mkdir -p "$out"
bin=$gpu/bin
for f in "$bin"/*.gz "$gpu"/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
chmod +x "$bin"/* 2>/dev/null
libdirs=$(python3 - <<'PY'
import glob, os, site
# libnccl.so.2: tensor parallel (the nvidia-nccl-cu13 wheel).
want = ["libcublas.so.13", "libcublasLt.so.13", "libnvrtc.so.13", "libcurand.so.10", "libcudart.so.13", "libnccl.so.2"]
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"]
dirs = []
for w in want:
    for r in roots:
        hits = glob.glob(os.path.join(r, "**", w), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# NVLink multicast must stay off on these machines (the engine sets it too).
export NCCL_NVLS_ENABLE=0
