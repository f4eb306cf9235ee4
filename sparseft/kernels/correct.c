/* A task's changes applied to a layer's base output, item by item (mixed-task inference).
 *
 * The base layer ran on the whole batch. Item i uses task k = task[i] (-1: the base, left alone). Task k
 * changed the base weight W at the flat indices index[k][0..count[k]) to value[k][...] (index[k] NULL: no
 * entry changed) and the bias b to bias[k][...] (NULL: unchanged). Its items' rows get, in place,
 *
 *   Linear (y, x row-major [batch, tokens, out] and [batch, tokens, in]; entry (o, c) of W [out, in]):
 *     y[i, t, o] += bias[k][o] - b[o]
 *     y[i, t, o] += (value[k][e] - W[o, c]) * x[i, t, c]
 *   2-D convolution (NCHW, zero padding, any stride, dilation, grouping; entry (o, c, ki, kj) of W):
 *     y[i, o, oh, ow] += bias[k][o] - b[o]
 *     y[i, o, oh, ow] += (value[k][e] - W[o, c, ki, kj]) * x[i, g(o)*C/groups + c, oh*sh + ki*dh - ph, ow*sw + kj*dw - pw]
 *
 * The entries are decoded and their changes formed once per call, so nothing of size items x tokens x entries
 * is formed and the caller passes each task's own tensors. One (item, token) row, or one (item, output row) of
 * a convolution, is one unit of work; units are independent, so results do not depend on the thread count.
 * A task whose entries are one per output row in order (GPS with K=1) takes a gather loop the compiler
 * vectorises. Built with sddmm.c by sparseft.kernels and called through ctypes; returns 1 when out of memory.
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int32_t *rows, *cols, *ki, *kj; /* decoded entries of all tasks, task k from start[k] */
    int64_t *start;
    int8_t *in_order;   /* task k's entries are rows 0, 1, 2, ... */
    void *delta;        /* value - W per entry */
    void *bias_delta;   /* [ntask, out] or NULL where no task changed the bias */
    int8_t *has_bias;
} Plan;

static void plan_free(Plan *p) {
    free(p->rows); free(p->cols); free(p->ki); free(p->kj); free(p->start); free(p->in_order);
    free(p->delta); free(p->bias_delta); free(p->has_bias);
}

#define DEFINE_PLAN(NAME, T)                                                                    \
static int NAME(Plan *p, int64_t ntask, const int32_t **index, const T **value,                 \
                const int64_t *count, const T *weight, const T **bias, const T *bias_base,       \
                int64_t out_f, int64_t per_row, int64_t out_per_group, int64_t in_per_group,     \
                int64_t kh, int64_t kw) {                                                       \
    int64_t total = 0;                                                                          \
    for (int64_t k = 0; k < ntask; ++k) total += index[k] ? count[k] : 0;                      \
    size_t n = (size_t)(total > 0 ? total : 1);                                                 \
    p->rows = malloc(n * 4); p->cols = malloc(n * 4); p->ki = malloc(n * 4); p->kj = malloc(n * 4); \
    p->delta = malloc(n * sizeof(T)); p->start = malloc((size_t)(ntask + 1) * 8);               \
    p->in_order = calloc((size_t)ntask, 1); p->has_bias = calloc((size_t)ntask, 1);            \
    p->bias_delta = 0;                                                                          \
    int any_bias = 0;                                                                           \
    for (int64_t k = 0; k < ntask; ++k) any_bias |= bias[k] != 0;                               \
    if (any_bias) p->bias_delta = malloc((size_t)ntask * (size_t)out_f * sizeof(T));            \
    if (!p->rows || !p->cols || !p->ki || !p->kj || !p->delta || !p->start || !p->in_order ||  \
        !p->has_bias || (any_bias && !p->bias_delta)) { plan_free(p); return 1; }               \
    T *delta = (T *)p->delta;                                                                   \
    int64_t at = 0;                                                                             \
    for (int64_t k = 0; k < ntask; ++k) {                                                       \
        p->start[k] = at;                                                                       \
        int in_order = 1;                                                                       \
        const int64_t m = index[k] ? count[k] : 0;                                              \
        const int plain = kh * kw == 1 && out_per_group == out_f; /* a Linear: (row, col) only */ \
        for (int64_t e = 0; e < m; ++e, ++at) {                                                 \
            const int64_t flat = index[k][e], row = flat / per_row, rest = flat - row * per_row; \
            p->rows[at] = (int32_t)row;                                                         \
            if (plain) {                                                                        \
                p->cols[at] = (int32_t)rest; p->ki[at] = 0; p->kj[at] = 0;                      \
            } else {                                                                            \
                const int64_t tap = rest % (kh * kw);                                           \
                p->cols[at] = (int32_t)(row / out_per_group * in_per_group + rest / (kh * kw)); \
                p->ki[at] = (int32_t)(tap / kw);                                                \
                p->kj[at] = (int32_t)(tap % kw);                                                \
            }                                                                                   \
            delta[at] = value[k][e] - weight[flat];                                             \
            in_order = in_order && row == e;                                                    \
        }                                                                                       \
        p->in_order[k] = (int8_t)(in_order && kh * kw == 1);                                    \
        if (bias[k]) {                                                                          \
            p->has_bias[k] = 1;                                                                 \
            T *bd = (T *)p->bias_delta + k * out_f;                                             \
            for (int64_t o = 0; o < out_f; ++o) bd[o] = bias[k][o] - bias_base[o];              \
        }                                                                                       \
    }                                                                                           \
    p->start[ntask] = at;                                                                       \
    return 0;                                                                                   \
}

