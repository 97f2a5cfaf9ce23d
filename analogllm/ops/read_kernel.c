/* One analogue read after the tile matmuls, fused into a single pass over the tile outputs (CPU).
 *
 * For every output row n and tile t:
 *     v   = y[t, n, o]                                   matmul result, normalised units
 *     v  -= c(irk · cur[t, n, o]) · yd[t, n, o]          optional IR drop (analogllm.ops.read)
 *     v  += z · sqrt(usq[t, n] · rv[t, o] + shot2 · |v| + c)   read, detector and output noise
 *     v   = sat · tanh(v / sat)                          optional output nonlinearity
 *     v   = v · again[t, o] + aoff[t, o]                 optional static ADC gain and offset errors
 *     v   = round(clamp(v, ±bound[t]) · inv_step[t])     optional ADC (codes), range per tile
 *     out[n, o] = Σ_t v · scale[t, o]  (+ bias[o])
 * which is the reference read of analogllm.ops.read in one vectorised pass instead of about ten.
 *
 * z is the Philox-4x32-10 normal of analogllm.ops.philox, bit for bit in the integer part: word o % 4 of
 * Box–Muller over Philox(counter = (o / 4, n, t, stream 0), key). The float part (log, sin, cos) uses
 * polynomials accurate to a few 1e-7, so the kernel's normals agree with torch's to about 1e-6. A
 * sample depends only on the key and its position, so any split of the rows over threads gives the
 * same numbers, and every loop vectorises.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PHILOX_M0 0xD2511F53U
#define PHILOX_M1 0xCD9E8D57U
#define PHILOX_W0 0x9E3779B9U
#define PHILOX_W1 0xBB67AE85U

/* log2(m) for m in [0.75, 1.5): m − 1 times a degree-7 polynomial, least-squares fitted on Chebyshev
 * nodes (max abs. error 5e-8); no division, so it vectorises at full rate. */
static inline float log2_near_one(float m) {
    float f = m - 1.0f;
    return f * (1.442696112f + f * (-0.7213507771f + f * (0.4807878595f + f * (-0.3603089630f
           + f * (0.2911365041f + f * (-0.2517110152f + f * (0.1986008206f + f * -0.08797915244f)))))));
}

/* √(−2 ln u) for u in (0, 1]: u = m·2^e with m in [0.75, 1.5). */
static inline float bm_radius(float u) {
    uint32_t bits;
    memcpy(&bits, &u, 4);
    int32_t e = (int32_t)((bits >> 23) & 0xff) - 127;
    bits = (bits & 0x007fffffU) | 0x3f800000U;
    float m;
    memcpy(&m, &bits, 4);
    if (m >= 1.5f) { m *= 0.5f; e += 1; }
    float r2 = -1.38629436f * (log2_near_one(m) + (float)e);  /* −2 ln u = −2 ln2 · log2 u */
    return sqrtf(r2 > 0.0f ? r2 : 0.0f);
}

/* (cos, sin)(2π·u) for u = b·2^-24, b a 24-bit integer: quadrant from the top two bits, polynomials on
 * [0, π/2) (abs. error < 2e-7). */
static inline void bm_angle(uint32_t b, float* cs, float* sn) {
    uint32_t q = b >> 22;
    float x = (float)(b & 0x3fffffU) * (1.57079633f / 4194304.0f), x2 = x * x;
    float s = x * (1.0f + x2 * (-1.6666667e-1f + x2 * (8.3333333e-3f + x2 * (-1.9841270e-4f + x2 * 2.7557319e-6f))));
    float c = 1.0f + x2 * (-0.5f + x2 * (4.1666667e-2f + x2 * (-1.3888889e-3f + x2 * (2.4801587e-5f - x2 * 2.7557319e-7f))));
    *cs = q == 0 ? c : q == 1 ? -s : q == 2 ? -c : s;
    *sn = q == 0 ? s : q == 1 ? c : q == 2 ? -s : -c;
}

/* Groups of four normals made per block: the Philox rounds run over a block's counters as one
 * structure-of-arrays loop (16 lanes: one AVX-512 or two AVX2 vectors per word), so they vectorise;
 * a loop over groups that keeps each counter's four words together does not. */
#define BLOCK 16

/* The normals of tile t, row n (stream 0) into z, for O outputs rounded up to a multiple of 4·BLOCK
 * (z must hold that many). */
