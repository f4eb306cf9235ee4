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

/* tokens per tile: each entry's running sum stays in a register for a tile (the sums and their
 * order of addition are those of one token at a time) */
#define SDDMM_TOKENS 16

#define DEFINE_SDDMM(NAME, IN_T, ACC_T, LOAD)                                                   \
int NAME(const IN_T *g, int64_t ldg, const IN_T *x, int64_t ldx, int64_t n,                    \
         const int32_t *rows, const int32_t *cols, int64_t nnz, ACC_T *out, int threads) {      \
    if (threads < 1) threads = 1;                                                               \
    if (threads > n) threads = n > 0 ? (int)n : 1;                                              \
    ACC_T *partial = (ACC_T *)calloc((size_t)threads * (size_t)nnz, sizeof(ACC_T));             \
    if (partial == NULL) return 1;                                                              \
    int one_per_row = 1; /* entry i in row i (GPS with K=1): g is read contiguously */          \
    for (int64_t i = 0; i < nnz && one_per_row; ++i) one_per_row = rows[i] == i;                \
    _Pragma("omp parallel num_threads(threads)")                                                \
    {                                                                                           \
        int tid = omp_get_thread_num();                                                         \
        int nth = omp_get_num_threads();                                                        \
        int64_t lo = n * tid / nth, hi = n * (tid + 1) / nth;                                   \
        ACC_T *acc = partial + (size_t)tid * (size_t)nnz;                                       \
        for (int64_t t0 = lo; t0 < hi; t0 += SDDMM_TOKENS) {                                    \
            const int64_t tn = hi - t0 < SDDMM_TOKENS ? hi - t0 : SDDMM_TOKENS;                 \
            const IN_T *g0 = g + t0 * ldg;                                                      \
            const IN_T *x0 = x + t0 * ldx;                                                      \
            if (one_per_row) {                                                                  \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < nnz; ++i) {                                             \
                    ACC_T s = acc[i];                                                           \
                    const int64_t c = cols[i];                                                  \
                    for (int64_t u = 0; u < tn; ++u)                                            \
                        s += LOAD(g0[u * ldg + i]) * LOAD(x0[u * ldx + c]);                     \
                    acc[i] = s;                                                                 \
                }                                                                               \
            } else {                                                                            \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < nnz; ++i) {                                             \
                    ACC_T s = acc[i];                                                           \
                    const int64_t r = rows[i], c = cols[i];                                     \
                    for (int64_t u = 0; u < tn; ++u)                                            \
                        s += LOAD(g0[u * ldg + r]) * LOAD(x0[u * ldx + c]);                     \
                    acc[i] = s;                                                                 \
                }                                                                               \
            }                                                                                   \
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

/* General 2-D convolution (any kernel size, stride, padding, dilation, groups), NCHW:
 *
 *   out[i] = sum_{b, yo, xo} g[b, rows[i], yo, xo] * x[b, cols[i], yo*sh + ki[i]*dh - ph, xo*sw + kj[i]*dw - pw]
 *
 * (terms that fall into the zero padding are skipped). `x` may hold only the input channels
 * the selected entries use (`cols` index into it). With stride 1 the innermost loop reads both
 * rows contiguously.
 */
#define DEFINE_SDDMM_CONV(NAME, IN_T, ACC_T, LOAD)                                              \
int NAME(const IN_T *g, const IN_T *x, int64_t batch, int64_t cout, int64_t cx, int64_t h,       \
         int64_t w, int64_t ho, int64_t wo, int64_t sh, int64_t sw, int64_t ph, int64_t pw,      \
         int64_t dh, int64_t dw, const int32_t *ki, const int32_t *kj, const int32_t *rows,      \
         const int32_t *cols, int64_t nnz, ACC_T *out, int threads) {                           \
    if (threads < 1) threads = 1;                                                               \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
    for (int64_t i = 0; i < nnz; ++i) {                                                         \
        const int64_t di = (int64_t)ki[i] * dh - ph, dj = (int64_t)kj[i] * dw - pw;             \
        int64_t ylo = di >= 0 ? 0 : (-di + sh - 1) / sh;                                        \
        int64_t yhi = (h - 1 - di) < 0 ? -1 : (h - 1 - di) / sh;                                \
        int64_t xlo = dj >= 0 ? 0 : (-dj + sw - 1) / sw;                                        \
        int64_t xhi = (w - 1 - dj) < 0 ? -1 : (w - 1 - dj) / sw;                                \
        if (yhi > ho - 1) yhi = ho - 1;                                                         \
        if (xhi > wo - 1) xhi = wo - 1;                                                         \
        ACC_T acc = 0;                                                                          \
        for (int64_t b = 0; b < batch; ++b) {                                                   \
            const IN_T *gp = g + (b * cout + rows[i]) * ho * wo;                                \
            const IN_T *xp = x + (b * cx + cols[i]) * h * w;                                    \
            for (int64_t yo = ylo; yo <= yhi; ++yo) {                                           \
                const IN_T *gr = gp + yo * wo;                                                  \
                const IN_T *xr = xp + (yo * sh + di) * w + dj;                                  \
                ACC_T part = 0;                                                                 \
                if (sw == 1) {                                                                  \
                    _Pragma("omp simd reduction(+:part)")                                       \
                    for (int64_t xo = xlo; xo <= xhi; ++xo) part += LOAD(gr[xo]) * LOAD(xr[xo]);\
                } else {                                                                        \
                    for (int64_t xo = xlo; xo <= xhi; ++xo) part += LOAD(gr[xo]) * LOAD(xr[xo * sw]);\
                }                                                                               \
                acc += part;                                                                    \
            }                                                                                   \
        }                                                                                       \
        out[i] = acc;                                                                           \
    }                                                                                           \
    return 0;                                                                                   \
}

DEFINE_SDDMM_CONV(sddmm_conv_f32, float, float, IDENTITY)
DEFINE_SDDMM_CONV(sddmm_conv_f64, double, double, IDENTITY)
DEFINE_SDDMM_CONV(sddmm_conv_bf16, uint16_t, float, bf16_to_float)
