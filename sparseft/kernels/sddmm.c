/* Sampled dense-dense products for sparse-delta weight gradients.
 *
 *   out[i] = sum_t g[t * ldg + rows[i]] * x[t * ldx + cols[i]]      for t in [0, n)
 *   colsum[r] = sum_t g[t * ldg + r]                                  for r in [0, wsum), when wsum > 0
 *
 * colsum is the layer's bias gradient: summed while g's tile is in cache, it costs no second
 * read of g (a tile's sum first, then added to the running sum: a two-level cascade).
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

/* How a tile of x reaches the products. Float and double are read in place. bfloat16 x is first
 * widened to float, a tile at a time, into a per-thread buffer of the columns the entries use (an
 * exact conversion): the entries gather from that buffer with float loads instead of widening
 * every gathered 16-bit value (AVX-512 has no 16-bit gather, and a layer's entries outnumber the
 * columns they read). g is read where it lies (rows in order: contiguous, or nearly). */
#define STAGE_NONE_DECL(T)
#define STAGE_NONE_TILE(IT, T)                                                                    \
    const T *gt = g0, *xt = x0;                                                                 \
    const int64_t lg = ldg, lx = ldx;
#define STAGE_NONE_FREE
#define STAGE_NONE_LOAD(v) (v)
#define STAGE_BF16_LOAD(v) bf16_to_float(v)

#define STAGE_BF16_DECL(T)                                                                      \
    T *xs = (T *)malloc((size_t)SDDMM_TOKENS * (size_t)wx * sizeof(T));                         \
    if (xs == NULL) failed = 1;
#define STAGE_BF16_TILE(IT, T)                                                                    \
    if (xs == NULL) break;                                                                      \
    for (int64_t u = 0; u < tn; ++u) {                                                          \
        _Pragma("omp simd")                                                                     \
        for (int64_t c = 0; c < wx; ++c) xs[u * wx + c] = bf16_to_float(x0[u * ldx + c]);      \
    }                                                                                           \
    const IT *gt = g0; const T *xt = xs;                                                        \
    const int64_t lg = ldg, lx = wx;
#define STAGE_BF16_FREE free(xs);