static void normals(float* restrict z, int64_t O, uint32_t n, uint32_t t, uint32_t k0, uint32_t k1) {
    int64_t groups = (O + 3) / 4;
    for (int64_t g0 = 0; g0 < groups; g0 += BLOCK) {
        uint32_t w0[BLOCK], w1[BLOCK], w2[BLOCK], w3[BLOCK];
        for (int i = 0; i < BLOCK; i++) { w0[i] = (uint32_t)(g0 + i); w1[i] = n; w2[i] = t; w3[i] = 0U; }
        uint32_t a0 = k0, a1 = k1;
        for (int r = 0; r < 10; r++) {
            if (r) { a0 += PHILOX_W0; a1 += PHILOX_W1; }
            #pragma omp simd
            for (int i = 0; i < BLOCK; i++) {
                uint64_t p0 = (uint64_t)PHILOX_M0 * w0[i], p1 = (uint64_t)PHILOX_M1 * w2[i];
                uint32_t n0 = (uint32_t)(p1 >> 32) ^ w1[i] ^ a0, n2 = (uint32_t)(p0 >> 32) ^ w3[i] ^ a1;
                w0[i] = n0; w1[i] = (uint32_t)p1; w2[i] = n2; w3[i] = (uint32_t)p0;
            }
        }
        float r0[BLOCK], c0[BLOCK], s0[BLOCK], r1[BLOCK], c1[BLOCK], s1[BLOCK];
        #pragma omp simd
        for (int i = 0; i < BLOCK; i++) {
            r0[i] = bm_radius((float)((w0[i] >> 8) + 1U) * (1.0f / 16777216.0f));
            r1[i] = bm_radius((float)((w2[i] >> 8) + 1U) * (1.0f / 16777216.0f));
            bm_angle(w1[i] >> 8, &c0[i], &s0[i]);
            bm_angle(w3[i] >> 8, &c1[i], &s1[i]);
        }
        float* zb = z + 4 * g0;
        for (int i = 0; i < BLOCK; i++) {
            zb[4 * i] = r0[i] * c0[i];
            zb[4 * i + 1] = r0[i] * s0[i];
            zb[4 * i + 2] = r1[i] * c1[i];
            zb[4 * i + 3] = r1[i] * s1[i];
        }
    }
}

/* The normals of tile t, rows 0..N-1, outputs 0..O-1 under key (for tests). */
void analogllm_normals(float* out, int64_t T, int64_t N, int64_t O, uint64_t key) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    int64_t padded = (O + 4 * BLOCK - 1) / (4 * BLOCK) * (4 * BLOCK);
    float* z = (float*)malloc(sizeof(float) * (size_t)padded);
    if (!z) return;
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++) {
            normals(z, O, (uint32_t)n, (uint32_t)t, k0, k1);
            memcpy(out + (t * N + n) * O, z, sizeof(float) * (size_t)O);
        }
    free(z);
}

/* tanh(x) = sign(x)·(1 − e)/(1 + e), e = exp(−2|x|) = 2^(−2|x|·log2 e): integer part into the exponent
 * bits, fraction by a degree-6 polynomial of 2^f (rel. error < 2e-7). Vectorisable, unlike tanhf. */