DEFINE_PLAN(plan_f32, float)
DEFINE_PLAN(plan_f64, double)

#define DEFINE_CORRECT(NAME, PLAN, T)                                                           \
int NAME(T *y, const T *x, int64_t batch, int64_t tokens, int64_t in_f, int64_t out_f,          \
         const int32_t *task, int64_t ntask, const int32_t **index, const T **value,             \
         const int64_t *count, const T *weight, const T **bias, const T *bias_base, int threads) { \
    Plan p;                                                                                     \
    if (PLAN(&p, ntask, index, value, count, weight, bias, bias_base, out_f, in_f, out_f, in_f, 1, 1)) \
        return 1;                                                                               \
    if (threads < 1) threads = 1;                                                               \
    const T *delta = (const T *)p.delta, *bias_delta = (const T *)p.bias_delta;                 \
    const int64_t n = batch * tokens;                                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
    for (int64_t r = 0; r < n; ++r) {                                                           \
        const int32_t k = task[r / tokens];                                                     \
        if (k < 0) continue;                                                                    \
        T *yr = y + r * out_f;                                                                  \
        const T *xr = x + r * in_f;                                                             \
        if (p.has_bias[k]) {                                                                    \
            const T *br = bias_delta + (int64_t)k * out_f;                                      \
            _Pragma("omp simd")                                                                 \
            for (int64_t o = 0; o < out_f; ++o) yr[o] += br[o];                                 \
        }                                                                                       \
        const int64_t lo = p.start[k], m = p.start[k + 1] - lo;                                 \
        const int32_t *rk = p.rows + lo, *ck = p.cols + lo;                                     \
        const T *dk = delta + lo;                                                               \
        if (p.in_order[k]) {                                                                    \
            _Pragma("omp simd")                                                                 \
            for (int64_t e = 0; e < m; ++e) yr[e] += dk[e] * xr[ck[e]];                         \
        } else {                                                                                \
            for (int64_t e = 0; e < m; ++e) yr[rk[e]] += dk[e] * xr[ck[e]];                     \
        }                                                                                       \
    }                                                                                           \
    plan_free(&p);                                                                              \
    return 0;                                                                                   \
}

DEFINE_CORRECT(correct_rows_f32, plan_f32, float)
DEFINE_CORRECT(correct_rows_f64, plan_f64, double)

#define DEFINE_CORRECT_CONV(NAME, PLAN, T)                                                      \
int NAME(T *y, const T *x, int64_t batch, int64_t cx, int64_t h, int64_t w, int64_t cout,       \
         int64_t ho, int64_t wo, int64_t kh, int64_t kw, int64_t groups, int64_t sh, int64_t sw, \
         int64_t ph, int64_t pw, int64_t dh, int64_t dw, const int32_t *task, int64_t ntask,     \
         const int32_t **index, const T **value, const int64_t *count, const T *weight,          \
         const T **bias, const T *bias_base, int threads) {                                      \
    Plan p;                                                                                     \
    const int64_t in_per_group = cx / groups;                                                   \
    if (PLAN(&p, ntask, index, value, count, weight, bias, bias_base, cout, in_per_group * kh * kw, \
             cout / groups, in_per_group, kh, kw))                                              \
        return 1;                                                                               \
    if (threads < 1) threads = 1;                                                               \
    const T *delta = (const T *)p.delta, *bias_delta = (const T *)p.bias_delta;                 \
    const int64_t n = batch * ho;                                                               \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
    for (int64_t r = 0; r < n; ++r) {                                                           \
        const int64_t i = r / ho, oh = r % ho;                                                  \
        const int32_t k = task[i];                                                              \
        if (k < 0) continue;                                                                    \
        if (p.has_bias[k]) {                                                                    \
            const T *bk = bias_delta + (int64_t)k * cout;                                       \
            for (int64_t o = 0; o < cout; ++o) {                                                \
                T *yr = y + ((i * cout + o) * ho + oh) * wo;                                    \
                for (int64_t q = 0; q < wo; ++q) yr[q] += bk[o];                                \
            }                                                                                   \
        }                                                                                       \
        for (int64_t e = p.start[k]; e < p.start[k + 1]; ++e) {                                 \
            const int64_t ih = oh * sh + (int64_t)p.ki[e] * dh - ph;                            \
            if (ih < 0 || ih >= h) continue;                                                    \
            T *yr = y + ((i * cout + p.rows[e]) * ho + oh) * wo;                                \
            const T *xr = x + ((i * cx + p.cols[e]) * h + ih) * w;                              \
            const T d = delta[e];                                                               \
            const int64_t off = (int64_t)p.kj[e] * dw - pw;                                     \
            for (int64_t q = 0; q < wo; ++q) {                                                  \
                const int64_t iw = q * sw + off;                                                \
                if (iw >= 0 && iw < w) yr[q] += d * xr[iw];                                     \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    plan_free(&p);                                                                              \
    return 0;                                                                                   \
}

DEFINE_CORRECT_CONV(correct_conv_f32, plan_f32, float)
DEFINE_CORRECT_CONV(correct_conv_f64, plan_f64, double)
