/* libcublas.so.12 for the GPU check only: forwards the eight cuBLAS calls of the faiss-gpu-cu12 wheel to the
 * cuBLAS 13 that the GPU machine's PyTorch brings. cuBLAS 12 (400+ MB of wheels) cannot travel to that machine
 * (64 MiB a call); these eight functions kept their C signatures from 12 to 13. gpu_check.sh builds it with
 * cublas12_shim.map (every symbol at version libcublas.so.12, as FAISS asks) and CUBLAS13 = the real library's
 * path; the library is opened at the first call, so loading FAISS on a machine without it still works. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef CUBLAS13
#error "build with -DCUBLAS13='\"/path/to/libcublas.so.13\"'"
#endif

typedef int status_t;
typedef void *handle_t;
typedef void *stream_t;

static void *real(const char *name) {
    static void *library;
    if (!library && !(library = dlopen(CUBLAS13, RTLD_NOW | RTLD_GLOBAL))) {
        fprintf(stderr, "cublas12_shim: cannot open %s: %s\n", CUBLAS13, dlerror());
        abort();
    }
    void *function = dlsym(library, name);
    if (!function) {
        fprintf(stderr, "cublas12_shim: %s has no %s\n", CUBLAS13, name);
        abort();
    }
    return function;
}

#define FORWARD(name, params, args)                                   \
    status_t name params {                                            \
        static status_t(*target) params;                              \
        if (!target) *(void **)&target = real(#name);                 \
        return target args;                                           \
    }

FORWARD(cublasCreate_v2, (handle_t *handle), (handle))
FORWARD(cublasDestroy_v2, (handle_t handle), (handle))
FORWARD(cublasSetStream_v2, (handle_t handle, stream_t stream), (handle, stream))
FORWARD(cublasGetMathMode, (handle_t handle, int *mode), (handle, mode))
FORWARD(cublasSetMathMode, (handle_t handle, int mode), (handle, mode))
FORWARD(cublasSgemmEx,
        (handle_t handle, int transa, int transb, int m, int n, int k, const float *alpha, const void *a,
         int a_type, int lda, const void *b, int b_type, int ldb, const float *beta, void *c, int c_type, int ldc),
        (handle, transa, transb, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc))
FORWARD(cublasGemmEx,
        (handle_t handle, int transa, int transb, int m, int n, int k, const void *alpha, const void *a,
         int a_type, int lda, const void *b, int b_type, int ldb, const void *beta, void *c, int c_type, int ldc,
         int compute_type, int algo),
        (handle, transa, transb, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc,
         compute_type, algo))
FORWARD(cublasGemmStridedBatchedEx,
        (handle_t handle, int transa, int transb, int m, int n, int k, const void *alpha, const void *a,
         int a_type, int lda, long long stride_a, const void *b, int b_type, int ldb, long long stride_b,
         const void *beta, void *c, int c_type, int ldc, long long stride_c, int batch_count, int compute_type,
         int algo),
        (handle, transa, transb, m, n, k, alpha, a, a_type, lda, stride_a, b, b_type, ldb, stride_b, beta, c,
         c_type, ldc, stride_c, batch_count, compute_type, algo))
