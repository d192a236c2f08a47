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
#include <math.h>
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

/* f32_to_bf16 on 16 lanes, bit for bit (NaNs quieted the same way, denormals kept: unlike
 * vcvtneps2bf16, which flushes denormal inputs to zero). */
static inline __m256i f32x16_to_bf16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* 32 bf16 of `p`, zero past `left` elements. */
static inline __m512bh load32(const uint16_t *p, int left) {
    if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
    __mmask32 k = left <= 0 ? 0 : (__mmask32)((1ull << left) - 1);
    return (__m512bh)_mm512_maskz_loadu_epi16(k, p);
}

#define MAX_ROWS 8
/* `switch (m)` over 1..MAX_ROWS running LOOP(output rows per job, m) with m a constant, so
 * each case's accumulators stay in registers; OB1 and OB2 are the rows per job at m = 1, 2. */
#define PER_ROWS(LOOP, OB1, OB2)                                                                         \
    switch (m) {                                                                                         \
    case 1: LOOP(OB1, 1); break;                                                                         \
    case 2: LOOP(OB2, 2); break;                                                                         \
    case 3: LOOP(1, 3); break;                                                                           \
    case 4: LOOP(1, 4); break;                                                                           \
    case 5: LOOP(1, 5); break;                                                                           \
    case 6: LOOP(1, 6); break;                                                                           \
    case 7: LOOP(1, 7); break;                                                                           \
    default: LOOP(1, 8); break;                                                                          \
    }
#ifndef BF16_OB1
#define BF16_OB1 1
#endif
#ifndef BF16_OB2
#define BF16_OB2 1
#endif

/* y[m, out] = x[m, in] @ W[out, in]^T (bf16 in and out, fp32 accumulation), m <= MAX_ROWS.
 * Each weight row is read once for all m input rows; OB output rows per job (see block_rows:
 * independent accumulator chains, each summed in the same order, so OB never changes bits). */
static inline __attribute__((always_inline)) void bf16_rows(const int OB, const int m, const uint16_t *x, const uint16_t *W,
                                                            uint16_t *y, int in, int out, int o0) {
    __m512 acc[4][MAX_ROWS];
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < m; r++) acc[j][r] = _mm512_setzero_ps();
    for (int i = 0; i < in; i += 32) {
        __m512bh wv[4];
        for (int j = 0; j < OB; j++) wv[j] = load32(W + (int64_t)(o0 + j) * in + i, in - i);
        for (int r = 0; r < m; r++) {
            __m512bh xv = load32(x + (int64_t)r * in + i, in - i);
            for (int j = 0; j < OB; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
        }
    }
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < m; r++) y[(int64_t)r * out + o0 + j] = f32_to_bf16(_mm512_reduce_add_ps(acc[j][r]));
}

#define BF16_LOOP(OB, M)                                                                       \
    do {                                                                                       \
        int groups = out / (OB);                                                               \
        _Pragma("omp for schedule(static)") for (int g = 0; g < groups; g++)                   \
            bf16_rows(OB, M, x, W, y, in, out, g * (OB));                                      \
        _Pragma("omp for schedule(static)") for (int o = groups * (OB); o < out; o++)          \
            bf16_rows(1, M, x, W, y, in, out, o);                                              \
    } while (0)

static void tiles_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int m, int in, int out, int threads);
/* Above MAX_ROWS rows (in a multiple of 32, out of 16: native.py checks) the tiled path. */
void lorastack_gemv_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int m, int in, int out, int threads) {
    if (m > MAX_ROWS) {
        tiles_bf16(x, W, y, m, in, out, threads);
        return;
    }
#pragma omp parallel num_threads(threads)
    PER_ROWS(BF16_LOOP, BF16_OB1, BF16_OB2);
}

/* Per-row multi-LoRA delta, added in place: for row i and each of its K entries
 * (slot s, weight w), y[i, part p columns] += w * (x[i] @ A[s, p*R:(p+1)*R]^T) @ B_p[s].
 *   x [n, in]; y [n, sum(outs)]; A [S, P*R, in]; B_p [S, R, outs[p]] (pointers in `B`);
 *   slots [n, K] (int64), weights [n, K] (float; 0 = unused entry).
 * Phase 1 computes the rank-space activations t [n, K, P*R] in fp32; phase 2 adds t @ B
 * into y. A phase-2 job is one row's part (split in column ranges only when there are too
 * few jobs for the threads), so it streams B_p[s] (R x out contiguous) front to back and
 * accumulates every entry of the row before one rounding. Its memory order matters more than
 * its arithmetic: with rows on different adapters these bytes come from DRAM, and each slot's
 * A and B are read front to back, which the hardware prefetcher follows. A form with 16 rank
 * rows' chains at once (transpose + tree reduction), register-blocked columns and rows on one
 * adapter sharing B loads was bit-identical and 1.3x faster from cache, but read 16 interleaved
 * short streams and ran 1.4x slower from cold memory; made sequential again it measured
 * 0.99-1.13x this loop, so this loop stays for rows on their own adapters. Rows that share
 * their adapters (runs, below) read them from cache after the first run, and there the
 * register-blocked form pays: a 448-token prefill on 16 int8 adapters (28 tokens each) spent
 * 75 ms in this kernel token by token, 47 ms in runs of 8. */
/* 32 int8 LoRA weights as bf16 pairs (exact: |q| <= 127 fits bf16's 8-bit significand). */
static inline __m512bh i8x32_to_bf16(const int8_t *p, int left) {
    __mmask32 k = left >= 32 ? 0xffffffffu : (__mmask32)((1ull << left) - 1);
    __m256i q = _mm256_maskz_loadu_epi8(k, p);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* Element `off` of a LoRA B bank (its address as int64, kernels' convention), 16 at a time or
 * one, as fp32: int8 (I8) or bf16. */
static inline __m512 lora_b16(const int I8, int64_t bank, int64_t off) {
    return I8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)(intptr_t)bank + off))))
              : bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(intptr_t)bank + off)));
}

static inline float lora_b1(const int I8, int64_t bank, int64_t off) {
    return I8 ? (float)((const int8_t *)(intptr_t)bank)[off] : bf16_to_f32(((const uint16_t *)(intptr_t)bank)[off]);
}

/* Rows in a run share slots and weights (a prefill's tokens on one adapter, the draft tokens of a
 * verify pass, a batch on one adapter): up to LORA_RUN of them are computed together, each A
 * vector converted once and each B vector loaded once for all of them. Every row keeps its own
 * sums in the order a lone row uses, so a row gets the same bits alone or in a run. */
#define LORA_RUN MAX_ROWS /* PER_ROWS dispatches runs of 1..MAX_ROWS rows */

/* Phase 1 for a run of M rows: t[row, k, j] = w * (x[row] . A[slot, j]) (times A's rank-row
 * scale with int8 banks). */
static inline __attribute__((always_inline)) void lora_a_run(const int I8, const int M, const uint16_t *A,
                                                             const int8_t *A8, const float *As, const uint16_t *x,
                                                             int64_t row, int64_t srow, int in, float w, float *t,
                                                             int64_t tstride) {
    __m512 av[M];
    for (int r = 0; r < M; r++) av[r] = _mm512_setzero_ps();
    for (int c = 0; c < in; c += 32) {
        __m512bh a = I8 ? i8x32_to_bf16(A8 + row + c, in - c) : load32(A + row + c, in - c);
        for (int r = 0; r < M; r++) av[r] = _mm512_dpbf16_ps(av[r], a, load32(x + r * (int64_t)in + c, in - c));
    }
    for (int r = 0; r < M; r++) t[r * tstride] = I8 ? w * As[srow] * _mm512_reduce_add_ps(av[r]) : w * _mm512_reduce_add_ps(av[r]);
}

/* Phase 2's whole 16-column blocks for a run of M >= 2 rows: acc[r * astride + q] = the sum over
 * the rows' entries and rank rows of t * B, accumulated in the same order as the one-row loop. */
