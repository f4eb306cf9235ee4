/* Sampled dense-dense products for sparse-delta weight gradients.
 *
 *   out[i] = sum_t g[t * ldg + rows[i]] * x[t * ldx + cols[i]]      for t in [0, n)
 *
 * g is the output gradient [n tokens, out features], x the layer input [n, in features], both
 * row-major as autograd hands them over, so nothing is transposed or copied. Each thread takes a
 * contiguous range of tokens and accumulates all selected entries (a few thousand: they stay in
 * L1 together with one row of g and x); the per-thread partial sums are then added in thread
 * order, so results do not depend on scheduling. Entries sorted by row read g monotonically.
 *
 * Built at first use by sparseft.kernels and called through ctypes; no torch headers needed.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = ((uint32_t)v) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define DEFINE_SDDMM(NAME, IN_T, ACC_T, LOAD)                                                   \
int NAME(const IN_T *g, int64_t ldg, const IN_T *x, int64_t ldx, int64_t n,                    \
         const int32_t *rows, const int32_t *cols, int64_t nnz, ACC_T *out, int threads) {      \
    if (threads < 1) threads = 1;                                                               \
    if (threads > n) threads = n > 0 ? (int)n : 1;                                              \
    ACC_T *partial = (ACC_T *)calloc((size_t)threads * (size_t)nnz, sizeof(ACC_T));             \
    if (partial == NULL) return 1;                                                              \
    _Pragma("omp parallel num_threads(threads)")                                                \
    {                                                                                           \
        int tid = omp_get_thread_num();                                                         \
        int nth = omp_get_num_threads();                                                        \
        int64_t lo = n * tid / nth, hi = n * (tid + 1) / nth;                                   \
        ACC_T *acc = partial + (size_t)tid * (size_t)nnz;                                       \
        for (int64_t t = lo; t < hi; ++t) {                                                     \
            const IN_T *gr = g + t * ldg;                                                       \
            const IN_T *xr = x + t * ldx;                                                       \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < nnz; ++i)                                                   \
                acc[i] += LOAD(gr[rows[i]]) * LOAD(xr[cols[i]]);                                \
        }                                                                                       \
    }                                                                                           \
    for (int64_t i = 0; i < nnz; ++i) {                                                         \
        ACC_T s = 0;                                                                            \
        for (int k = 0; k < threads; ++k) s += partial[(size_t)k * (size_t)nnz + i];           \
        out[i] = s;                                                                             \
    }                                                                                           \
    free(partial);                                                                              \
    return 0;                                                                                   \
}

#define IDENTITY(v) (v)
DEFINE_SDDMM(sddmm_f32, float, float, IDENTITY)
DEFINE_SDDMM(sddmm_f64, double, double, IDENTITY)
DEFINE_SDDMM(sddmm_bf16, uint16_t, float, bf16_to_float)

/* Channel-first variant for pointwise (1x1) convolutions on NCHW tensors:
 *
 *   out[i] = sum_b sum_s g[b * gsb + rows[i] * hw + s] * x[b * xsb + cols[i] * hw + s]
 *
 * Each (channel, image) plane is contiguous, so every term is a contiguous dot product;
 * threads split the selected entries.
 */
#define DEFINE_SDDMM_CF(NAME, IN_T, ACC_T, LOAD)                                                \
int NAME(const IN_T *g, int64_t gsb, const IN_T *x, int64_t xsb, int64_t batch, int64_t hw,    \
         const int32_t *rows, const int32_t *cols, int64_t nnz, ACC_T *out, int threads) {      \
    if (threads < 1) threads = 1;                                                               \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
    for (int64_t i = 0; i < nnz; ++i) {                                                         \
        ACC_T acc = 0;                                                                          \
        for (int64_t b = 0; b < batch; ++b) {                                                   \
            const IN_T *gr = g + b * gsb + (int64_t)rows[i] * hw;                               \
            const IN_T *xr = x + b * xsb + (int64_t)cols[i] * hw;                               \
            ACC_T part = 0;                                                                     \
            _Pragma("omp simd reduction(+:part)")                                               \
            for (int64_t s = 0; s < hw; ++s) part += LOAD(gr[s]) * LOAD(xr[s]);                \
            acc += part;                                                                        \
        }                                                                                       \
        out[i] = acc;                                                                           \
    }                                                                                           \
    return 0;                                                                                   \
}

DEFINE_SDDMM_CF(sddmm_cf_f32, float, float, IDENTITY)
DEFINE_SDDMM_CF(sddmm_cf_f64, double, double, IDENTITY)
DEFINE_SDDMM_CF(sddmm_cf_bf16, uint16_t, float, bf16_to_float)
