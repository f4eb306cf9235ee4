/* Sparse corrections of a Linear layer's output, item by item (mixed-task inference).
 *
 * The base layer ran on the whole batch: y = x W^T + b, row-major [batch, tokens, out]. Item i uses
 * task k = task[i] (-1: the base, left alone). Its rows get the task's bias change and its entries'
 * products, in place:
 *
 *   y[i, t, o] += bias[k, o]                                             (when bias is given)
 *   y[i, t, rows[k, e]] += delta[k, e] * x[i, t, cols[k, e]]              for e in [0, count[k])
 *
 * x is [batch, tokens, in], row-major. Entries of task k are at [k * stride, k * stride + count[k]).
 * Each (item, token) row is one unit of work: its x row and y row stay in cache while the entries
 * gather and scatter within them, so nothing of size items x tokens x entries is ever formed.
 * Rows are independent, so the result does not depend on the number of threads.
 *
 * Built with sddmm.c by sparseft.kernels and called through ctypes (the convolution form below).
 */
#include <stdint.h>

#define DEFINE_CORRECT(NAME, T)                                                                 \
int NAME(T *y, const T *x, int64_t batch, int64_t tokens, int64_t in_f, int64_t out_f,          \
         const int32_t *task, const int32_t *rows, const int32_t *cols, const T *delta,         \
         const int64_t *count, int64_t stride, const T *bias, int threads) {                    \
    if (threads < 1) threads = 1;                                                               \
    const int64_t n = batch * tokens;                                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
    for (int64_t r = 0; r < n; ++r) {                                                           \
        const int32_t k = task[r / tokens];                                                     \
        if (k < 0) continue;                                                                    \
        T *yr = y + r * out_f;                                                                  \
        const T *xr = x + r * in_f;                                                             \
        if (bias != 0) {                                                                        \
            const T *br = bias + (int64_t)k * out_f;                                            \
            _Pragma("omp simd")                                                                 \
            for (int64_t o = 0; o < out_f; ++o) yr[o] += br[o];                                 \
        }                                                                                       \
        const int32_t *rk = rows + (int64_t)k * stride, *ck = cols + (int64_t)k * stride;       \
        const T *dk = delta + (int64_t)k * stride;                                              \
        for (int64_t e = 0; e < count[k]; ++e) yr[rk[e]] += dk[e] * xr[ck[e]];                  \
    }                                                                                           \
    return 0;                                                                                   \
}

DEFINE_CORRECT(correct_rows_f32, float)
DEFINE_CORRECT(correct_rows_f64, double)

/* The same for a 2-D convolution (NCHW, zero padding, any stride, dilation and grouping): entry e of task k
 * is the weight at (rows[e] output channel, cols[e] input channel of x, ki[e], kj[e]), and
 *
 *   y[i, o, oh, ow] += bias[k, o]
 *   y[i, rows[e], oh, ow] += delta[e] * x[i, cols[e], oh*sh + ki[e]*dh - ph, ow*sw + kj[e]*dw - pw]
 *
 * (a position outside x reads zero). One (item, output row) is one unit of work. */
#define DEFINE_CORRECT_CONV(NAME, T)                                                            \
int NAME(T *y, const T *x, int64_t batch, int64_t cx, int64_t h, int64_t w, int64_t cout,       \
         int64_t ho, int64_t wo, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,    \
         int64_t dw, const int32_t *task, const int32_t *rows, const int32_t *cols,             \
         const int32_t *ki, const int32_t *kj, const T *delta, const int64_t *count,            \
         int64_t stride, const T *bias, int threads) {                                          \
    if (threads < 1) threads = 1;                                                               \
    const int64_t n = batch * ho;                                                               \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
    for (int64_t r = 0; r < n; ++r) {                                                           \
        const int64_t i = r / ho, oh = r % ho;                                                  \
        const int32_t k = task[i];                                                              \
        if (k < 0) continue;                                                                    \
        if (bias != 0) {                                                                        \
            const T *bk = bias + (int64_t)k * cout;                                             \
            for (int64_t o = 0; o < cout; ++o) {                                                \
                T *yr = y + ((i * cout + o) * ho + oh) * wo;                                    \
                for (int64_t q = 0; q < wo; ++q) yr[q] += bk[o];                                \
            }                                                                                   \
        }                                                                                       \
        const int64_t base = (int64_t)k * stride;                                               \
        for (int64_t e = base; e < base + count[k]; ++e) {                                      \
            const int64_t ih = oh * sh + (int64_t)ki[e] * dh - ph;                              \
            if (ih < 0 || ih >= h) continue;                                                    \
            T *yr = y + ((i * cout + rows[e]) * ho + oh) * wo;                                  \
            const T *xr = x + ((i * cx + cols[e]) * h + ih) * w;                                \
            const T d = delta[e];                                                               \
            const int64_t off = (int64_t)kj[e] * dw - pw;                                       \
            for (int64_t q = 0; q < wo; ++q) {                                                  \
                const int64_t iw = q * sw + off;                                                \
                if (iw >= 0 && iw < w) yr[q] += d * xr[iw];                                     \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    return 0;                                                                                   \
}

DEFINE_CORRECT_CONV(correct_conv_f32, float)
DEFINE_CORRECT_CONV(correct_conv_f64, double)