static inline __attribute__((always_inline)) void lora_b_run(const int I8, const int M, const int64_t *B,
                                                             const int64_t *Bs, const int32_t *outs, int p, int R,
                                                             int PR, const float *t, int K, const int64_t *slots,
                                                             const float *weights, int col, int width, float *acc,
                                                             int astride) {
    /* Each row's factor for each entry's rank row (t times B's rank-row scale), laid out so the
     * inner loop broadcasts it straight from memory. */
    float tv[K * R * M];
    for (int k = 0; k < K; k++)
        for (int j = 0; j < R; j++)
            for (int r = 0; r < M; r++) {
                float ti = t[((int64_t)r * K + k) * PR + (int64_t)p * R + j];
                tv[(k * R + j) * M + r] = I8 ? ti * ((const float *)(intptr_t)Bs[p])[slots[k] * R + j] : ti;
            }
    for (int q = 0; q + 16 <= width; q += 16) {
        __m512 a[M];
        for (int r = 0; r < M; r++) a[r] = _mm512_setzero_ps();
        for (int k = 0; k < K; k++) {
            if (weights[k] == 0.0f) continue;
            int64_t b = slots[k] * (int64_t)R * outs[p] + col + q;
            const float *f = tv + k * R * M;
            for (int j = 0; j < R; j++, f += M) {
                __m512 bv = lora_b16(I8, B[p], b + (int64_t)j * outs[p]);
                for (int r = 0; r < M; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(f[r]), bv, a[r]);
            }
        }
        for (int r = 0; r < M; r++) _mm512_storeu_ps(acc + r * astride + q, a[r]);
    }
}

/* The LoRA delta with bf16 banks (I8 = 0: A, B as above) or int8 ones (I8 = 1, int8 matmuls:
 * A int8 [S, P*R, in] with a scale per rank row As [S, P*R]; each part's B int8 [S, R, out_p]
 * with a scale per rank row, the parts' scale arrays in `Bs`): with rows on different adapters
 * this kernel streams every row's own adapter from memory, and int8 halves those bytes. */
static inline __attribute__((always_inline)) void lora_rows(const int I8, const uint16_t *x, uint16_t *y, const void *Av,
                                                            const float *As, const int64_t *B, const int64_t *Bs,
                                                            const int32_t *outs, int P, int R, int in, int n,
                                                            const int64_t *slots, const float *weights, int K, int threads) {
    const uint16_t *A = (const uint16_t *)Av;
    const int8_t *A8 = (const int8_t *)Av;
    int PR = P * R;
    int total_out = 0, max_out = 0;
    int part_off[16];
    for (int p = 0; p < P; p++) {
        part_off[p] = total_out;
        total_out += outs[p];
        if (outs[p] > max_out) max_out = outs[p];
    }
    /* Runs: consecutive rows with the same slots and weights, at most LORA_RUN long. */
    int *run = (int *)malloc(sizeof(int) * (size_t)(n + 1));
    int nrun = 0;
    for (int i = 0; i < n;) {
        int m = 1;
        while (i + m < n && m < LORA_RUN && !memcmp(slots + (int64_t)i * K, slots + (int64_t)(i + m) * K, sizeof(int64_t) * K) &&
               !memcmp(weights + (int64_t)i * K, weights + (int64_t)(i + m) * K, sizeof(float) * K))
            m++;
        run[nrun++] = i;
        i += m;
    }
    run[nrun] = n;
    float *t = (float *)malloc(sizeof(float) * (size_t)n * K * PR);
    int splits = nrun * P >= 2 * threads ? 1 : 2 * threads; /* column ranges per part */
    int64_t jobs2 = (int64_t)nrun * P * splits;
    int astride = max_out + 16;

#pragma omp parallel num_threads(threads)
    {
        float *acc = (float *)malloc(sizeof(float) * (size_t)astride * LORA_RUN);
#pragma omp for schedule(static)
        for (int64_t job = 0; job < (int64_t)nrun * K * PR; job++) {
            int64_t b = job / ((int64_t)K * PR), k = (job / PR) % K, j = job % PR;
            int i = run[b], m = run[b + 1] - i;
            float w = weights[i * K + k];
            float *tj = t + ((int64_t)i * K + k) * PR + j;
            if (w == 0.0f) {
                for (int r = 0; r < m; r++) tj[(int64_t)r * K * PR] = 0.0f;
                continue;
            }
            int64_t srow = slots[i * K + k] * PR + j;
#define LORA_A(OB, M) lora_a_run(I8, M, A, A8, As, x + i * (int64_t)in, srow * in, srow, in, w, tj, (int64_t)K * PR)
            PER_ROWS(LORA_A, 1, 1)
#undef LORA_A
        }
#pragma omp for schedule(static)
        for (int64_t job = 0; job < jobs2; job++) {
            int i = run[job / ((int64_t)P * splits)], m = run[job / ((int64_t)P * splits) + 1] - i;
            int p = (int)((job / splits) % P), sp = (int)(job % splits);
            int per = ((outs[p] + splits - 1) / splits + 15) / 16 * 16;
            int col = sp * per, width = outs[p] - col < per ? outs[p] - col : per;
            if (width <= 0) continue;
            int q0 = 0; /* columns done by the run loop */
            if (m > 1) {
                q0 = width / 16 * 16;
#define LORA_B(OB, M) lora_b_run(I8, M, B, Bs, outs, p, R, PR, t + (int64_t)i * K * PR, K, slots + (int64_t)i * K, weights + (int64_t)i * K, col, width, acc, astride)
                PER_ROWS(LORA_B, 1, 1)
#undef LORA_B
            }
            for (int rr = 0; rr < m; rr++) {
                int64_t ii = i + rr;
                float *ar = acc + (int64_t)rr * astride;
                for (int q = q0; q < width; q++) ar[q] = 0.0f;
                for (int k = 0; k < K; k++) {
                    if (weights[ii * K + k] == 0.0f) continue;
                    const float *ti = t + (ii * K + k) * PR + (int64_t)p * R;
                    int64_t b = slots[ii * K + k] * (int64_t)R * outs[p] + col;
                    for (int r = 0; r < R; r++) {
                        float tv = I8 ? ti[r] * ((const float *)(intptr_t)Bs[p])[slots[ii * K + k] * R + r] : ti[r];
                        if (tv == 0.0f) continue;
                        __m512 tvv = _mm512_set1_ps(tv);
                        int q = q0;
                        int64_t br = b + (int64_t)r * outs[p];
                        for (; q + 16 <= width; q += 16)
                            _mm512_storeu_ps(ar + q, _mm512_fmadd_ps(tvv, lora_b16(I8, B[p], br + q), _mm512_loadu_ps(ar + q)));
                        for (; q < width; q++) ar[q] += tv * lora_b1(I8, B[p], br + q);
                    }
                }
                uint16_t *yi = y + ii * (int64_t)total_out + part_off[p] + col;
                for (int q = 0; q < width; q++) yi[q] = f32_to_bf16(bf16_to_f32(yi[q]) + ar[q]);
            }
        }
        free(acc);
    }
    free(t);
    free(run);
}

void lorastack_lora_bf16(const uint16_t *x, uint16_t *y, const uint16_t *A, const int64_t *B, const int32_t *outs,
                         int P, int R, int in, int n, const int64_t *slots, const float *weights, int K, int threads) {
    lora_rows(0, x, y, A, NULL, B, NULL, outs, P, R, in, n, slots, weights, K, threads);
}

void lorastack_lora_i8(const uint16_t *x, uint16_t *y, const int8_t *A, const float *As, const int64_t *B, const int64_t *Bs,
                       const int32_t *outs, int P, int R, int in, int n, const int64_t *slots, const float *weights, int K,
                       int threads) {
    lora_rows(1, x, y, A, As, B, Bs, outs, P, R, in, n, slots, weights, K, threads);
}

/* ---------------------------------------------------------------- GGUF blocks
 * Batch-1 decode is bound by the bytes of weights streamed per token: the embedded base's
 * GGUF holds its linear layers as Q4_1 (5 bits a weight) and its tied embedding / LM head as
 * Q8_0 (8.5 bits), against 16 for bf16. These kernels read the blocks themselves:
 *   Q4_1 block (20 bytes): f16 d, f16 m, u8 qs[16]; w[j] = d*(qs[j]&15) + m, w[j+16] = d*(qs[j]>>4) + m
 *   Q8_0 block (34 bytes): f16 d, i8 qs[32];        w[j] = d*qs[j]
 * Each block's 32 weights are rebuilt in fp32 exactly as gguf-py dequantizes them (product
 * and sum rounded separately: the build uses -ffp-contract=off), rounded to bf16 (to
 * nearest even, as torch rounds) and fed to the same `vdpbf16ps` chain as the bf16 kernel,
 * so the result is bit-identical to lorastack_gemv_bf16 on the dequantized bf16 weights the
 * rest of the engine uses: the quantized path changes the speed, never the output.
 *
 * Q4_1 is read repacked ("Q4_1R", gguf_blocks.Blocks.for_kernels): the same bytes per row,
 * moved so that the kernel decodes them with fewer instructions. A row of nb blocks is
 *   f16 d[nb], f16 m[nb], then per pair of blocks (b, b+1) 32 bytes where byte j holds
 *   weight j's nibble of block b (low) and of block b+1 (high); an odd last block keeps its
 *   16 GGUF bytes.
 * Why: reading the file's layout, the block decode bound the kernel (scalar scale loads, a
 * shift, an insert and a widening per block): it ran 1.46x slower than the repacked decode on
 * weights already in cache and streamed the embedded base's layers at ~17 GB/s of the
 * machine's ~36. Repacked, the decode is cheaper than the bytes, so the kernel also pulls the
 * rows of the job WEIGHT_PREFETCH_JOBS ahead into cache while it computes (2: in A/B runs of a
 * batch-1 step, 0 and 1 were slower and 4 the same). llama.cpp repacks its blocks at load time
 * for its CPU kernels too. */
