/* Causal softmax attention over ragged row groups, float32: the inner loop of mingpt/resume.py.
 *
 * A batch holds n slabs; each slab's rows are groups g = (pos, start, size): rows start..start+size-1
 * are positions pos..pos+size-1 of one patched run. Row i of group g (position pos+i) attends to the
 * base run's keys 0..pos-1 (pk, pv: one copy shared by every slab) and to its own group's rows
 * start..start+i. Only those keys are visited, so no score is computed to be masked away.
 *
 * Sums run over 16 lanes (W): lane l of a row's score gathers dimensions l, l + 16, ... of q * k,
 * in that order, and lanes are added as a tree (l + 8, then + 4, + 2, + 1), so the vector width
 * never changes a result. They are computed on the target's own vectors (NB bytes: 64 with AVX-512, 32
 * with AVX, else 16), PARTS of them per 16 lanes, with GCC's vector extensions (clang has them too):
 * compilers split wider vectors into registers well for sums and products, but broadcast scalars,
 * compare and shuffle them one lane at a time through memory (on AVX2: over half of the kernel's time).
 * Head sizes that are not a multiple of 16 finish with scalar tails. Work is split over (slab, group)
 * items, in memory order and in runs of equal work, between the OpenMP threads of the caller (torch's
 * own runtime once torch is loaded): a group's rows are consecutive, so a thread reads whole rows of
 * q, k and v (every head) in turn, which the CPU's prefetchers follow; by (slab, head) it would read
 * one head's 256 bytes per row, rows a few kilobytes apart.
 * Compiled and loaded by mingpt/ragged.py; every number is checked there against torch at load and
 * in tests/test_kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(_OPENMP) && defined(__clang__)
/* torch runs GNU's OpenMP (libgomp); clang's (libomp) would add a second pool of threads, spinning
 * against torch's after every call: the build without OpenMP (one thread) is taken instead */
#error "clang's OpenMP runtime is not torch's"
#elif defined(_OPENMP)
#include <omp.h>
#endif

typedef int64_t i64;

#define W 16        /* lanes of every sum */
#define MAX_CHUNKS 16  /* head sizes up to 256 (GPT-2's are 64) */
#define X2(h, l) (l) ^ (h), (l + 1) ^ (h)  /* lanes l.. of a vector, each xor h */
#define X4(h, l) X2(h, l), X2(h, l + 2)
#define X8(h, l) X4(h, l), X4(h, l + 4)
#define X16(h, l) X8(h, l), X8(h, l + 8)
#if defined(__AVX512F__)
#define NB 64
#define XOR(h) X16(h, 0)  /* lanes 0..NW-1 of a native vector, each xor h */
#elif defined(__AVX__)
#define NB 32
#define XOR(h) X8(h, 0)
#else
#define NB 16
#define XOR(h) X4(h, 0)
#endif
#define NW (NB / 4)      /* floats per native vector */
#define PARTS (W / NW)   /* native vectors per W lanes */
typedef float nv __attribute__((vector_size(NB)));
typedef float nvu __attribute__((vector_size(NB), aligned(4)));  /* unaligned loads and stores */
typedef int32_t ni __attribute__((vector_size(NB)));

static inline nv load(const float* p) { return *(const nvu*)p; }

static inline nv nmax(nv a, nv b) { ni gt = a > b; return (nv)(((ni)a & gt) | ((ni)b & ~gt)); }

/* a with lanes l and l ^ h swapped (h a power of two below NW): a tree's step within one vector */
#if defined(__clang__)
/* clang has no __builtin_shuffle, and its __builtin_shufflevector takes the lanes as constants: one
 * list per step (h is a constant once sum16 and max16 are unrolled, so the switch folds away) */
static inline nv swap(nv a, const int h) {
    switch (h) {
    case 1: return __builtin_shufflevector(a, a, XOR(1));
    case 2: return __builtin_shufflevector(a, a, XOR(2));
#if NW > 4
    case 4: return __builtin_shufflevector(a, a, XOR(4));
#endif
#if NW > 8
    case 8: return __builtin_shufflevector(a, a, XOR(8));
#endif
    }
    return a;  /* not reached: h < NW */
}
#else
static inline nv swap(nv a, const int h) { return __builtin_shuffle(a, (ni){XOR(0)} ^ h); }
#endif

/* The total of W lanes held as PARTS vectors (s is overwritten): lane l + lane l + 8, + 4, + 2, + 1;
 * between parts with vector adds, then within one with shuffles (4 steps, not 15 scalar adds). */