static inline float tanh_poly(float x) {
    float a = fabsf(x) * -2.88539008f;  /* −2|x|·log2(e) */
    a = a < -126.0f ? -126.0f : a;
    float k = floorf(a), f = a - k;
    float p = 1.0f + f * (0.69314718f + f * (0.24022651f + f * (0.05550411f + f * (0.00961813f + f * (0.00133336f + f * 0.00015404f)))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    float e = p * scale;
    float th = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -th : th;
}

/* The IR-drop factor c(a) = (3/2)(1 − tanh(√a)/√a) of a column with load a (see ir_factor in
 * analogllm/ops/read.py): its Taylor series below a = 0.25 (where the closed form cancels), else the
 * closed form. Both branches are computed and one selected, so the loop stays vectorised. */
static inline float ir_factor(float a) {
    float series = a * (0.5f + a * (-0.2f + a * (0.080952381f + a * (-0.032804233f + a * 0.013294853f))));
    float s = sqrtf(a > 0.25f ? a : 0.25f);
    float closed = 1.5f * (1.0f - tanh_poly(s) / s);
    return a < 0.25f ? series : closed;
}

/* One row of one tile. The flags are compile-time constants at every call site below, so each
 * combination becomes its own branch-free vectorised loop. `resid`, when written, is the derivative of
 * the ADC output (in units of the step × code) with respect to the ADC range: sign(v) where v
 * saturated, (Q − v)/bound inside (the LSQ estimate), for learned ADC ranges. */
static inline __attribute__((always_inline)) int64_t tile_row(
        const float* restrict yr, float* restrict acc, const float* restrict sc, const float* restrict rvt,
        const float* restrict z, void* restrict gr, float* restrict rr, const float* restrict cr,
        const float* restrict ydr, const float* restrict ag, const float* restrict ao, int64_t O, float un,
        float shot2, float c, float sat, float bound, float inv_step, float irk, const int ir, const int aerr,
        const int noise, const int saturate, const int adc, const int gate, const int resid) {
    int64_t clipped = 0;
    #pragma omp simd reduction(+:clipped)
    for (int64_t o = 0; o < O; o++) {
        float v = yr[o], g = 1.0f;
        if (ir) v -= ir_factor(irk * cr[o]) * ydr[o];
        if (noise) v += sqrtf(c + shot2 * fabsf(v) + un * rvt[o]) * z[o];
        if (saturate) {
            float th = tanh_poly(v / sat);
            g = 1.0f - th * th;
            v = sat * th;
        }
        if (aerr) v = v * ag[o] + ao[o];
        if (adc) {
            int outside = v < -bound || v > bound;
            clipped += outside;
            g = outside ? 0.0f : g;
            float code = rintf((v < -bound ? -bound : v > bound ? bound : v) * inv_step);
            if (resid) rr[o] = outside ? (v < 0.0f ? -1.0f : 1.0f) : (code / inv_step - v) / bound;
            v = code;
        }
        if (gate) {  /* the nonlinearity's derivative, or (ADC only) a mask of bytes */
            if (saturate) ((float*)gr)[o] = g;
            else ((uint8_t*)gr)[o] = g != 0.0f;
        }
        acc[o] += v * sc[o];
    }
    return clipped;
}

#define TILE_ROW(k) case (k): clipped += tile_row(yr, acc, sc, rvt, z, gr, rr, cr, ydr, ag, ao, O, un, shot2, c, \
                                                  sat, bt, it, irk, ((k) >> 6) & 1, ((k) >> 5) & 1, ((k) >> 4) & 1, \
                                                  ((k) >> 3) & 1, ((k) >> 2) & 1, ((k) >> 1) & 1, (k) & 1); break;
#define TILE_ROWS8(k) TILE_ROW(k) TILE_ROW(k + 1) TILE_ROW(k + 2) TILE_ROW(k + 3) TILE_ROW(k + 4) TILE_ROW(k + 5) \
                      TILE_ROW(k + 6) TILE_ROW(k + 7)

/* Returns the number of outputs the ADC clipped, or -1 when scratch rows could not be allocated.
 * rv == NULL means no read noise; bound == NULL no ADC; gate, when not NULL, receives the straight-
 * through gradient gate per tile output, (T, N, O): the nonlinearity's derivative times 1[inside the
 * ADC bound] as floats with a nonlinearity (sat > 0), else 1[inside] as bytes (bool); resid likewise the ADC-range derivative (see tile_row). cur == NULL means no IR drop, else
 * cur and yd (T, N, O) are the column loads and the position-weighted products of the IR drop, and irk
 * turns a load into a = ρ·rows·load; again == NULL means ideal ADCs, else again and aoff (T, O) are the
 * static gain and offset (normalised units) of every column's ADC. Rows are split over `threads`
 * OpenMP threads: torch's own team when torch is loaded (same libgomp), whose threads are still hot
 * from the matmul that produced y. */
int64_t analogllm_read(const float* y, float* out, int64_t T, int64_t N, int64_t O, int threads,
                       const float* usq, const float* rv, float shot2, float c, int noise, uint64_t key,
                       float sat, const float* bound, const float* inv_step, const float* scale, const float* bias,
                       void* gate, float* resid, const float* cur, const float* yd, float irk, const float* again,
                       const float* aoff) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    int64_t padded = (O + 4 * BLOCK - 1) / (4 * BLOCK) * (4 * BLOCK), clipped = 0;
    int mode = (cur && yd ? 64 : 0) | (again && aoff && bound ? 32 : 0) | (noise ? 16 : 0) | (sat > 0.0f ? 8 : 0)
               | (bound ? 4 : 0) | (gate ? 2 : 0) | (resid && bound ? 1 : 0);
    float* scratch = (float*)malloc(sizeof(float) * (size_t)padded * (size_t)threads);
    float* zeros = (float*)calloc((size_t)O, sizeof(float));
    if (!scratch || !zeros) { free(scratch); free(zeros); return -1; }
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:clipped)
    for (int64_t n = 0; n < N; n++) {
#ifdef _OPENMP
        float* z = scratch + (size_t)padded * (size_t)omp_get_thread_num();
#else
        float* z = scratch;
#endif
        float* acc = out + n * O;
        memset(acc, 0, sizeof(float) * (size_t)O);
        for (int64_t t = 0; t < T; t++) {
            const float* yr = y + (t * N + n) * O;
            const float* sc = scale + t * O;
            const float* rvt = rv ? rv + t * O : zeros;
            void* gr = gate ? (char*)gate + (size_t)((t * N + n) * O) * (sat > 0.0f ? sizeof(float) : 1) : NULL;
            float* rr = resid ? resid + (t * N + n) * O : NULL;
            const float* cr = cur ? cur + (t * N + n) * O : NULL;
            const float* ydr = yd ? yd + (t * N + n) * O : NULL;
            const float* ag = again ? again + t * O : NULL;
            const float* ao = aoff ? aoff + t * O : NULL;
            float un = usq ? usq[t * N + n] : 0.0f;
            float bt = bound ? bound[t] : 0.0f, it = bound ? inv_step[t] : 0.0f;
            if (noise) normals(z, O, (uint32_t)n, (uint32_t)t, k0, k1);
            switch (mode) {
                TILE_ROWS8(0) TILE_ROWS8(8) TILE_ROWS8(16) TILE_ROWS8(24) TILE_ROWS8(32) TILE_ROWS8(40)
                TILE_ROWS8(48) TILE_ROWS8(56) TILE_ROWS8(64) TILE_ROWS8(72) TILE_ROWS8(80) TILE_ROWS8(88)
                TILE_ROWS8(96) TILE_ROWS8(104) TILE_ROWS8(112) TILE_ROWS8(120)
            }
        }
        if (bias) {
            #pragma omp simd
            for (int64_t o = 0; o < O; o++) acc[o] += bias[o];
        }
    }
    free(scratch);
    free(zeros);
    return clipped;
}