enum { BLOCK_Q4_1R = 0, BLOCK_Q8_0 = 1 };
#define WEIGHT_PREFETCH_JOBS 2

/* A block pair's 16-entry tables of d*q + m, rounded to bf16: words 0-15 block b's, 16-31 b+1's. */
static inline __m512i q4r_table(const float *d, const float *m) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 t0 = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d[0]), iota), _mm512_set1_ps(m[0]));
    __m512 t1 = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d[1]), iota), _mm512_set1_ps(m[1]));
    return (__m512i)_mm512_cvtne2ps_pbh(t1, t0);
}

/* Both blocks of a pair: each block's 32 weights picked from the tables by nibble (vpermw
 * reads the low 5 bits of each index word). `nib`: the pair's 32 repacked bytes. */
static inline void q4r_pair(const uint8_t *nib, const float *d, const float *m, __m512bh *w0, __m512bh *w1) {
    __m512i table = q4r_table(d, m);
    __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)nib));
    __m512i i0 = _mm512_and_si512(z, _mm512_set1_epi16(15));
    __m512i i1 = _mm512_or_si512(_mm512_srli_epi16(z, 4), _mm512_set1_epi16(16));
    *w0 = (__m512bh)_mm512_permutexvar_epi16(i0, table);
    *w1 = (__m512bh)_mm512_permutexvar_epi16(i1, table);
}

/* An odd last block: its 16 GGUF bytes, weights j and j+16 in byte j. */
static inline __m512bh q4r_single(const uint8_t *q16, float d, float m) {
    __m128i q = _mm_loadu_si128((const __m128i *)q16), low4 = _mm_set1_epi8(15);
    __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)));
    return _mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_mul_ps(dv, hi), mv), _mm512_add_ps(_mm512_mul_ps(dv, lo), mv));
}

static inline __m512bh q8_0_block(const uint8_t *b) {
    uint16_t dh;
    memcpy(&dh, b, 2);
    __m512 d = _mm512_set1_ps(_cvtsh_ss(dh));
    __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 2)), q1 = _mm_loadu_si128((const __m128i *)(b + 18));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, d), _mm512_mul_ps(lo, d));
}

/* A Q4_1R row's nb scales (or minimums) as fp32, 16 at a time. */
static inline void q4r_scales(const uint16_t *h, int nb, float *f) {
    int b = 0;
    for (; b + 16 <= nb; b += 16) _mm512_storeu_ps(f + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + b))));
    for (; b < nb; b++) f[b] = _cvtsh_ss(h[b]);
}

/* Bytes of one weight row of `kind` with `in` inputs. */
static inline int64_t block_row_bytes(int kind, int in) { return (int64_t)(in / 32) * (kind == BLOCK_Q4_1R ? 20 : 34); }

/* Pull `rows` weight rows from row o0 on into cache (clipped to the matrix): the kernel's
 * next job, fetched while this one computes. */
static inline void prefetch_rows(int kind, const uint8_t *W, int in, int out, int o0, int rows) {
    if (o0 >= out || WEIGHT_PREFETCH_JOBS == 0) return;
    if (o0 + rows > out) rows = out - o0;
    int64_t rb = block_row_bytes(kind, in);
    const char *p = (const char *)W + o0 * rb;
    for (int64_t k = 0; k < rows * rb; k += 64) _mm_prefetch(p + k, _MM_HINT_T0);
}

/* Output rows OB (1, 2 or 4) at a time, for m input rows: y[r, o0 + j] for j < OB.
 * Why several output rows: at 1-2 input rows each output's dot product is one serial chain of
 * `vdpbf16ps` (latency ~6 cycles) and the kernel waited on it; OB independent chains (each
 * still summed in exactly the order of the one-row loop, so the bits do not change) keep the
 * unit busy. Measured with bench/kernels.py at 1 thread. */
static inline __attribute__((always_inline)) void block_rows(int kind, const int OB, const int m, const uint16_t *x,
                                                             const uint8_t *W, uint16_t *y, int in, int out, int o0) {
    int nb = in / 32;
    int64_t rb = block_row_bytes(kind, in);
    __m512 acc[4][MAX_ROWS];
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < m; r++) acc[j][r] = _mm512_setzero_ps();
    if (kind == BLOCK_Q4_1R) {
        float ds[4][nb], ms[4][nb];
        const uint8_t *nib[4];
        for (int j = 0; j < OB; j++) {
            const uint8_t *row = W + (int64_t)(o0 + j) * rb;
            q4r_scales((const uint16_t *)row, nb, ds[j]);
            q4r_scales((const uint16_t *)row + nb, nb, ms[j]);
            nib[j] = row + 4 * nb;
        }
        int b = 0;
        for (; b + 2 <= nb; b += 2) {
            __m512bh w0[4], w1[4];
            for (int j = 0; j < OB; j++) q4r_pair(nib[j] + b * 16, ds[j] + b, ms[j] + b, &w0[j], &w1[j]);
            for (int r = 0; r < m; r++) {
                const uint16_t *xr = x + (int64_t)r * in + b * 32;
                __m512bh x0 = (__m512bh)_mm512_loadu_si512(xr), x1 = (__m512bh)_mm512_loadu_si512(xr + 32);
                for (int j = 0; j < OB; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], w0[j], x0);
                for (int j = 0; j < OB; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], w1[j], x1);
            }
        }
        if (b < nb) {
            __m512bh wv[4];
            for (int j = 0; j < OB; j++) wv[j] = q4r_single(nib[j] + b * 16, ds[j][b], ms[j][b]);
            for (int r = 0; r < m; r++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (int64_t)r * in + b * 32);
                for (int j = 0; j < OB; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
            }
        }
    } else {
        for (int b = 0; b < nb; b++) {
            __m512bh wv[4];
            for (int j = 0; j < OB; j++) wv[j] = q8_0_block(W + (int64_t)(o0 + j) * rb + b * 34);
            for (int r = 0; r < m; r++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (int64_t)r * in + b * 32);
                for (int j = 0; j < OB; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
            }
        }
    }
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < m; r++) y[(int64_t)r * out + o0 + j] = f32_to_bf16(_mm512_reduce_add_ps(acc[j][r]));
}

/* Memory to pull into cache while a GEMM computes: the LoRA bytes its projection reads next.
 * Why: with rows on different adapters the LoRA kernel streams every row's own A and B (~330 KB
 * a token per layer for rank-16 all-linear adapters on the embedded base, 157 MB a step at 16
 * rows) and waits on memory, while the block GEMM before it is bound by compute and leaves the
 * memory bus idle. Job j of J of the GEMM's parallel loop touches bytes [j/J, (j+1)/J) of the
 * regions, so the prefetches spread over the GEMM; the lines land in L2 and, evicted, in L3. */
typedef struct {
    int n;                 /* regions */
    const char **ptr;
    const int64_t *end;    /* cumulative byte offsets: region i covers [end[i-1], end[i]) */
} Prefetch;

static inline void prefetch_share(const Prefetch *pf, int64_t job, int64_t jobs) {
    if (!pf || !pf->n) return;
    int64_t total = pf->end[pf->n - 1], lo = total * job / jobs, hi = total * (job + 1) / jobs;
    int i = 0;
    while (i < pf->n && pf->end[i] <= lo) i++;
    for (int64_t at = lo & ~(int64_t)63; at < hi && i < pf->n; at += 64) {
        while (i < pf->n && pf->end[i] <= at) i++;
        if (i == pf->n) break;
        int64_t start = i ? pf->end[i - 1] : 0;
        _mm_prefetch(pf->ptr[i] + (at - start), _MM_HINT_T1);
    }
}

/* y[m, out] = x[m, in] @ W^T with W [out] rows of in/32 blocks of `kind`, m <= MAX_ROWS.
 * Specialised per m (and output rows per job) so the accumulators live in registers. */
