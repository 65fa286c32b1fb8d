# Sourced after CUDA_HOME is set (pinned toolkit): the link-time names cargo's cuda build needs.
# -lnvrtc, -lcurand, -lcudart need unversioned names; the wheels ship only versioned ones.
ln -sf ../libnvrtc.so.13 "$CUDA_HOME/lib/stubs/libnvrtc.so"
ln -sf ../libcurand.so.10 "$CUDA_HOME/lib/stubs/libcurand.so"
ln -sf ../libcudart.so.13 "$CUDA_HOME/lib/stubs/libcudart.so"
# NCCL (tensor parallel) is only linked against here: a symbol-less stand-in named like the
# real one; the GPU machine's nvidia-nccl wheel resolves it at load time (setup.sh).
[ -f "$CUDA_HOME/lib/stubs/libnccl.so" ] ||
  echo "" | gcc -shared -x c - -o "$CUDA_HOME/lib/stubs/libnccl.so" -Wl,-soname,libnccl.so.2