static inline float sum16(nv* s) {
    for (int w = PARTS / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) s[i] += s[i + w];
    nv a = s[0];
    for (int h = NW / 2; h >= 1; h /= 2) a += swap(a, h);
    return a[0];
}

/* The largest of W lanes held as PARTS vectors (s is overwritten), in sum16's order. */
static inline float max16(nv* s) {
    for (int w = PARTS / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) s[i] = nmax(s[i], s[i + w]);
    nv a = s[0];
    for (int h = NW / 2; h >= 1; h /= 2) a = nmax(a, swap(a, h));
    return a[0];
}

/* e^x lane-wise for x <= 0 (a score minus the row's largest): 2^k e^r with k = round(x / ln 2),
 * |r| <= ln2 / 2 (ln 2 split in two for an exact r), e^r by its degree-6 Taylor polynomial
 * (truncation < 2e-7 relative); x < -87 (e^x below float32's normal range) gives 0, and NaN stays
 * NaN, as in torch, so that a damaged activation still shows in the output. */
static inline nv exp_neg(nv x) {
    const float shift = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    nv k = (x * 1.44269504088896341f + shift) - shift;
    nv r = x - k * 0.693359375f + k * 2.12194440e-4f;
    nv p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    ni bits = (ni)p + (__builtin_convertvector(k, ni) << 23);  /* times 2^k, in the exponent field */
    ni nan = x != x;
    return (nv)((bits & ~(x < -87.0f) & ~nan) | ((ni)x & nan));
}

typedef struct {
    i64 n, nh, hs, G, last_only;
    const i64 *pos, *start, *size;
    const float *q, *k, *v, *pk, *pv;
    float* z;
    i64 qs[3], ks[3], vs[3], pks[2], pvs[2], zs[3];  /* strides: (slab, head, row), (head, row), z (slab, row, head) */
    float scale;
} job;

/* q . k for one key: native chunk m goes to lane part m % PARTS, so each of the W lanes sums its
 * dimensions in order; then the lanes (sum16) and the scalar tail. N: whole native vectors per head. */
static inline float dot(const i64 N, const i64 tail, const nv* qv, const float* qt, const float* kp) {
    nv acc[PARTS] = {0};
    for (i64 m = 0; m < N; m++) acc[m % PARTS] += qv[m] * load(kp + NW * m);
    float s = N ? sum16(acc) : 0.0f;
    for (i64 d = 0; d < tail; d++) s += qt[d] * kp[NW * N + d];
    return s;
}

/* Every query row of group g of slab s, head h. C: whole vectors per head (a constant where inlined),
 * tail: the rest; sc: scratch for one row's scores, padded to whole vectors. */
static inline __attribute__((always_inline)) void group_head(const i64 C, const job* J, i64 s, i64 g, i64 h, float* sc) {
    const i64 tail = J->hs - W * C, N = C * PARTS;
    const float* kb = J->k + s * J->ks[0] + h * J->ks[1];
    const float* vb = J->v + s * J->vs[0] + h * J->vs[1];
    const float* pkb = J->pk + h * J->pks[0];
    const float* pvb = J->pv + h * J->pvs[0];
    const i64 p = J->pos[g], a = J->start[g], S = J->size[g];
    for (i64 i = J->last_only ? S - 1 : 0; i < S; i++) {
        const i64 row = J->last_only ? g : a + i, keys = p + i + 1, padded = (keys + W - 1) / W * W;
        const float* qp = J->q + s * J->qs[0] + h * J->qs[1] + row * J->qs[2];
        nv qv[MAX_CHUNKS * PARTS], o[MAX_CHUNKS * PARTS];
        float qt[W], ot[W];
        for (i64 m = 0; m < N; m++) qv[m] = load(qp + NW * m) * J->scale;
        for (i64 d = 0; d < tail; d++) qt[d] = qp[W * C + d] * J->scale;
        for (i64 j = 0; j < p; j++) sc[j] = dot(N, tail, qv, qt, pkb + j * J->pks[1]);
        for (i64 j = 0; j <= i; j++) sc[p + j] = dot(N, tail, qv, qt, kb + (a + j) * J->ks[2]);
        for (i64 j = keys; j < padded; j++) sc[j] = -INFINITY;  /* never the max of a real score; exp gives 0 */
        nv big[PARTS], total[PARTS] = {0};
        for (int u = 0; u < PARTS; u++) big[u] = *(nv*)(sc + NW * u);
        for (i64 j = W; j < padded; j += W)
            for (int u = 0; u < PARTS; u++) big[u] = nmax(big[u], *(nv*)(sc + j + NW * u));
        const float top = max16(big);
        for (i64 j = 0; j < padded; j += W)
            for (int u = 0; u < PARTS; u++) {
                nv e = exp_neg(*(nv*)(sc + j + NW * u) - top);
                *(nv*)(sc + j + NW * u) = e;
                total[u] += e;
            }
        for (i64 m = 0; m < N; m++) o[m] = (nv){0};
        for (i64 d = 0; d < tail; d++) ot[d] = 0.0f;
        for (i64 j = 0; j < keys; j++) {
            const float* vp = j < p ? pvb + j * J->pvs[1] : vb + (a + j - p) * J->vs[2];
            const float w = sc[j];
            for (i64 m = 0; m < N; m++) o[m] += w * load(vp + NW * m);
            for (i64 d = 0; d < tail; d++) ot[d] += w * vp[W * C + d];
        }
        const float inv = 1.0f / sum16(total);
        float* zp = J->z + s * J->zs[0] + row * J->zs[1] + h * J->zs[2];
        for (i64 m = 0; m < N; m++) *(nvu*)(zp + NW * m) = o[m] * inv;
        for (i64 d = 0; d < tail; d++) zp[W * C + d] = ot[d] * inv;
    }
}