#define BLOCK_LOOP(OB, M)                                                                      \
    do {                                                                                       \
        int groups = out / (OB);                                                               \
        _Pragma("omp for schedule(static)") for (int g = 0; g < groups; g++) {                 \
            prefetch_rows(kind, W, in, out, (g + WEIGHT_PREFETCH_JOBS) * (OB), OB);            \
            block_rows(kind, OB, M, x, W, y, in, out, g * (OB));                               \
            prefetch_share(pf, g, groups);                                                     \
        }                                                                                      \
        _Pragma("omp for schedule(static)") for (int o = groups * (OB); o < out; o++)          \
            block_rows(kind, 1, M, x, W, y, in, out, o);                                       \
    } while (0)

/* ---------------------------------------------------------------- larger decode batches
 * 17-64 rows from GGUF blocks (9-16 take the wide kernel below) and 9-64 on bf16 weights (llama.py's
 * BLOCK_TILE_ROWS and LOOP_TILE_ROWS say where the engine uses it;
 * with tile_block's 8-row reuse, one thread, embedded base's layers, a loaded machine: 1.1-1.3x
 * the previous 2-row form and about torch's bf16 GEMM at 16-64 rows). Per tile of 16 output rows the
 * blocks are decoded once and transposed so that a vector holds one weight pair of each of
 * the 16 outputs; each input row then runs 16 accumulators, one per lane of the few-row
 * kernel's single accumulator, fed the same pairs in the same order, and sums them with the
 * same tree as _mm512_reduce_add_ps: every output is bit-identical to the few-row kernel's
 * (and so to the bf16 weights' kernel), whatever the batch. */
/* 16x16 transpose of 32-bit elements: r[j][l] -> o[l][j]. */
static inline void transpose16(__m512i *r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* u[4i+k] lane c (128-bit) holds rows 4i..4i+3, column 4c+k */
    for (int k = 0; k < 4; k++) {
        __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88);      /* lanes 0,2 of u[k], 0,2 of u[4+k] */
        __m512i b = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xdd);      /* lanes 1,3 */
        __m512i c = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
        __m512i d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xdd);
        r[k] = _mm512_shuffle_i32x4(a, c, 0x88);       /* col k: lane0 of u[k],u[4+k],u[8+k],u[12+k] */
        r[8 + k] = _mm512_shuffle_i32x4(a, c, 0xdd);   /* col 8+k */
        r[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88);   /* col 4+k */
        r[12 + k] = _mm512_shuffle_i32x4(b, d, 0xdd);  /* col 12+k */
    }
}

static inline __m512 tree16(__m512 *a) {
    __m512 s[8], t[4], u[2];
    for (int i = 0; i < 8; i++) s[i] = _mm512_add_ps(a[8 + i], a[i]);
    for (int j = 0; j < 4; j++) t[j] = _mm512_add_ps(s[4 + j], s[j]);
    for (int k = 0; k < 2; k++) u[k] = _mm512_add_ps(t[k], t[k + 2]);
    return _mm512_add_ps(u[0], u[1]);
}

static inline void store16(uint16_t *y, __m512 v) {
    float f[16];
    _mm512_storeu_ps(f, v);
    for (int j = 0; j < 16; j++) y[j] = f32_to_bf16(f[j]);
}

/* RB input rows (a compile-time constant) against 16 outputs whose weights are packed
 * P[pair][16 outputs] (uint32 pairs). Row r's output is tree16 over 16 lane-class sums, class l
 * summing pairs l, l+16, l+32, ... in order: the few-row kernel's lanes, so the same bits. The
 * classes run two at a time, each packed weight vector loaded once for RB rows' chains (RB = 8:
 * 16 independent accumulators in registers, enough to cover vdpbf16ps's latency; one class at a
 * time, 8 chains, was 8-12% slower at 16-64 rows by bench/kernels.py, 2 threads, each chain still
 * summed in its own order, so the bits did not change). An earlier form ran two rows with all 16
 * classes live (32 accumulators: every register) and loaded each weight vector once per two rows;
 * measured 1.4-1.9x slower at 32-64 rows (bench/kernels.py shapes, one thread). */
static inline __attribute__((always_inline)) void tile_block(const int RB, const uint32_t *P, const uint16_t *x, uint16_t *y,
                                                             int in, int out, int o0, int r0) {
    int np = in / 2;
    __m512 sums[8][16];
    const uint32_t *xr[8];
    for (int r = 0; r < RB; r++) xr[r] = (const uint32_t *)(x + (int64_t)(r0 + r) * in);
    for (int l = 0; l < 16; l += 2) {
        __m512 acc0[8], acc1[8];
        for (int r = 0; r < RB; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
        for (int i = l; i < np; i += 16) {
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(P + (int64_t)i * 16);
            __m512bh w1 = (__m512bh)_mm512_loadu_si512(P + (int64_t)(i + 1) * 16);
            for (int r = 0; r < RB; r++) {
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_set1_epi32(xr[r][i]));
                acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_set1_epi32(xr[r][i + 1]));
            }
        }
        for (int r = 0; r < RB; r++) sums[r][l] = acc0[r], sums[r][l + 1] = acc1[r];
    }
    for (int r = 0; r < RB; r++) store16(y + (int64_t)(r0 + r) * out + o0, tree16(sums[r]));
}

/* m rows against one packed tile, 8 rows at a time. */
/* m rows in blocks of 8, then the rest, each block's row count a compile-time constant: BLOCK(RB)
 * runs RB rows from row r on (tile_rows and wide_rows share it). */
#define BY_EIGHT(m, r, BLOCK)                                                                           \
    do {                                                                                                \
        for (r = 0; r + 8 <= (m); r += 8) BLOCK(8);                                                     \
        switch ((m) - r) {                                                                              \
        case 1: BLOCK(1); break;                                                                        \
        case 2: BLOCK(2); break;                                                                        \
        case 3: BLOCK(3); break;                                                                        \
        case 4: BLOCK(4); break;                                                                        \
        case 5: BLOCK(5); break;                                                                        \
        case 6: BLOCK(6); break;                                                                        \
        case 7: BLOCK(7); break;                                                                        \
        default: break;                                                                                 \
        }                                                                                               \
    } while (0)

static inline void tile_rows(const uint32_t *P, const uint16_t *x, uint16_t *y, int m, int in, int out, int o0) {
    int r;
#define TILE(RB) tile_block(RB, P, x, y, in, out, o0, r)
    BY_EIGHT(m, r, TILE);
#undef TILE
}

/* Tile rows o0..o0+15 decoded into P [in/2 pairs][16 outputs]; ds, ms: scratch [16 * nb]. */
static inline void tile_decode(int kind, const uint8_t *W, int nb, int o0, uint32_t *P, float *ds, float *ms) {
    int64_t rb = block_row_bytes(kind, nb * 32);
    if (kind == BLOCK_Q4_1R)
        for (int j = 0; j < 16; j++) {
            const uint16_t *row = (const uint16_t *)(W + (int64_t)(o0 + j) * rb);
            q4r_scales(row, nb, ds + j * nb);
            q4r_scales(row + nb, nb, ms + j * nb);
        }
    for (int b = 0; b < nb; b += (kind == BLOCK_Q4_1R && b + 2 <= nb) ? 2 : 1) {
        __m512i r0[16], r1[16];
        int two = kind == BLOCK_Q4_1R && b + 2 <= nb;
        for (int j = 0; j < 16; j++) {
            const uint8_t *row = W + (int64_t)(o0 + j) * rb;
            if (two) {
                __m512bh w0, w1;
                q4r_pair(row + 4 * nb + b * 16, ds + j * nb + b, ms + j * nb + b, &w0, &w1);
                r0[j] = (__m512i)w0; r1[j] = (__m512i)w1;
            } else if (kind == BLOCK_Q4_1R) r0[j] = (__m512i)q4r_single(row + 4 * nb + b * 16, ds[j * nb + b], ms[j * nb + b]);
            else r0[j] = (__m512i)q8_0_block(row + b * 34);
        }
        transpose16(r0);
        for (int l = 0; l < 16; l++) _mm512_storeu_si512(P + ((int64_t)b * 16 + l) * 16, r0[l]);
        if (two) {
            transpose16(r1);
            for (int l = 0; l < 16; l++) _mm512_storeu_si512(P + ((int64_t)(b + 1) * 16 + l) * 16, r1[l]);
        }
    }
}


