// Issue 7, session 14: kernels/gemv_staged.cu (one-row products whose blocks bulk-copy their
// weight rows into shared memory before pdl_wait, so the next product's copies run under this
// one's hop and arithmetic) against gemv_fused (kernels/ops.cu), outside the engine.
// Checks gemv_staged against gemv_fused on every mode, then times W3's 24 layers of products
// (qkv with its norm, o_proj + residual, gate_up with its norm and SiLU, down + residual; no
// attention) as PDL launches in one CUDA graph, each form alone and each product alone; then
// the logits (W3's lm_head, streamed through gemv_staged's ring since session 15) alone and
// after the chain. STG_ROWS and STG_KB override the ring's rows a buffer (16) and its shared
// bytes (144 KB) as gemv_staged.rs plans them.
// Build (development machine): nvcc -O3 -arch=sm_90 -std=c++17 gemv_staged.cu -o gemv_staged
// (-DSTG_TENSOR=0: gate_up's sums on the CUDA cores, as before session 17).
// With -DSTG_STAMPS, every block of layers 12 and 13's products stamps %globaltimer (see
// STG_STAMP in the kernel), and the last chain's timeline is printed.
#ifdef STG_STAMPS
#include "stamps.cuh"
#endif
#include "../../../kernels/gemv_staged.cu"
#include "../../../kernels/ops.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.cuh"
#include "device_compare.cuh"
#include "fill.cuh"
#include "pdl_launch.cuh"
#include "staged_launch.cuh"
#include "timing.cuh"

typedef __nv_bfloat16 bf;

static void fused(void* y, const void* x, const bf* w, const bf* norm_w, int out, int inner, int mode) {
    gemv_one_row(y, x, w, norm_w, out, inner, mode, 1e-6f);
}

typedef void (*Gemv)(void*, const void*, const bf*, const bf*, int, int, int);