/* The work of group g (score and value terms of the rows it computes, plus one per row). */
static inline i64 cost(const job* J, i64 g) {
    const i64 p = J->pos[g], S = J->size[g];
    if (S < 1) return 0;
    return J->last_only ? p + S + 1 : S * p + S * (S + 1) / 2 + S;
}

/* meta: n, nh, hs, G, last_only, then the strides (q 3, k 3, v 3, pk 2, pv 2, z 3), then the number
 * of threads (torch's, passed in so that a second OpenMP runtime would obey it too); groups: pos[G],
 * start[G], size[G]. With last_only, q and z hold one row per group (its last), indexed by g.
 * Returns 0, or 1 if scratch memory could not be had, 2 if the head size is over 16 * MAX_CHUNKS. */
int ragged_attend(const i64* meta, const i64* groups, const float* q, const float* k, const float* v,
                  const float* pk, const float* pv, float* z, float scale) {
    job J = {meta[0], meta[1], meta[2], meta[3], meta[4], groups, groups + meta[3], groups + 2 * meta[3],
             q, k, v, pk, pv, z, {meta[5], meta[6], meta[7]}, {meta[8], meta[9], meta[10]},
             {meta[11], meta[12], meta[13]}, {meta[14], meta[15]}, {meta[16], meta[17]},
             {meta[18], meta[19], meta[20]}, scale};
    const i64 C = J.hs / W;
    if (C > MAX_CHUNKS) return 2;
    i64 T = 1;
    for (i64 g = 0; g < J.G; g++) T = J.pos[g] + J.size[g] > T ? J.pos[g] + J.size[g] : T;
    const i64 padded = (T + W - 1) / W * W;
    int failed = 0;
    i64 per_slab = 0;
    for (i64 g = 0; g < J.G; g++) per_slab += cost(&J, g);
#pragma omp parallel num_threads(meta[21] > 0 ? meta[21] : 1)
    {
        int threads = 1, id = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        /* items (slab, group) in memory order, split into runs of equal work: a group's rows are
         * consecutive, so each thread streams through whole rows of q, k, v, every head at once */
        const i64 total = J.n * per_slab, lo = total * id / threads, hi = total * (id + 1) / threads;
        float* sc = aligned_alloc(64, sizeof(float) * padded);
        if (!sc) failed = 1;
        i64 done = 0;
        for (i64 s = 0; sc && s < J.n; s++) {
            if (done + per_slab <= lo) { done += per_slab; continue; }
            if (done >= hi) break;
            for (i64 g = 0; g < J.G; g++) {
                const i64 w = cost(&J, g), mid = done + w / 2;
                done += w;
                if (w == 0 || mid < lo || mid >= hi) continue;  /* an item belongs to the thread of its midpoint */
                for (i64 h = 0; h < J.nh; h++) {
                    if (C == 4 && J.hs == 64)
                        group_head(4, &J, s, g, h, sc);  /* GPT-2's head size, unrolled */
                    else
                        group_head(C, &J, s, g, h, sc);
                }
            }
        }
        free(sc);
    }
    return failed;
}
