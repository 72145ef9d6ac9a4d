/* The machine's floor for SparQ's step 2, outside XLA: how fast can k random rows of K and V
 * (D floats each, increasing positions, as the top-k returns them) be read and attended, compared
 * with streaming the same number of bytes?
 *
 *   cc -O3 -march=native -ffast-math -fopenmp scripts/row_reads.c -o /tmp/row_reads -lm
 *   OMP_NUM_THREADS=2 /tmp/row_reads [--huge] [--prefetch N] [heads S k D]
 *
 * Defaults: 32 (batch row, KV head) pairs, S=32768, k=2048, D=128: benchmark.py attention's B=4,
 * Hkv=8, 1/8 case (67 MB of rows out of 1 GiB of cache). --huge asks for transparent huge pages
 * (madvise), --prefetch N prefetches the rows N positions ahead. Prints the median of 7 runs.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float *alloc(size_t n, int huge) {
    float *p = aligned_alloc(1 << 21, (n * sizeof(float) + (1 << 21) - 1) & ~(size_t)((1 << 21) - 1));
    if (!p) { fprintf(stderr, "out of memory (%zu floats)\n", n); exit(1); }
    if (huge) madvise(p, n * sizeof(float), MADV_HUGEPAGE);
    for (size_t i = 0; i < n; i++) p[i] = (float)(i % 97) * 0.01f;  /* touch every page */
    return p;
}

int main(int argc, char **argv) {
    int huge = 0, pf = 0, pos = 0;
    long dims[4] = {32, 32768, 2048, 128};  /* heads, S, k, D */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: %s [--huge] [--prefetch N] [heads S k D]\n"
                   "Times reading k random rows (increasing positions) of K and V, D floats each, out of S per\n"
                   "head, with an fp32 online-softmax attention over them (SparQ's step 2), against streaming\n"
                   "the same bytes. Defaults: 32 heads, S=32768, k=2048, D=128. --huge: madvise huge pages;\n"
                   "--prefetch N: prefetch rows N ahead. Threads: OMP_NUM_THREADS.\n", argv[0]);
            return 0;
        }
        if (!strcmp(argv[i], "--huge")) huge = 1;
        else if (!strcmp(argv[i], "--prefetch") && i + 1 < argc) pf = atoi(argv[++i]);
        else if (pos < 4) dims[pos++] = atol(argv[i]);
        else { fprintf(stderr, "usage: %s [--huge] [--prefetch N] [heads S k D]\n", argv[0]); return 2; }
    }
    long H = dims[0], S = dims[1], K = dims[2], D = dims[3];
    if (H < 1 || S < 1 || K < 1 || K > S || D < 1 || D > 1024 || pf < 0) {
        fprintf(stderr, "need heads, S, k, D >= 1, k <= S, D <= 1024 and prefetch >= 0; got %ld %ld %ld %ld, %d\n", H, S, K, D, pf);
        return 2;
    }
    float *k = alloc((size_t)H * S * D, huge), *v = alloc((size_t)H * S * D, huge);
    float *q = alloc((size_t)H * D, 0), *out = alloc((size_t)H * D, 0);
    int *idx = malloc(sizeof(int) * H * K);
    srand(1);
    for (long h = 0; h < H; h++)  /* k distinct positions in increasing order (selection sampling) */
        for (long s = 0, c = 0; s < S && c < K; s++)
            if (rand() % (S - s) < K - c) idx[h * K + c++] = (int)s;

    double t_rows[7], t_stream[7];
    size_t row_bytes = (size_t)H * K * D * 2 * sizeof(float);
    for (int rep = 0; rep < 7; rep++) {
        double t0 = now();
#pragma omp parallel for schedule(static)
        for (long h = 0; h < H; h++) {
            const float *kh = k + (size_t)h * S * D, *vh = v + (size_t)h * S * D, *qh = q + h * D;
            const int *ih = idx + h * K;
            float acc[1024], top = -INFINITY, total = 0;  /* online softmax, fp32 */
            memset(acc, 0, sizeof(float) * D);
            for (long j = 0; j < K; j++) {
                if (pf && j + pf < K)
                    for (long c = 0; c < D; c += 16) {
                        __builtin_prefetch(kh + (size_t)ih[j + pf] * D + c);
                        __builtin_prefetch(vh + (size_t)ih[j + pf] * D + c);
                    }
                const float *kr = kh + (size_t)ih[j] * D, *vr = vh + (size_t)ih[j] * D;
                float logit = 0;
                for (long c = 0; c < D; c++) logit += qh[c] * kr[c];
                float new_top = logit > top ? logit : top, scale = expf(top - new_top), p = expf(logit - new_top);
                total = total * scale + p;
                for (long c = 0; c < D; c++) acc[c] = acc[c] * scale + p * vr[c];
                top = new_top;
            }
            for (long c = 0; c < D; c++) out[h * D + c] = acc[c] / total;
        }
        t_rows[rep] = now() - t0;
        /* the same number of bytes, streamed from the starts of K and V (a plain reduction) */
        size_t n = (size_t)H * K * D;
        double sum = 0;
        t0 = now();
#pragma omp parallel for reduction(+ : sum) schedule(static)
        for (size_t i = 0; i < n; i++) sum += k[i] + v[i];
        t_stream[rep] = now() - t0;
        if (sum == 1234.5) puts("");  /* keep the reduction */
    }
    qsort(t_rows, 7, sizeof(double), cmp_double);
    qsort(t_stream, 7, sizeof(double), cmp_double);
    printf("%ld heads, S=%ld, k=%ld rows of D=%ld (K and V: %.1f MB), huge pages %s, prefetch %d\n",
           H, S, K, D, row_bytes / 1e6, huge ? "asked" : "no", pf);
    printf("random rows + attention: %.2f ms (%.1f GB/s); streaming the same bytes: %.2f ms (%.1f GB/s); "
           "ratio %.2fx  [out %g]\n", t_rows[3] * 1e3, row_bytes / t_rows[3] / 1e9, t_stream[3] * 1e3,
           row_bytes / t_stream[3] / 1e9, t_rows[3] / t_stream[3], out[0]);
    return 0;
}