/* m > MAX_ROWS rows, out a multiple of 16 (llama.py checks): tiles of 16 outputs. */
static inline __attribute__((always_inline)) void tiles_blocks(int kind, const uint16_t *x, const uint8_t *W, uint16_t *y,
                                                               int m, int in, int out, int threads, const Prefetch *pf) {
    int nb = in / 32;
#pragma omp parallel num_threads(threads)
    {
        uint32_t *P = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(in / 2) * 16);
        float *ds = (float *)malloc(sizeof(float) * 16 * nb), *ms = (float *)malloc(sizeof(float) * 16 * nb);
#pragma omp for schedule(static)
        for (int t = 0; t < out / 16; t++) {
            tile_decode(kind, W, nb, t * 16, P, ds, ms);
            tile_rows(P, x, y, m, in, out, t * 16);
            prefetch_share(pf, t, out / 16);
        }
        free(P);
        free(ds);
        free(ms);
    }
}

/* 9-16 rows ("wide"): WIDE_OB output rows per job decoded once into a small buffer, then the
 * few-row kernel's loop (block_rows: one accumulator per output and row, blocks in order) over
 * the rows 8 at a time, reading the decoded weights from L1: every row gets block_rows' bits
 * without the tiled kernel's transposes. Measured with bench/kernels.py (2 threads, the embedded
 * base's 30 layers from Q4_1 blocks, alternating builds): 9 rows 6.0 ms vs 8.4-9.6 tiled, 12 rows
 * 7.6 vs 8.9, 16 rows 8.8-9.4 vs 9.9-11.2; equal at 32 and 1.3x slower at 64, where the rows' inputs
 * no longer stay in L1 between output rows (the tiled kernel reads each input once a tile). One
 * output row a job was slower at every count (10.0 ms at 16), four no better than two. */
#define WIDE_ROWS 16
#define WIDE_OB 2
/* One output row's nb blocks decoded into buf[nb] (32 bf16 weights a vector, in order). */
static inline void wide_decode(int kind, const uint8_t *W, int nb, int o, __m512bh *buf, float *ds, float *ms) {
    const uint8_t *row = W + (int64_t)o * block_row_bytes(kind, nb * 32);
    if (kind == BLOCK_Q4_1R) {
        q4r_scales((const uint16_t *)row, nb, ds);
        q4r_scales((const uint16_t *)row + nb, nb, ms);
        const uint8_t *nib = row + 4 * nb;
        int b = 0;
        for (; b + 2 <= nb; b += 2) q4r_pair(nib + b * 16, ds + b, ms + b, &buf[b], &buf[b + 1]);
        if (b < nb) buf[b] = q4r_single(nib + b * 16, ds[b], ms[b]);
    } else
        for (int b = 0; b < nb; b++) buf[b] = q8_0_block(row + b * 34);
}

/* RB input rows (compile-time) against OB decoded output rows: block_rows' chains exactly. */
static inline __attribute__((always_inline)) void wide_group(const int OB, const int RB, const __m512bh *buf, int nb,
                                                             const uint16_t *x, uint16_t *y, int in, int out, int o0, int r0) {
    __m512 acc[WIDE_OB][8];
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < RB; r++) acc[j][r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512bh w[WIDE_OB];
        for (int j = 0; j < OB; j++) w[j] = buf[j * nb + b];
        for (int r = 0; r < RB; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (int64_t)(r0 + r) * in + b * 32);
            for (int j = 0; j < OB; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], w[j], xv);
        }
    }
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < RB; r++) y[(int64_t)(r0 + r) * out + o0 + j] = f32_to_bf16(_mm512_reduce_add_ps(acc[j][r]));
}

static inline __attribute__((always_inline)) void wide_rows(const int OB, const __m512bh *buf, int nb, const uint16_t *x,
                                                            uint16_t *y, int m, int in, int out, int o0) {
    int r;
#define WIDE(RB) wide_group(OB, RB, buf, nb, x, y, in, out, o0, r)
    BY_EIGHT(m, r, WIDE);
#undef WIDE
}

static inline __attribute__((always_inline)) void wide_blocks(int kind, const uint16_t *x, const uint8_t *W, uint16_t *y,
                                                              int m, int in, int out, int threads, const Prefetch *pf) {
    int nb = in / 32, groups = out / WIDE_OB;
#pragma omp parallel num_threads(threads)
    {
        __m512bh *buf = (__m512bh *)aligned_alloc(64, sizeof(__m512bh) * (size_t)WIDE_OB * nb);
        float *ds = (float *)malloc(sizeof(float) * nb), *ms = (float *)malloc(sizeof(float) * nb);
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            prefetch_rows(kind, W, in, out, (g + WEIGHT_PREFETCH_JOBS) * WIDE_OB, WIDE_OB);
            for (int j = 0; j < WIDE_OB; j++) wide_decode(kind, W, nb, g * WIDE_OB + j, buf + j * nb, ds, ms);
            wide_rows(WIDE_OB, buf, nb, x, y, m, in, out, g * WIDE_OB);
            prefetch_share(pf, g, groups);
        }
#pragma omp for schedule(static)
        for (int o = groups * WIDE_OB; o < out; o++) {
            wide_decode(kind, W, nb, o, buf, ds, ms);
            wide_rows(1, buf, nb, x, y, m, in, out, o);
        }
        free(buf);
        free(ds);
        free(ms);
    }
}

/* bf16 weights W [out, in] (in a multiple of 32, out of 16) packed per tile exactly as
 * tile_decode packs decoded blocks, for the same tiled rows: a prefill of up to 64 rows on a bf16
 * base (or on the bf16 copy of a GGUF base) then gets the few-row kernel's bits, as the GGUF
 * blocks do, so the two paths stay bit-identical (tests/test_native.py). */
static inline void tile_pack_bf16(const uint16_t *W, int in, int o0, uint32_t *P) {
    for (int b = 0; b < in / 32; b++) {
        __m512i r[16];
        for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512(W + (int64_t)(o0 + j) * in + b * 32);
        transpose16(r);
        for (int l = 0; l < 16; l++) _mm512_storeu_si512(P + ((int64_t)b * 16 + l) * 16, r[l]);
    }
}

static void tiles_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int m, int in, int out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        uint32_t *P = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(in / 2) * 16);
#pragma omp for schedule(static)
        for (int t = 0; t < out / 16; t++) {
            tile_pack_bf16(W, in, t * 16, P);
            tile_rows(P, x, y, m, in, out, t * 16);
        }
        free(P);
    }
}

/* One exported function per block kind, each with its own parallel region: an always-inline
 * helper taking `kind` would share one outlined OpenMP body in which `kind` is a runtime value
 * (branches in the inner loop; measured 3x slower on Q8_0). */
#define GEMV_BLOCKS(NAME, KIND, OB1, OB2)                                                                    \
    static void NAME##_pf(const uint16_t *x, const uint8_t *W, uint16_t *y, int m, int in, int out, int threads,   \
                          const Prefetch *pf) {                                                          \
        const int kind = KIND;                                                                           \
        if (m > MAX_ROWS && m <= WIDE_ROWS) {                                                            \
            wide_blocks(KIND, x, W, y, m, in, out, threads, pf);                                         \
            return;                                                                                      \
        }                                                                                                \
        if (m > MAX_ROWS) {                                                                              \
            tiles_blocks(KIND, x, W, y, m, in, out, threads, pf);                                        \
            return;                                                                                      \
        }                                                                                                \
        _Pragma("omp parallel num_threads(threads)") PER_ROWS(BLOCK_LOOP, OB1, OB2)                       \
    }                                                                                                    \
    void NAME(const uint16_t *x, const uint8_t *W, uint16_t *y, int m, int in, int out, int threads) {    \
        NAME##_pf(x, W, y, m, in, out, threads, NULL);                                                   \
    }

/* Output rows per job at 1 and 2 input rows, measured (python bench/kernels.py; best of 7, one
 * thread, embedded base): Q4_1 at 1 row 4 -> 0.80x the time of 1, at 2 rows 4 -> 0.87x; Q8_0
 * (the LM head) got 2-3x slower with 2 or 4 (not understood; its loads are contiguous), so 1. */
GEMV_BLOCKS(lorastack_gemv_q4_1r, BLOCK_Q4_1R, 4, 4)
GEMV_BLOCKS(lorastack_gemv_q8_0, BLOCK_Q8_0, 1, 1)

