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
 * Built with sddmm.c by sparseft.kernels and called through ctypes.
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
