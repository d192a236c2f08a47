/* Decode-time kernels for bfloat16 on x86 CPUs with AVX512-BF16.
 *
 * Why hand-written: at 1-8 rows a decode step is a chain of matrix-vector products, and
 * the bf16 GEMM that torch ships (oneDNN) streams the weights at ~14 GB/s on the 2-core
 * EPYC this project targets, against ~32 GB/s of read bandwidth; a plain loop of
 * `vdpbf16ps` over each weight row streams them at ~25-30 GB/s (python bench/kernels.py
 * measures both side by side). The LoRA kernel replaces 2-4 small torch GEMMs per
 * projection (each with ~20-40 us of fixed cost) by one call that reads each row's own
 * adapters only.
 *
 * Built at first use by lorastack/engine/native.py with -O3 -march=native -fopenmp and
 * loaded with ctypes; torch's own libgomp serves the OpenMP threads. All tensors are
 * contiguous row-major; bf16 values travel as uint16_t.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 bf16x16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, like torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* 32 bf16 of `p`, zero past `left` elements. */
static inline __m512bh load32(const uint16_t *p, int left) {
    if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
    __mmask32 k = left <= 0 ? 0 : (__mmask32)((1ull << left) - 1);
    return (__m512bh)_mm512_maskz_loadu_epi16(k, p);
}

#define MAX_ROWS 8

/* y[m, out] = x[m, in] @ W[out, in]^T (bf16 in and out, fp32 accumulation), m <= MAX_ROWS.
 * Each weight row is read once for all m input rows. */
void lorastack_gemv_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int m, int in, int out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int o = 0; o < out; o++) {
        const uint16_t *w = W + (int64_t)o * in;
        __m512 acc[MAX_ROWS];
        for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
        for (int i = 0; i < in; i += 32) {
            __m512bh wv = load32(w + i, in - i);
            for (int r = 0; r < m; r++) acc[r] = _mm512_dpbf16_ps(acc[r], wv, load32(x + (int64_t)r * in + i, in - i));
        }
        for (int r = 0; r < m; r++) y[(int64_t)r * out + o] = f32_to_bf16(_mm512_reduce_add_ps(acc[r]));
    }
}

/* Per-row multi-LoRA delta, added in place: for row i and each of its K entries
 * (slot s, weight w), y[i, part p columns] += w * (x[i] @ A[s, p*R:(p+1)*R]^T) @ B_p[s].
 *   x [n, in]; y [n, sum(outs)]; A [S, P*R, in]; B_p [S, R, outs[p]] (pointers in `B`);
 *   slots [n, K] (int64), weights [n, K] (float; 0 = unused entry).
 * Phase 1 computes the rank-space activations t [n, K, P*R] in fp32; phase 2 adds t @ B
 * into y. A phase-2 job is one row's part (split in column ranges only when there are too
 * few jobs for the threads), so it streams B_p[s] (R x out contiguous) front to back and
 * accumulates every entry of the row before one rounding. */
void lorastack_lora_bf16(const uint16_t *x, uint16_t *y, const uint16_t *A, const int64_t *B, const int32_t *outs,
                         int P, int R, int in, int n, const int64_t *slots, const float *weights, int K, int threads) {
    int PR = P * R;
    int total_out = 0, max_out = 0;
    int part_off[16];
    for (int p = 0; p < P; p++) {
        part_off[p] = total_out;
        total_out += outs[p];
        if (outs[p] > max_out) max_out = outs[p];
    }
    float *t = (float *)malloc(sizeof(float) * (size_t)n * K * PR);
    int splits = n * P >= 2 * threads ? 1 : 2 * threads; /* column ranges per part */
    int64_t jobs2 = (int64_t)n * P * splits;

#pragma omp parallel num_threads(threads)
    {
        float *acc = (float *)malloc(sizeof(float) * (size_t)(max_out + 16));
#pragma omp for schedule(static)
        for (int64_t job = 0; job < (int64_t)n * K * PR; job++) {
            int64_t i = job / ((int64_t)K * PR), k = (job / PR) % K, j = job % PR;
            float w = weights[i * K + k];
            if (w == 0.0f) { t[job] = 0.0f; continue; }
            const uint16_t *a = A + (slots[i * K + k] * PR + j) * (int64_t)in;
            const uint16_t *xi = x + i * (int64_t)in;
            __m512 av = _mm512_setzero_ps();
            for (int c = 0; c < in; c += 32) av = _mm512_dpbf16_ps(av, load32(a + c, in - c), load32(xi + c, in - c));
            t[job] = w * _mm512_reduce_add_ps(av);
        }
#pragma omp for schedule(static)
        for (int64_t job = 0; job < jobs2; job++) {
            int64_t i = job / ((int64_t)P * splits);
            int p = (int)((job / splits) % P), sp = (int)(job % splits);
            int per = ((outs[p] + splits - 1) / splits + 15) / 16 * 16;
            int col = sp * per, width = outs[p] - col < per ? outs[p] - col : per;
            if (width <= 0) continue;
            for (int q = 0; q < width; q++) acc[q] = 0.0f;
            const uint16_t *Bp = (const uint16_t *)(intptr_t)B[p];
            for (int k = 0; k < K; k++) {
                if (weights[i * K + k] == 0.0f) continue;
                const float *ti = t + (i * K + k) * PR + (int64_t)p * R;
                const uint16_t *b = Bp + slots[i * K + k] * (int64_t)R * outs[p] + col;
                for (int r = 0; r < R; r++) {
                    float tv = ti[r];
                    if (tv == 0.0f) continue;
                    const uint16_t *br = b + (int64_t)r * outs[p];
                    __m512 tvv = _mm512_set1_ps(tv);
                    int q = 0;
                    for (; q + 16 <= width; q += 16) {
                        __m512 bv = bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)(br + q)));
                        _mm512_storeu_ps(acc + q, _mm512_fmadd_ps(tvv, bv, _mm512_loadu_ps(acc + q)));
                    }
                    for (; q < width; q++) acc[q] += tv * bf16_to_f32(br[q]);
                }
            }
            uint16_t *yi = y + i * (int64_t)total_out + part_off[p] + col;
            for (int q = 0; q < width; q++) yi[q] = f32_to_bf16(bf16_to_f32(yi[q]) + acc[q]);
        }
        free(acc);
    }
    free(t);
}