/* ---------------------------------------------------------------- int8 matmuls (opt-in)
 * Above MAX_ROWS rows the bf16 tiles are bound by compute, not bytes: `vdpbf16ps` does 32
 * multiply-adds an instruction and the tiled kernel runs it at about the rate a loop of
 * independent ones reaches on this CPU. `vpdpbusd` does 64 (u8 x s8 into int32). So the engine
 * can multiply in int8 instead: weights requantized once per output channel (symmetric, stored
 * +128 as u8: 1 byte a weight), activations quantized per row and 64-value block (s8 and an
 * fp32 scale), every block's int32 sum scaled into an fp32 accumulator. Measured on the
 * embedded base's 30 layers (python bench/kernels.py, two threads, rows' quantization
 * included): 1.46x the Q4_1 block kernel at 1 row (fewer instructions a weight than decoding a
 * block, though more bytes: it streams them at the machine's bandwidth), 1.6-2.0x at 2-64 rows. Each row is computed alone and in
 * the same order whatever the batch, so this path is batch-invariant too (speculative verify
 * passes stay exact); it is not bit-identical to the bf16 path, which is why it is opt-in
 * (Engine int8_matmuls).
 * Packed weights P: per tile of 16 outputs, [in / 4][16 outputs][4 consecutive inputs], the
 * operand order of vpdpbusd, so one 64-byte load feeds 16 outputs' 4 products. */
#define I8_BLOCK 64

/* W bf16 [out, in] (in % I8_BLOCK == 0) -> P and per-output scales, both padded to a whole
 * tile of 16 outputs (zero weights, scale 0: any vocabulary size works for the LM head). */
void lorastack_i8_pack(const uint16_t *W, int out, int in, uint8_t *P, float *scale, int threads) {
    int padded = (out + 15) / 16 * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int o = 0; o < padded; o++) {
        const uint16_t *w = W + (int64_t)o * in;
        float amax = 0;
        for (int k = 0; o < out && k < in; k++) amax = fmaxf(amax, fabsf(bf16_to_f32(w[k])));
        float s = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        scale[o] = s;
        uint8_t *tile = P + (int64_t)(o / 16) * in * 16 + (o % 16) * 4;
        for (int k = 0; k < in; k++) {
            int q = o < out ? (int)lrintf(bf16_to_f32(w[k]) * inv) : 0;
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            tile[(int64_t)(k / 4) * 64 + k % 4] = (uint8_t)(q + 128);
        }
    }
}

/* Rows x [m, in] -> aq (s8, same shape), da [m, in / I8_BLOCK] block scales, and per row
 * corr = 128 * sum_b da_b * sum(aq in b): what the +128 on the weights added to every output. */
static void i8_quant(const uint16_t *x, int m, int in, int8_t *aq, float *da, float *corr, int threads) {
    int nb = in / I8_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (m >= 16)
    for (int r = 0; r < m; r++) {
        float c = 0;
        for (int b = 0; b < nb; b++) {
            const uint16_t *xb = x + (int64_t)r * in + b * I8_BLOCK;
            __m512 v[I8_BLOCK / 16], mx = _mm512_setzero_ps();
            for (int k = 0; k < I8_BLOCK / 16; k++) {
                v[k] = bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)(xb + k * 16)));
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v[k]));
            }
            float amax = _mm512_reduce_max_ps(mx), d = amax / 127.0f;
            __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
            __m512i s = _mm512_setzero_si512();
            for (int k = 0; k < I8_BLOCK / 16; k++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[k], inv));
                s = _mm512_add_epi32(s, q);
                _mm_storeu_si128((__m128i *)(aq + (int64_t)r * in + b * I8_BLOCK + k * 16), _mm512_cvtsepi32_epi8(q));
            }
            da[r * nb + b] = d;
            c += 128.0f * d * (float)_mm512_reduce_add_epi32(s);
        }
        corr[r] = c;
    }
}

/* RB rows (a compile-time constant) against one packed tile of 16 outputs. */
static inline __attribute__((always_inline)) void i8_tile(const int RB, const uint8_t *P, const int8_t *aq, const float *da,
                                                          const float *corr, const float *scale, uint16_t *y, int in,
                                                          int out, int o0, int r0) {
    int nb = in / I8_BLOCK;
    __m512 acc[8];
    for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i sum[8];
        for (int r = 0; r < RB; r++) sum[r] = _mm512_setzero_si512();
        for (int g = b * (I8_BLOCK / 4); g < (b + 1) * (I8_BLOCK / 4); g++) {
            __m512i w = _mm512_load_si512(P + (int64_t)g * 64);
            for (int r = 0; r < RB; r++) {
                int32_t a;
                memcpy(&a, aq + (int64_t)(r0 + r) * in + g * 4, 4);
                sum[r] = _mm512_dpbusd_epi32(sum[r], w, _mm512_set1_epi32(a));
            }
        }
        for (int r = 0; r < RB; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(da[(r0 + r) * nb + b]), acc[r]);
    }
    __m512 s = _mm512_loadu_ps(scale + o0);
    for (int r = 0; r < RB; r++) {
        __m512 v = _mm512_mul_ps(s, _mm512_sub_ps(acc[r], _mm512_set1_ps(corr[r0 + r])));
        __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
        if (o0 + 16 <= out) _mm256_storeu_si256((__m256i *)(y + (int64_t)(r0 + r) * out + o0), b);
        else _mm256_mask_storeu_epi16(y + (int64_t)(r0 + r) * out + o0, (__mmask16)((1u << (out - o0)) - 1), b);
    }
}

static void i8_rows(const uint8_t *P, const int8_t *aq, const float *da, const float *corr, const float *scale, uint16_t *y,
                    int m, int in, int out, int o0) {
    int r = 0;
    for (; r + 8 <= m; r += 8) i8_tile(8, P, aq, da, corr, scale, y, in, out, o0, r);
    switch (m - r) {
    case 1: i8_tile(1, P, aq, da, corr, scale, y, in, out, o0, r); break;
    case 2: i8_tile(2, P, aq, da, corr, scale, y, in, out, o0, r); break;
    case 3: i8_tile(3, P, aq, da, corr, scale, y, in, out, o0, r); break;
    case 4: i8_tile(4, P, aq, da, corr, scale, y, in, out, o0, r); break;
    case 5: i8_tile(5, P, aq, da, corr, scale, y, in, out, o0, r); break;
    case 6: i8_tile(6, P, aq, da, corr, scale, y, in, out, o0, r); break;
    case 7: i8_tile(7, P, aq, da, corr, scale, y, in, out, o0, r); break;
    default: break;
    }
}

/* y[m, out] = x[m, in] @ W^T from lorastack_i8_pack's P and scale; any m, any out. */
static void i8_gemm_pf(const uint16_t *x, const uint8_t *P, const float *scale, uint16_t *y, int m, int in, int out,
                       int threads, const Prefetch *pf) {
    int8_t *aq = (int8_t *)malloc((size_t)m * in);
    float *da = (float *)malloc(sizeof(float) * (size_t)m * (in / I8_BLOCK)), *corr = (float *)malloc(sizeof(float) * m);
    i8_quant(x, m, in, aq, da, corr, threads);
    int tiles = (out + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        i8_rows(P + (int64_t)t * in * 16, aq, da, corr, scale, y, m, in, out, t * 16);
        prefetch_share(pf, t, tiles);
    }
    free(aq);
    free(da);
    free(corr);
}

void lorastack_gemm_i8(const uint16_t *x, const uint8_t *P, const float *scale, uint16_t *y, int m, int in, int out,
                       int threads) {
    i8_gemm_pf(x, P, scale, y, m, in, out, threads, NULL);
}

/* ---------------------------------------------------------------- decode attention
 * Attention of a few new query tokens against the KV cache, one (token, head) per job:
 *   out[i, h] = softmax(scale * q[i, h] . K[rows[i], h / group, 0..pos[i]]) @ V[same]
 * Why a kernel: (1) the same query gives the same bits whatever else is in the batch, how
 * long the other rows are and how many draft tokens ride along (torch's batched products
 * pick different blockings for different shapes, so a speculative verify pass and a plain
 * decode step could round differently and flip a near-tied greedy token); (2) it replaces
 * the 6-8 small torch ops per layer of the fp32-converting attention path.
 * q [total, heads, d], out [total, heads, d]; K, V: the cache layer [R, kv, T, d]. */
static inline __m512 exp512(__m512 x) { /* Cephes expf on 16 lanes, ~1 ulp; exp(-inf) = 0 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load16_bf16(const uint16_t *p, int left) { /* 16 bf16 as fp32, zero past `left` */
    __mmask16 k = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(k, p));
}