int main() {
    CK(cudaStreamCreate(&st));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int HID = 896, QKV = 1152, INTER = 4864, L = 24;
    const size_t per_layer = (size_t)QKV * HID + (size_t)HID * HID + 2ull * INTER * HID + (size_t)HID * INTER;
    bf* wts;
    CK(cudaMalloc(&wts, per_layer * L * 2));
    fill<<<4096, 256, 0, st>>>(wts, per_layer * L, 7, 0.05f);
#ifdef STG_STAMPS
    stamps_setup(wts + per_layer * 12, per_layer * 2);
#endif
    auto W = [&](int l, int which) -> bf* {
        const size_t o[4] = {0, (size_t)QKV * HID, (size_t)QKV * HID + (size_t)HID * HID,
                             (size_t)QKV * HID + (size_t)HID * HID + 2ull * INTER * HID};
        return wts + per_layer * l + o[which];
    };
    const int VOCAB = 151936;
    bf *lm;
    CK(cudaMalloc(&lm, (size_t)VOCAB * HID * 2));
    fill<<<4096, 256, 0, st>>>(lm, (size_t)VOCAB * HID, 23, 0.05f);
    float *logits, *logits2;
    CK(cudaMalloc(&logits, VOCAB * 4));
    CK(cudaMalloc(&logits2, VOCAB * 4));
    bf *qkv, *qkv2, *act, *act2, *nw;
    float *h, *h2, *h0;
    CK(cudaMalloc(&qkv, QKV * 2));
    CK(cudaMalloc(&qkv2, QKV * 2));
    CK(cudaMalloc(&act, INTER * 2));
    CK(cudaMalloc(&act2, INTER * 2));
    CK(cudaMalloc(&nw, HID * 2));
    CK(cudaMalloc(&h, HID * 4));
    CK(cudaMalloc(&h2, HID * 4));
    CK(cudaMalloc(&h0, HID * 4));
    fill<<<64, 256, 0, st>>>(h0, HID, 17, 2.f);
    fill<<<64, 256, 0, st>>>(nw, HID, 13, 1.f);
    fill<<<64, 256, 0, st>>>(act, INTER, 11, 1.f);
    fill<<<64, 256, 0, st>>>(qkv, QKV, 19, 1.f);

    // Checks: every mode of gemv_staged against gemv_fused from the same inputs.
    bool ok = true;
    CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(qkv2, h, W(0, 0), nw, QKV, HID, GEMV_STORE);
    staged(qkv, h, W(0, 0), nw, QKV, HID, GEMV_STORE);
    const double e_qkv = rel(qkv, qkv2, QKV);
    fused(act2, h, W(0, 2), nw, INTER, HID, GEMV_SILU);
    staged(act, h, W(0, 2), nw, INTER, HID, GEMV_SILU);
    const double e_gu = rel(act, act2, INTER);
    CK(cudaMemcpyAsync(h2, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(h2, act, W(0, 3), nullptr, HID, INTER, GEMV_ADD);
    staged(h, act, W(0, 3), nullptr, HID, INTER, GEMV_ADD);
    const double e_down = rel(h, h2, HID);
    CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    CK(cudaMemcpyAsync(h2, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(h2, qkv, W(0, 1), nullptr, HID, HID, GEMV_ADD);
    staged(h, qkv, W(0, 1), nullptr, HID, HID, GEMV_ADD);
    const double e_o = rel(h, h2, HID);
    // A residual add behind a norm (the engine has none, the kernel allows it): x' from h0.
    CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    CK(cudaMemcpyAsync(h2, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(h2, h0, W(0, 1), nw, HID, HID, GEMV_ADD);
    staged(h, h0, W(0, 1), nw, HID, HID, GEMV_ADD);
    const double e_norm_add = rel(h, h2, HID);
    fused(logits2, h, lm, nw, VOCAB, HID, GEMV_STORE_F32);
    staged(logits, h, lm, nw, VOCAB, HID, GEMV_STORE_F32);
    const double e_lm = rel(logits, logits2, VOCAB);
    CK(cudaStreamSynchronize(st));
    // Sums in another order: a few bf16 roundings of the outputs may flip.
    ok = e_qkv < 5e-3 && e_gu < 5e-3 && e_down < 1e-3 && e_o < 1e-3 && e_norm_add < 1e-3 && e_lm < 1e-5;
    printf("check staged vs fused: norm+qkv %.2e, norm+gate_up+silu %.2e, down+residual %.2e, o+residual %.2e, "
           "norm+o+residual %.2e, norm+logits (streamed) %.2e: %s\n",
           e_qkv, e_gu, e_down, e_o, e_norm_add, e_lm, ok ? "PASS" : "FAIL");

    struct Op { const char* name; int which, out, inner, mode; bool norm; } ops[] = {
        {"qkv", 0, QKV, HID, GEMV_STORE, true}, {"o", 1, HID, HID, GEMV_ADD, false},
        {"gate_up", 2, INTER, HID, GEMV_SILU, true}, {"down", 3, HID, INTER, GEMV_ADD, false}};
    auto run_op = [&](Gemv g, const Op& op, int l) {
        void* y = op.which == 0 ? (void*)qkv : op.which == 2 ? (void*)act : (void*)h;
        const void* x = op.norm ? (const void*)h : op.which == 1 ? (const void*)qkv : (const void*)act;
        g(y, x, W(l, op.which), op.norm ? nw : nullptr, op.out, op.inner, op.mode);
    };
    const double layer_mb = per_layer * 2 / 1e6;
    printf("time (us, median of 30 graph replays; W3 shapes, %d SMs, one row):\n", sms);
    const Gemv forms[2] = {fused, staged};
    const char* names[2] = {"fused", "staged"};
    for (auto& op : ops) {
        float t[2];
        for (int f = 0; f < 2; f++) t[f] = time_graph(st, [&] { for (int l = 0; l < L; l++) run_op(forms[f], op, l); }) * 1e3f / L;
        const double mb = (double)op.out * (op.mode == GEMV_SILU ? 2 : 1) * op.inner * 2 / 1e6;
        printf("  %-8s %6.2f MB alone, 24 in a row: fused %6.2f  staged %6.2f\n", op.name, mb, t[0], t[1]);
    }
    {
        float t[2];
        for (int f = 0; f < 2; f++)
            t[f] = time_graph(st, [&] { for (int l = 0; l < 8; l++) forms[f](logits, h, lm, nw, VOCAB, HID, GEMV_STORE_F32); }) *
                   1e3f / 8;
        const double mb = (double)VOCAB * HID * 2 / 1e6;
        printf("  logits %6.2f MB alone, 8 in a row: fused %6.2f (%.2f TB/s)  staged %6.2f (%.2f TB/s)\n", mb, t[0],
               mb / 1e6 / (t[0] * 1e-6), t[1], mb / 1e6 / (t[1] * 1e-6));
    }
    for (int f = 0; f < 2; f++)
        for (int lm_head = 0; lm_head < 2; lm_head++) {
            CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
            const float ms = time_graph(st, [&] {
                for (int l = 0; l < L; l++)
                    for (auto& op : ops) run_op(forms[f], op, l);
                if (lm_head) forms[f](logits, h, lm, nw, VOCAB, HID, GEMV_STORE_F32);
            });
            if (lm_head)
                printf("  the chain and the logits, %s: %.1f us\n", names[f], ms * 1e3f);
            else
                printf("  chain of 24 layers (qkv, o, gate_up, down), %s: %.1f us = %.2f us a layer (%.2f TB/s)\n", names[f],
                       ms * 1e3f, ms * 1e3f / L, layer_mb * L / 1e6 / (ms * 1e-3));
        }
#ifdef STG_STAMPS
    stamps_print();
#endif
    printf("gemv_staged: %s\n", ok ? "all checks PASS" : "some check FAILED");
    return ok ? 0 : 1;
}