#define DEFINE_SDDMM(NAME, IN_T, ACC_T, STAGE)                                                  \
int NAME(const IN_T *g, int64_t ldg, const IN_T *x, int64_t ldx, int64_t n, int64_t wsum,      \
         ACC_T *colsum, const int32_t *rows, const int32_t *cols, int64_t nnz, ACC_T *out,      \
         int threads) {                                                                         \
    if (threads < 1) threads = 1;                                                               \
    if (threads > n) threads = n > 0 ? (int)n : 1;                                              \
    const int64_t width = nnz + 2 * wsum; /* per thread: entries, column sums, a tile's sums */ \
    ACC_T *partial = (ACC_T *)calloc((size_t)threads * (size_t)width, sizeof(ACC_T));           \
    if (partial == NULL) return 1;                                                              \
    int one_per_row = 1; /* entry i in row i (GPS with K=1): g is read contiguously */          \
    int64_t wx = 0; /* the columns of x the entries read: [0, wx) */                           \
    for (int64_t i = 0; i < nnz; ++i) {                                                         \
        one_per_row = one_per_row && rows[i] == i;                                              \
        if (cols[i] + 1 > wx) wx = cols[i] + 1;                                                 \
    }                                                                                           \
    int failed = 0;                                                                             \
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")                            \
    {                                                                                           \
        int tid = omp_get_thread_num();                                                         \
        int nth = omp_get_num_threads();                                                        \
        int64_t lo = n * tid / nth, hi = n * (tid + 1) / nth;                                   \
        ACC_T *acc = partial + (size_t)tid * (size_t)width;                                     \
        ACC_T *csum = acc + nnz, *tsum = csum + wsum;                                           \
        STAGE##_DECL(ACC_T)                                                                     \
        for (int64_t t0 = lo; t0 < hi; t0 += SDDMM_TOKENS) {                                    \
            const int64_t tn = hi - t0 < SDDMM_TOKENS ? hi - t0 : SDDMM_TOKENS;                 \
            const IN_T *g0 = g + t0 * ldg;                                                      \
            const IN_T *x0 = x + t0 * ldx;                                                      \
            STAGE##_TILE(IN_T, ACC_T)                                                           \
            if (one_per_row) {                                                                  \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < nnz; ++i) {                                             \
                    ACC_T s = acc[i];                                                           \
                    const int64_t c = cols[i];                                                  \
                    for (int64_t u = 0; u < tn; ++u)                                            \
                        s += STAGE##_LOAD(gt[u * lg + i]) * (ACC_T)xt[u * lx + c];                     \
                    acc[i] = s;                                                                 \
                }                                                                               \
            } else {                                                                            \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < nnz; ++i) {                                             \
                    ACC_T s = acc[i];                                                           \
                    const int64_t r = rows[i], c = cols[i];                                     \
                    for (int64_t u = 0; u < tn; ++u)                                            \
                        s += STAGE##_LOAD(gt[u * lg + r]) * (ACC_T)xt[u * lx + c];                     \
                    acc[i] = s;                                                                 \
                }                                                                               \
            }                                                                                   \
            if (wsum > 0) {                                                                     \
                for (int64_t r = 0; r < wsum; ++r) tsum[r] = 0;                                 \
                for (int64_t u = 0; u < tn; ++u) {                                              \
                    _Pragma("omp simd")                                                         \
                    for (int64_t r = 0; r < wsum; ++r) tsum[r] += STAGE##_LOAD(gt[u * lg + r]); \
                }                                                                               \
                _Pragma("omp simd")                                                             \
                for (int64_t r = 0; r < wsum; ++r) csum[r] += tsum[r];                          \
            }                                                                                   \
        }                                                                                       \
        STAGE##_FREE                                                                            \
    }                                                                                           \
    if (failed) {                                                                               \
        free(partial);                                                                          \
        return 1;                                                                               \
    }                                                                                           \
    for (int64_t i = 0; i < nnz; ++i) {                                                         \
        ACC_T s = 0;                                                                            \
        for (int k = 0; k < threads; ++k) s += partial[(size_t)k * (size_t)width + i];         \
        out[i] = s;                                                                             \
    }                                                                                           \
    for (int64_t r = 0; r < wsum; ++r) {                                                        \
        ACC_T s = 0;                                                                            \
        for (int k = 0; k < threads; ++k) s += partial[(size_t)k * (size_t)width + nnz + r];   \
        colsum[r] = s;                                                                          \
    }                                                                                           \
    free(partial);                                                                              \
    return 0;                                                                                   \
}

DEFINE_SDDMM(sddmm_f32, float, float, STAGE_NONE)
DEFINE_SDDMM(sddmm_f64, double, double, STAGE_NONE)
DEFINE_SDDMM(sddmm_bf16, uint16_t, float, STAGE_BF16)

#define IDENTITY(v) (v)

/* Entries grouped by input channel (the blocked conv kernels below).
 *
 * A counting sort of the entries by `cols` (stable: entries of one channel keep their order),
 * cut into blocks of at most CONV_BLOCK entries of one channel. A block is one unit of work: for
 * each image it reads its channel's input plane once from memory and keeps it in cache (L1 for
 * the planes of a CNN at the sizes trained here) while every entry of the block is summed against
 * it, instead of reading the plane again per entry. Returns 0, or 1 when out of memory; the
 * caller frees *order and *start.
 */
#define CONV_BLOCK 16

static int channel_blocks(const int32_t *cols, int64_t nnz, int32_t **order, int64_t **start, int64_t *nblocks) {
    int64_t channels = 0;
    for (int64_t i = 0; i < nnz; ++i) if (cols[i] + 1 > channels) channels = cols[i] + 1;
    int64_t *count = (int64_t *)calloc((size_t)channels + 1, sizeof(int64_t));
    *order = (int32_t *)malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof(int32_t));
    *start = (int64_t *)malloc((size_t)(nnz + channels + 1) * sizeof(int64_t));
    if (count == NULL || *order == NULL || *start == NULL) {
        free(count);
        return 1;
    }
    for (int64_t i = 0; i < nnz; ++i) count[cols[i] + 1]++;
    for (int64_t c = 0; c < channels; ++c) count[c + 1] += count[c];   /* count[c]: first slot of c */
    int64_t n = 0;
    for (int64_t c = 0; c < channels; ++c)
        for (int64_t j = count[c]; j < count[c + 1]; j += CONV_BLOCK) (*start)[n++] = j;
    (*start)[n] = nnz;
    *nblocks = n;
    for (int64_t i = 0; i < nnz; ++i) (*order)[count[cols[i]]++] = (int32_t)i;
    free(count);
    return 0;
}

