/* Sparse x dense kernels for nnsculpt.runtime.sparse (called through ctypes).
 *
 * Y[B, N] = X[B, K] @ W (+ bias), W given as CSR of W^T: row n holds the nonzeros
 * W[k, n] of output column n (column indices k as int32, values as float32).
 * Single threaded: ORT's dense MatMul is compared at intra_op_num_threads=1.
 *
 *  - B <= 2: per batch row, one sparse dot product per output (gather from X's row;
 *    AVX-512: 16-wide vgatherdps + FMA, masked tail);
 *  - B > 2: tiles of 16 or 32 batch rows; the tile of X is packed transposed
 *    (XT[k][0..TB)) so each nonzero costs one broadcast and TB/16 vector FMAs with the
 *    accumulators held in registers.
 * Without AVX-512 (or another compiler) the portable loops below are used.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void dot_rows(int64_t B, int64_t K, int64_t N, const int32_t *indptr, const int32_t *indices,
                     const float *values, const float *X, const float *bias, float *Y) {
    for (int64_t b = 0; b < B; ++b) {
        const float *x = X + b * K;
        float *y = Y + b * N;
        for (int64_t n = 0; n < N; ++n) {
            int32_t p = indptr[n];
            const int32_t end = indptr[n + 1];
#if defined(__AVX512F__)
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            for (; p + 32 <= end; p += 32) {
                __m512i i0 = _mm512_loadu_si512((const void *)(indices + p));
                __m512i i1 = _mm512_loadu_si512((const void *)(indices + p + 16));
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + p), _mm512_i32gather_ps(i0, x, 4), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + p + 16), _mm512_i32gather_ps(i1, x, 4), acc1);
            }
            for (; p < end; p += 16) {
                const int left = end - p;
                const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                __m512i i0 = _mm512_maskz_loadu_epi32(m, indices + p);
                __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x, 4);
                acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, values + p), xv, acc0);
            }
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            for (; p + 4 <= end; p += 4) {
                a0 += values[p] * x[indices[p]];
                a1 += values[p + 1] * x[indices[p + 1]];
                a2 += values[p + 2] * x[indices[p + 2]];
                a3 += values[p + 3] * x[indices[p + 3]];
            }
            for (; p < end; ++p) a0 += values[p] * x[indices[p]];
            float s = (a0 + a1) + (a2 + a3);
#endif
            y[n] = s + (bias ? bias[n] : 0.f);
        }
    }
}

/* pack rows b0..b0+tb of X transposed into XT[K][TB], zero padded */
static void pack(int64_t K, int64_t TB, int64_t tb, const float *X, int64_t b0, float *XT) {
    if (tb < TB) memset(XT, 0, sizeof(float) * (size_t)K * (size_t)TB);
    for (int64_t j = 0; j < tb; ++j) {
        const float *xr = X + (b0 + j) * K;
        for (int64_t k = 0; k < K; ++k) XT[k * TB + j] = xr[k];
    }
}

static void tiled(int64_t B, int64_t K, int64_t N, const int32_t *indptr, const int32_t *indices,
                  const float *values, const float *X, const float *bias, float *Y, float *XT) {
    for (int64_t b0 = 0; b0 < B; ) {
        const int64_t left = B - b0;
        const int64_t TB = left > 16 ? 32 : 16;
        const int64_t tb = left < TB ? left : TB;
        pack(K, TB, tb, X, b0, XT);
        for (int64_t n = 0; n < N; ++n) {
            float acc[32];
            const int32_t beg = indptr[n], end = indptr[n + 1];
#if defined(__AVX512F__)
            if (TB == 32) {
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
                int32_t p = beg;
                for (; p + 2 <= end; p += 2) {
                    const float *x0 = XT + (int64_t)indices[p] * 32, *x1 = XT + (int64_t)indices[p + 1] * 32;
                    const __m512 w0 = _mm512_set1_ps(values[p]), w1 = _mm512_set1_ps(values[p + 1]);
                    a0 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0), a0);
                    a1 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16), a1);
                    c0 = _mm512_fmadd_ps(w1, _mm512_load_ps(x1), c0);
                    c1 = _mm512_fmadd_ps(w1, _mm512_load_ps(x1 + 16), c1);
                }
                if (p < end) {
                    const float *x0 = XT + (int64_t)indices[p] * 32;
                    const __m512 w0 = _mm512_set1_ps(values[p]);
                    a0 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0), a0);
                    a1 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16), a1);
                }
                _mm512_storeu_ps(acc, _mm512_add_ps(a0, c0));
                _mm512_storeu_ps(acc + 16, _mm512_add_ps(a1, c1));
            } else {
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
                int32_t p = beg;
                for (; p + 4 <= end; p += 4) {
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(values[p]), _mm512_load_ps(XT + (int64_t)indices[p] * 16), a0);
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(values[p + 1]), _mm512_load_ps(XT + (int64_t)indices[p + 1] * 16), a1);
                    a2 = _mm512_fmadd_ps(_mm512_set1_ps(values[p + 2]), _mm512_load_ps(XT + (int64_t)indices[p + 2] * 16), a2);
                    a3 = _mm512_fmadd_ps(_mm512_set1_ps(values[p + 3]), _mm512_load_ps(XT + (int64_t)indices[p + 3] * 16), a3);
                }
                for (; p < end; ++p)
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(values[p]), _mm512_load_ps(XT + (int64_t)indices[p] * 16), a0);
                _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            }
#else
            for (int j = 0; j < TB; ++j) acc[j] = 0.f;
            for (int32_t p = beg; p < end; ++p) {
                const float w = values[p];
                const float *xt = XT + (int64_t)indices[p] * TB;
                for (int j = 0; j < TB; ++j) acc[j] += w * xt[j];
            }
#endif
            const float bn = bias ? bias[n] : 0.f;
            for (int64_t j = 0; j < tb; ++j) Y[(b0 + j) * N + n] = acc[j] + bn;
        }
        b0 += tb;
    }
}

/* Returns 0 on success, 1 when the scratch buffer cannot be allocated. */
int nnsculpt_spmm_xwt(int64_t B, int64_t K, int64_t N, const int32_t *indptr, const int32_t *indices,
                      const float *values, const float *X, const float *bias, float *Y) {
    if (B <= 2) {
        dot_rows(B, K, N, indptr, indices, values, X, bias, Y);
        return 0;
    }
    const size_t bytes = ((sizeof(float) * (size_t)K * 32 + 63) / 64) * 64;
    float *XT = (float *)aligned_alloc(64, bytes);
    if (!XT) return 1;
    tiled(B, K, N, indptr, indices, values, X, bias, Y, XT);
    free(XT);
    return 0;
}

/* 1 when this build has the AVX-512 paths (for reports). */
int nnsculpt_spmm_isa(void) {
#if defined(__AVX512F__)
    return 512;
#else
    return 0;
#endif
}