/* Scores of keys t..t+15 (those below n) for one query: the 16 dot products' lane vectors are
 * transposed and summed with tree16, the tree _mm512_reduce_add_ps uses, so each score has the
 * bits of the one-key-at-a-time loop; one transpose replaces 16 horizontal reductions. */
static inline __m512 scores16(const uint16_t *k, const uint16_t *qi, int t, int n, int d) {
    __m512 a[16];
    for (int j = 0; j < 16; j++) {
        a[j] = _mm512_setzero_ps();
        if (t + j < n)
            for (int c = 0; c < d; c += 32)
                a[j] = _mm512_dpbf16_ps(a[j], load32(k + (int64_t)(t + j) * d + c, d - c), load32(qi + c, d - c));
    }
    transpose16((__m512i *)a);
    return tree16(a);
}

/* out += p_t * V[t] over the keys, D (a compile-time count of 16-value chunks) accumulators in
 * registers, each summed key after key as the memory-accumulator loop did (same bits). */
static inline __attribute__((always_inline)) void attend_v(const int D, const float *s, const uint16_t *v, int n,
                                                           float inv, uint16_t *o) {
    __m512 acc[8];
    for (int c = 0; c < D; c++) acc[c] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        __m512 p = _mm512_set1_ps(s[t]);
        const uint16_t *vt = v + (int64_t)t * D * 16;
        for (int c = 0; c < D; c++)
            acc[c] = _mm512_fmadd_ps(p, bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)(vt + c * 16))), acc[c]);
    }
    for (int c = 0; c < D; c++)
        _mm256_storeu_si256((__m256i *)(o + c * 16), f32x16_to_bf16(_mm512_mul_ps(acc[c], _mm512_set1_ps(inv))));
}

void lorastack_attention_bf16(const uint16_t *q, const uint16_t *K, const uint16_t *V, uint16_t *out,
                              const int64_t *rows, const int64_t *pos, int total, int heads, int kv, int d,
                              int64_t row_stride, int64_t head_stride, float scale, int maxlen, int threads) {
    int group = heads / kv;
#pragma omp parallel num_threads(threads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(maxlen + 16));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(d + 16));
#pragma omp for schedule(static)
        for (int64_t job = 0; job < (int64_t)total * heads; job++) {
            int64_t i = job / heads;
            int h = (int)(job % heads);
            const uint16_t *qi = q + job * d;
            int64_t base = rows[i] * row_stride + (int64_t)(h / group) * head_stride;
            const uint16_t *k = K + base, *v = V + base;
            int n = (int)pos[i] + 1;
            __m512 sv = _mm512_set1_ps(scale), mxv = _mm512_set1_ps(-INFINITY);
            for (int t = 0; t < n; t += 16) {
                __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
                __m512 sc = _mm512_mul_ps(sv, scores16(k, qi, t, n, d));
                _mm512_mask_storeu_ps(s + t, m, sc);
                mxv = _mm512_mask_max_ps(mxv, m, mxv, sc);
            }
            float mx = _mm512_reduce_max_ps(mxv);
            __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx);
            for (int t = 0; t < n; t += 16) {
                __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
                __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), mv));
                e = _mm512_maskz_mov_ps(m, e);
                _mm512_mask_storeu_ps(s + t, m, e);
                sum = _mm512_add_ps(sum, e);
            }
            float inv = 1.0f / _mm512_reduce_add_ps(sum);
            uint16_t *o = out + job * d;
            if (d == 64) { attend_v(4, s, v, n, inv, o); continue; }
            if (d == 128) { attend_v(8, s, v, n, inv, o); continue; }
            for (int c = 0; c < d; c++) acc[c] = 0.0f;
            for (int t = 0; t < n; t++) {
                __m512 p = _mm512_set1_ps(s[t]);
                const uint16_t *vt = v + (int64_t)t * d;
                for (int c = 0; c < d; c += 16) {
                    __mmask16 m = d - c >= 16 ? 0xffff : (__mmask16)((1u << (d - c)) - 1);
                    _mm512_mask_storeu_ps(acc + c, m, _mm512_fmadd_ps(p, load16_bf16(vt + c, d - c), _mm512_maskz_loadu_ps(m, acc + c)));
                }
            }
            for (int c = 0; c < d; c++) o[c] = f32_to_bf16(acc[c] * inv);
        }
        free(acc);
        free(s);
    }
}

/* ---------------------------------------------------------------- the glue between matmuls
 * At batch 1 the weights take a few ms a token and the ~45 small torch ops a layer between
 * the matmuls (norms, rotary, K/V append, attention, SiLU*up, residuals) took more: each
 * costs 5-30 us of dispatch (torch.profiler over bench/engine.py's batch-1 run). These
 * kernels do one layer's glue in four calls, per token row, so they are batch-invariant as
 * well. Rounding follows the Hugging Face modules' steps in bf16 (normalise, round, times
 * weight, round; SiLU rounded before the product); sums run in fp32. */

/* y[i] = w * bf16(x[i] * rsqrt(mean(x[i]^2) + eps)); with `delta`, first x[i] = bf16(x[i] + delta[i]) in place. */
void lorastack_rmsnorm_bf16(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *y, int n, int d, float eps) {
    for (int i = 0; i < n; i++) {
        uint16_t *xi = x + (int64_t)i * d;
        if (delta) {
            const uint16_t *di = delta + (int64_t)i * d;
            for (int c = 0; c < d; c++) xi[c] = f32_to_bf16(bf16_to_f32(xi[c]) + bf16_to_f32(di[c]));
        }
        __m512 ss = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) {
            __m512 v = load16_bf16(xi + c, d - c);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        float r = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / d + eps);
        uint16_t *yi = y + (int64_t)i * d;
        for (int c = 0; c < d; c++) yi[c] = f32_to_bf16(bf16_to_f32(w[c]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xi[c]) * r)));
    }
}

/* y[i, j] = bf16(bf16(silu(g[i, j])) * u[i, j]) where gu[i] = [g | u], each of width `d`. */
void lorastack_silu_mul_bf16(const uint16_t *gu, uint16_t *y, int n, int d) {
    /* Rows in parallel from 8 rows (at 64 rows this was 6% of a decode step, one thread). */
#pragma omp parallel for schedule(static) if (n >= 8)
    for (int i = 0; i < n; i++) {
        const uint16_t *g = gu + (int64_t)i * 2 * d, *u = g + d;
        uint16_t *yi = y + (int64_t)i * d;
        for (int c = 0; c < d; c += 16) {
            int left = d - c;
            __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
            __m512 gv = load16_bf16(g + c, left);
            __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            __m512 sr = bf16x16_to_f32(f32x16_to_bf16(s)); /* silu rounded to bf16 first, as torch's bf16 silu */
            _mm256_mask_storeu_epi16(yi + c, m, f32x16_to_bf16(_mm512_mul_ps(sr, load16_bf16(u + c, left))));
        }
    }
}

/* Rotary embedding (Hugging Face's rotate-half layout) of one head vector, rounded once. */
static inline void rope_head(const uint16_t *src, const uint16_t *cos, const uint16_t *sin, uint16_t *dst, int d) {
    int half = d / 2;
    for (int j = 0; j < d; j++) {
        float rot = j < half ? -bf16_to_f32(src[j + half]) : bf16_to_f32(src[j - half]);
        dst[j] = f32_to_bf16(bf16_to_f32(src[j]) * bf16_to_f32(cos[j]) + rot * bf16_to_f32(sin[j]));
    }
}

/* One layer's attention for `total` new tokens: qkv[i] = [q (heads*d) | k (kv*d) | v (kv*d)];
 * rotary on q and k (cos/sin [total, d]), k and v appended to the cache at (rows[i], pos[i]),
 * then lorastack_attention_bf16's softmax over keys 0..pos[i]; out [total, heads*d]. */
void lorastack_rope_attend_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *K, uint16_t *V,
                                const int64_t *rows, const int64_t *pos, int total, int heads, int kv, int d,
                                int64_t row_stride, int64_t head_stride, float scale, int maxlen, uint16_t *out, int threads) {
    int64_t width = (int64_t)(heads + 2 * kv) * d;
    uint16_t *q = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)total * heads * d);
    for (int64_t i = 0; i < total; i++) {
        const uint16_t *src = qkv + i * width, *ci = cos + i * d, *si = sin + i * d;
        for (int h = 0; h < heads; h++) rope_head(src + (int64_t)h * d, ci, si, q + (i * heads + h) * d, d);
        for (int g = 0; g < kv; g++) {
            int64_t at = rows[i] * row_stride + (int64_t)g * head_stride + pos[i] * d;
            rope_head(src + (int64_t)(heads + g) * d, ci, si, K + at, d);
            memcpy(V + at, src + (int64_t)(heads + kv + g) * d, sizeof(uint16_t) * d);
        }
    }
    lorastack_attention_bf16(q, K, V, out, rows, pos, total, heads, kv, d, row_stride, head_stride, scale, maxlen, threads);
    free(q);
}