/* The frame of both blocked kernels: blocks of entries by input channel (channel_blocks), one
 * block per OpenMP work item with `lo`, `hi` (its slice of `order`) and `c` (its channel) in
 * scope; the body fills `acc[0 .. hi - lo)`, which END_CHANNEL_BLOCKS writes to `out`. */
#define FOR_EACH_CHANNEL_BLOCK                                                                  \
    if (threads < 1) threads = 1;                                                               \
    int32_t *order; int64_t *start; int64_t nblocks;                                            \
    if (channel_blocks(cols, nnz, &order, &start, &nblocks)) {                                  \
        free(order); free(start);                                                               \
        return 1;                                                                               \
    }                                                                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1)")                       \
    for (int64_t blk = 0; blk < nblocks; ++blk) {                                               \
        const int64_t lo = start[blk], hi = start[blk + 1];                                     \
        const int64_t c = cols[order[lo]];

#define END_CHANNEL_BLOCKS                                                                      \
        for (int64_t j = lo; j < hi; ++j) out[order[j]] = acc[j - lo];                          \
    }                                                                                           \
    free(order); free(start);                                                                   \
    return 0;

/* Channel-first variant for pointwise (1x1) convolutions on NCHW tensors:
 *
 *   out[i] = sum_b sum_s g[b * gsb + rows[i] * hw + s] * x[b * xsb + cols[i] * hw + s]
 *
 * Each (channel, image) plane is contiguous, so every term is a contiguous dot product. Blocked
 * by input channel (see channel_blocks): four entries of a block are summed in one pass over the
 * input plane (each value of x loaded once for the four), and the plane stays in cache for the
 * block's other entries. Each entry's sum is, per image, a SIMD reduction over the plane, added
 * over images in order: the numbers do not depend on the blocking or the number of threads.
 */
#define DEFINE_SDDMM_CF(NAME, IN_T, ACC_T, LOAD)                                                \
int NAME(const IN_T *g, int64_t gsb, const IN_T *x, int64_t xsb, int64_t batch, int64_t hw,    \
         const int32_t *rows, const int32_t *cols, int64_t nnz, ACC_T *out, int threads) {      \
    FOR_EACH_CHANNEL_BLOCK                                                                      \
        ACC_T acc[CONV_BLOCK] = {0};                                                            \
        for (int64_t b = 0; b < batch; ++b) {                                                   \
            const IN_T *xr = x + b * xsb + c * hw;                                              \
            const IN_T *gb = g + b * gsb;                                                       \
            int64_t j = lo;                                                                     \
            for (; j + 4 <= hi; j += 4) {                                                       \
                const IN_T *g0 = gb + (int64_t)rows[order[j]] * hw;                             \
                const IN_T *g1 = gb + (int64_t)rows[order[j + 1]] * hw;                         \
                const IN_T *g2 = gb + (int64_t)rows[order[j + 2]] * hw;                         \
                const IN_T *g3 = gb + (int64_t)rows[order[j + 3]] * hw;                         \
                ACC_T p0 = 0, p1 = 0, p2 = 0, p3 = 0;                                           \
                _Pragma("omp simd reduction(+:p0,p1,p2,p3)")                                    \
                for (int64_t s = 0; s < hw; ++s) {                                              \
                    const ACC_T xv = LOAD(xr[s]);                                               \
                    p0 += LOAD(g0[s]) * xv;                                                     \
                    p1 += LOAD(g1[s]) * xv;                                                     \
                    p2 += LOAD(g2[s]) * xv;                                                     \
                    p3 += LOAD(g3[s]) * xv;                                                     \
                }                                                                               \
                acc[j - lo] += p0; acc[j - lo + 1] += p1;                                       \
                acc[j - lo + 2] += p2; acc[j - lo + 3] += p3;                                   \
            }                                                                                   \
            for (; j < hi; ++j) {                                                               \
                const IN_T *gr = gb + (int64_t)rows[order[j]] * hw;                             \
                ACC_T part = 0;                                                                 \
                _Pragma("omp simd reduction(+:part)")                                           \
                for (int64_t s = 0; s < hw; ++s) part += LOAD(gr[s]) * LOAD(xr[s]);            \
                acc[j - lo] += part;                                                            \
            }                                                                                   \
        }                                                                                       \
    END_CHANNEL_BLOCKS                                                                          \
}

DEFINE_SDDMM_CF(sddmm_cf_f32, float, float, IDENTITY)
DEFINE_SDDMM_CF(sddmm_cf_f64, double, double, IDENTITY)
DEFINE_SDDMM_CF(sddmm_cf_bf16, uint16_t, float, bf16_to_float)