/* One tile's inputs of one row through the DAC (see analogllm_dac); `bow` is a compile-time constant at
 * both call sites, so the linear DAC's loop is the same as before the INL was modelled. */
static inline __attribute__((always_inline)) float dac_row(const float* restrict xr, float* restrict ur,
                                                           int64_t lo, int64_t hi, float range, float step,
                                                           float inl, const int bow) {
    float sq = 0.0f;
    #pragma omp simd reduction(+:sq)
    for (int64_t i = lo; i < hi; i++) {
        float v = xr[i] / range;
        v = v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
        if (step > 0.0f) v = rintf(v / step) * step;
        if (bow) v += inl * v * (1.0f - v * v);
        ur[i] = v;
        sq += v * v;
    }
    return sq;
}

/* The DAC of a read: u = Q(clamp(x / r, ±1)) with Q rounding to multiples of `step` (none when step
 * is 0), then the level error inl·u(1 − u²) of a nonlinear DAC (inl 0: none), written zero-padded into
 * (N, T·rows) so that it views as T input tiles, and usq[t, n] = Σ u² over tile t's rows (what the
 * read-noise variance needs). r holds one range, or one per row. */
void analogllm_dac(const float* x, float* u, float* usq, int64_t N, int64_t in, int64_t T, int64_t rows,
                   const float* r, int r_per_row, float step, float inl, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float* xr = x + n * in;
        float* ur = u + n * T * rows;
        float range = r[r_per_row ? n : 0];
        for (int64_t t = 0; t < T; t++) {
            int64_t lo = t * rows, hi = lo + rows < in ? lo + rows : in;
            float sq = inl != 0.0f ? dac_row(xr, ur, lo, hi, range, step, inl, 1)
                                   : dac_row(xr, ur, lo, hi, range, step, 0.0f, 0);
            for (int64_t i = hi; i < lo + rows; i++) ur[i] = 0.0f;
            if (usq) usq[t * N + n] = sq;
        }
    }
}

/* One tile's inputs of one row through the DAC's backward (see analogllm_dac_backward). The flags are
 * compile-time constants at the call site, so each combination is its own vectorised loop. */