/* ---------------------------------------------------------------- the layer loop
 * A whole decode step's layers in one call, for up to MAX_ROWS token rows (more through the
 * blocks' tiled path, up to llama.py's LOOP_TILE_ROWS). It runs exactly the
 * kernels above in the order LlamaRunner._glued calls them from Python (so the output is the
 * same, bit for bit); what it removes is the ~13 Python-level calls a layer (ctypes argument
 * conversion, tensor allocation, dispatch), measured with py-spy at ~25% of a batch-1 step
 * on the embedded base with one adapter. */
typedef struct {
    const void *w;        /* bf16 [out, in], or GGUF blocks */
    int32_t kind;         /* -1 bf16, BLOCK_Q4_1R, BLOCK_Q8_0 */
    int32_t in, out;
    int32_t P;            /* LoRA parts (0: no LoRA bank for this projection) */
    const uint16_t *A;    /* LoRA bank, see lorastack_lora_bf16 (int8 when As is set: lorastack_lora_i8) */
    const int64_t *B;
    const int32_t *outs;
    const float *As;      /* int8 LoRA bank's scales, or NULL */
    const int64_t *Bs;
    const uint8_t *i8;    /* lorastack_i8_pack's weights, or NULL (int8 matmuls off) */
    const float *i8_scale;
} DecodeProj;

typedef struct {
    DecodeProj p[4];      /* q|k|v, o, gate|up, down */
    const uint16_t *norm_in, *norm_post;
} DecodeLayer;

#define PREFETCH_MAX_BYTES (4 << 20)
static void decode_proj(const DecodeProj *p, const uint16_t *x, uint16_t *y, int n, int rank, const int64_t *slots,
                        const float *weights, int K, int threads, const int64_t *used, int nused) {
    /* With LoRA rows: this projection's A and B of every slot in use, prefetched during the GEMM. */
    int lora = slots && p->P, nr = lora ? nused * (1 + p->P) : 0, PR = p->P * rank, es = p->As ? 1 : 2;
    const char *ptr[nr > 0 ? nr : 1];
    int64_t end[nr > 0 ? nr : 1], at = 0;
    for (int u = 0, i = 0; u < (lora ? nused : 0); u++) {
        ptr[i] = (const char *)p->A + used[u] * PR * (int64_t)p->in * es;
        end[i++] = at += (int64_t)PR * p->in * es;
        for (int q = 0; q < p->P; q++) {
            ptr[i] = (const char *)(intptr_t)p->B[q] + used[u] * (int64_t)rank * p->outs[q] * es;
            end[i++] = at += (int64_t)rank * p->outs[q] * es;
        }
    }
    /* Beyond a few MB (64 rows on 64 adapters: 2-9 MB a projection) the lines would be evicted
     * before the LoRA kernel reads them: measured 2% slower at 64 rows, 3-4% faster at 4 and 16. */
    Prefetch pf = {at <= PREFETCH_MAX_BYTES ? nr : 0, ptr, end};
    if (p->i8) i8_gemm_pf(x, p->i8, p->i8_scale, y, n, p->in, p->out, threads, &pf);
    else if (p->kind == BLOCK_Q4_1R) lorastack_gemv_q4_1r_pf(x, (const uint8_t *)p->w, y, n, p->in, p->out, threads, &pf);
    else if (p->kind == BLOCK_Q8_0) lorastack_gemv_q8_0_pf(x, (const uint8_t *)p->w, y, n, p->in, p->out, threads, &pf);
    else lorastack_gemv_bf16(x, (const uint16_t *)p->w, y, n, p->in, p->out, threads);
    if (lora && p->As)
        lorastack_lora_i8(x, y, (const int8_t *)p->A, p->As, p->B, p->Bs, p->outs, p->P, rank, p->in, n, slots, weights, K, threads);
    else if (lora) lorastack_lora_bf16(x, y, p->A, p->B, p->outs, p->P, rank, p->in, n, slots, weights, K, threads);
}

/* h [n, d]: the embedded tokens, updated in place (the residual stream); xout [n, d]: the
 * final-normed rows for the LM head. K, V: each layer's cache tensor [R, kv, T, hd]. slots
 * NULL: no LoRA this step. */
void lorastack_decode_layers(const DecodeLayer *layers, int nl, const uint16_t *final_norm, uint16_t *h, uint16_t *xout,
                             int n, int d, const int64_t *K, const int64_t *V, const int64_t *rows, const int64_t *pos,
                             const uint16_t *cos, const uint16_t *sin, int heads, int kv, int hd, int64_t row_stride,
                             int64_t head_stride, float scale, int maxlen, float eps, int rank, const int64_t *slots,
                             const float *weights, int K_entries, int threads) {
    int qkv_out = layers[0].p[0].out, gu_out = layers[0].p[2].out;
    uint16_t *qkv = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)n * qkv_out);
    uint16_t *att = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)n * heads * hd);
    uint16_t *dlt = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)n * d);
    uint16_t *gu = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)n * gu_out);
    uint16_t *act = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)n * (gu_out / 2));
    /* The distinct slots the rows use (weight != 0), for decode_proj's prefetches. */
    int64_t *used = (int64_t *)malloc(sizeof(int64_t) * (size_t)(slots ? n * K_entries : 1));
    int nused = 0;
    for (int64_t e = 0; slots && e < (int64_t)n * K_entries; e++) {
        int seen = weights[e] == 0.0f;
        for (int u = 0; u < nused && !seen; u++) seen = used[u] == slots[e];
        if (!seen) used[nused++] = slots[e];
    }
    uint16_t *x = xout;
    lorastack_rmsnorm_bf16(h, NULL, layers[0].norm_in, x, n, d, eps);
    for (int li = 0; li < nl; li++) {
        const DecodeLayer *L = layers + li;
        decode_proj(&L->p[0], x, qkv, n, rank, slots, weights, K_entries, threads, used, nused);
        lorastack_rope_attend_bf16(qkv, cos, sin, (uint16_t *)(intptr_t)K[li], (uint16_t *)(intptr_t)V[li], rows, pos, n,
                                   heads, kv, hd, row_stride, head_stride, scale, maxlen, att, threads);
        decode_proj(&L->p[1], att, dlt, n, rank, slots, weights, K_entries, threads, used, nused);
        lorastack_rmsnorm_bf16(h, dlt, L->norm_post, x, n, d, eps);
        decode_proj(&L->p[2], x, gu, n, rank, slots, weights, K_entries, threads, used, nused);
        lorastack_silu_mul_bf16(gu, act, n, gu_out / 2);
        decode_proj(&L->p[3], act, dlt, n, rank, slots, weights, K_entries, threads, used, nused);
        lorastack_rmsnorm_bf16(h, dlt, li + 1 < nl ? layers[li + 1].norm_in : final_norm, x, n, d, eps);
    }
    free(used);
    free(qkv);
    free(att);
    free(dlt);
    free(gu);
    free(act);
}

/* ---------------------------------------------------------------- peak rate
 * How fast this CPU runs the two dot-product instructions the matmuls are built on, from
 * registers only (no memory traffic): the compute roofline bench/engine.py holds the large-batch
 * rows against. 12 independent chains a thread hide the instructions' latency. `kind` 0:
 * vdpbf16ps (32 multiply-adds, the exact path), 1: vpdpbusd (64, int8 matmuls). Returns the
 * multiply-adds done, for the caller to time. */
double lorastack_peak_macs(int kind, int64_t iters, int threads) {
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        float sink = 0;
        if (kind == 0) {
            __m512 acc[12];
            __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
            for (int j = 0; j < 12; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t it = 0; it < iters; it++)
                for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
            for (int j = 0; j < 12; j++) sink += _mm512_reduce_add_ps(acc[j]);
            total = (double)iters * 12 * 32;
        } else {
            __m512i acc[12];
            __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
            for (int j = 0; j < 12; j++) acc[j] = _mm512_setzero_si512();
            for (int64_t it = 0; it < iters; it++)
                for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
            for (int j = 0; j < 12; j++) sink += (float)_mm512_reduce_add_epi32(acc[j]);
            total = (double)iters * 12 * 64;
        }
        if (sink == 1.2345f) total += 1; /* keeps the chains alive; never true in practice */
    }
    return total;
}