/* General 2-D convolution (any kernel size, stride, padding, dilation, groups), NCHW:
 *
 *   out[i] = sum_{b, yo, xo} g[b, rows[i], yo, xo] * x[b, cols[i], yo*sh + ki[i]*dh - ph, xo*sw + kj[i]*dw - pw]
 *
 * (terms that fall into the zero padding are skipped). `x` may hold only the input channels
 * the selected entries use (`cols` index into it); grouped and depthwise convolutions come here
 * with `cols` already resolved to input channels. Blocked by input channel (see channel_blocks):
 * per image, the block's entries are summed one after another against the same input plane,
 * which stays in cache. With stride 1 the innermost loop reads both rows contiguously. Each
 * entry's sum: per image and output row a reduction over the row, added in order.
 */
#define DEFINE_SDDMM_CONV(NAME, IN_T, ACC_T, LOAD)                                              \
int NAME(const IN_T *g, const IN_T *x, int64_t batch, int64_t cout, int64_t cx, int64_t h,       \
         int64_t w, int64_t ho, int64_t wo, int64_t sh, int64_t sw, int64_t ph, int64_t pw,      \
         int64_t dh, int64_t dw, const int32_t *ki, const int32_t *kj, const int32_t *rows,      \
         const int32_t *cols, int64_t nnz, ACC_T *out, int threads) {                           \
    FOR_EACH_CHANNEL_BLOCK                                                                      \
        int64_t ylo[CONV_BLOCK], yhi[CONV_BLOCK], xlo[CONV_BLOCK], xhi[CONV_BLOCK];             \
        int64_t off[CONV_BLOCK];                                                                \
        ACC_T acc[CONV_BLOCK] = {0};                                                            \
        for (int64_t j = lo; j < hi; ++j) {                                                     \
            const int64_t i = order[j], e = j - lo;                                             \
            const int64_t di = (int64_t)ki[i] * dh - ph, dj = (int64_t)kj[i] * dw - pw;         \
            ylo[e] = di >= 0 ? 0 : (-di + sh - 1) / sh;                                         \
            yhi[e] = (h - 1 - di) < 0 ? -1 : (h - 1 - di) / sh;                                 \
            xlo[e] = dj >= 0 ? 0 : (-dj + sw - 1) / sw;                                         \
            xhi[e] = (w - 1 - dj) < 0 ? -1 : (w - 1 - dj) / sw;                                 \
            if (yhi[e] > ho - 1) yhi[e] = ho - 1;                                               \
            if (xhi[e] > wo - 1) xhi[e] = wo - 1;                                               \
            off[e] = di * w + dj;                                                               \
        }                                                                                       \
        for (int64_t b = 0; b < batch; ++b) {                                                   \
            const IN_T *xp = x + (b * cx + c) * h * w;                                          \
            for (int64_t j = lo; j < hi; ++j) {                                                 \
                const int64_t e = j - lo;                                                       \
                const IN_T *gp = g + (b * cout + rows[order[j]]) * ho * wo;                     \
                ACC_T a = acc[e];                                                               \
                for (int64_t yo = ylo[e]; yo <= yhi[e]; ++yo) {                                 \
                    const IN_T *gr = gp + yo * wo;                                              \
                    const IN_T *xr = xp + yo * sh * w + off[e];                                 \
                    ACC_T part = 0;                                                             \
                    if (sw == 1) {                                                              \
                        _Pragma("omp simd reduction(+:part)")                                   \
                        for (int64_t xo = xlo[e]; xo <= xhi[e]; ++xo)                           \
                            part += LOAD(gr[xo]) * LOAD(xr[xo]);                                \
                    } else {                                                                    \
                        for (int64_t xo = xlo[e]; xo <= xhi[e]; ++xo)                           \
                            part += LOAD(gr[xo]) * LOAD(xr[xo * sw]);                           \
                    }                                                                           \
                    a += part;                                                                  \
                }                                                                               \
                acc[e] = a;                                                                     \
            }                                                                                   \
        }                                                                                       \
    END_CHANNEL_BLOCKS                                                                          \
}

DEFINE_SDDMM_CONV(sddmm_conv_f32, float, float, IDENTITY)
DEFINE_SDDMM_CONV(sddmm_conv_f64, double, double, IDENTITY)
DEFINE_SDDMM_CONV(sddmm_conv_bf16, uint16_t, float, bf16_to_float)