static inline __attribute__((always_inline)) float dac_back_row(
        const float* restrict xr, const float* restrict gr, float* restrict gxr, float* restrict urr,
        int64_t lo, int64_t hi, float range, float step, float inl, float gscale,
        const int bow, const int want_x, const int want_r, const int want_u) {
    float dr = 0.0f, inv = 1.0f / range;
    #pragma omp simd reduction(+:dr)
    for (int64_t i = lo; i < hi; i++) {
        float v = xr[i] / range, g = gr[i - lo] * gscale;
        float inside = (v >= -1.0f && v <= 1.0f) ? 1.0f : 0.0f;
        float q = v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
        if (step > 0.0f) q = rintf(q / step) * step;
        if (bow) q += inl * q * (1.0f - q * q);
        if (want_x) gxr[i] = g * inside * inv;
        if (want_r) dr += g * (q - v * inside) * inv;
        if (want_u) urr[i] = q * range;
    }
    return dr;
}

#define DAC_BACK(k) case (k): dr += dac_back_row(xr, gr, gxr, urr, lo, hi, range, step, inl, gscale, \
                                                 ((k) >> 3) & 1, ((k) >> 2) & 1, ((k) >> 1) & 1, (k) & 1); break;

/* The DAC's part of a read's backward, in one pass over x (N, in) instead of about fifteen in torch:
 * with g = gscale · gu (the gradient reaching the DAC outputs) and u = Q(x/r) as analogllm_dac makes it,
 *     gx[n, i]  = g · 1[|x| ≤ r] / r                         the clipped straight-through gradient
 *     gr[n]     = Σ_i g · (u − (x/r) · 1[|x| ≤ r]) / r       the LSQ derivative of the range, per row
 *     ur[n, :]  = u · r, zero-padded into (N, T·rows)         the inputs the weights saw
 * each written only when its pointer is not NULL. gu is read at gu[t·ts + n·ns + k] for input
 * i = t·rows + k, so it may be dense (N, in) (ts = rows, ns = in) or tiled (T, N, rows) (ts = N·rows,
 * ns = rows), as the tile matmuls leave it. */
void analogllm_dac_backward(const float* x, const float* gu, int64_t ts, int64_t ns, float gscale, float* gx,
                            float* grr, float* ur, int64_t N, int64_t in, int64_t T, int64_t rows, const float* r,
                            int r_per_row, float step, float inl, int threads) {
    int mode = (inl != 0.0f ? 8 : 0) | (gx ? 4 : 0) | (grr ? 2 : 0) | (ur ? 1 : 0);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float* xr = x + n * in;
        float* gxr = gx ? gx + n * in : NULL;
        float* urr = ur ? ur + n * T * rows : NULL;
        float range = r[r_per_row ? n : 0], dr = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            int64_t lo = t * rows, hi = lo + rows < in ? lo + rows : in;
            const float* gr = gu + t * ts + n * ns;
            switch (mode) {
                DAC_BACK(0) DAC_BACK(1) DAC_BACK(2) DAC_BACK(3) DAC_BACK(4) DAC_BACK(5) DAC_BACK(6) DAC_BACK(7)
                DAC_BACK(8) DAC_BACK(9) DAC_BACK(10) DAC_BACK(11) DAC_BACK(12) DAC_BACK(13) DAC_BACK(14)
                DAC_BACK(15)
            }
            if (urr)
                for (int64_t i = hi; i < lo + rows; i++) urr[i] = 0.0f;
        }
        if (grr) grr[n] = dr;
    }
}

/* The per-column sums of a learned ADC range's derivative: out[t, o] = Σ_n g[n, o] · resid[t, n, o], for
 * the gradient g (N, O) of a read and its ADC derivative resid (T, N, O). In torch this is a product and
 * a sum over two (T, N, O) temporaries; here every thread owns a block of columns of one tile, so it
 * makes no temporary and needs no reduction across threads. */
#define ADC_COLS 64
void analogllm_adc_grad(const float* g, const float* resid, float* out, int64_t T, int64_t N, int64_t O,
                        int threads) {
    int64_t blocks = (O + ADC_COLS - 1) / ADC_COLS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t job = 0; job < T * blocks; job++) {
        int64_t t = job / blocks, lo = (job % blocks) * ADC_COLS, hi = lo + ADC_COLS < O ? lo + ADC_COLS : O;
        float acc[ADC_COLS] = {0.0f};
        for (int64_t n = 0; n < N; n++) {
            const float* gr = g + n * O;
            const float* rr = resid + (t * N + n) * O;
            #pragma omp simd
            for (int64_t o = lo; o < hi; o++) acc[o - lo] += gr[o] * rr[o];
        }
        for (int64_t o = lo; o < hi; o++) out[t * O + o] = acc[o - lo];
    }
}
