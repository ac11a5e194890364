// Paged attention on tensor cores (bf16; FlashAttention-2's scheme over the paged cache), for
// the same tiles, descriptors and splits as attention.cu (see its header for the inputs).
//
// A CTA (4 warps) takes one tile of one sequence for `heads_per_cta` query heads sharing one KV
// head: up to ROWS = 16 * MT * WARPS_M (token, head) rows, row r being token r / heads_per_cta of
// the tile and head r % heads_per_cta of the group. The context is read in chunks of CHUNK
// positions (64, or 32 for MT = 2), K and V of a chunk copied into shared memory by `cp.async`
// two chunks ahead of their use (zero-filled past the context, so masked positions never hold NaN). The warps
// form a WARPS_M x WARPS_N grid: warp (wm, wn) owns MT tiles of 16 rows from 16 MT wm on and
// positions CHUNK / WARPS_N * wn .. of every chunk, and keeps its own online-softmax state (max
// in log2 units, sum, output accumulators, all f32) for them:
//   S = Q K^T   mma.m16n8k16 (K by ldmatrix; Q fragments in registers for the whole launch when
//               MT = 1, else staged in shared memory and read by ldmatrix)
//   P = exp2(S * scale * log2 e - max), masked causally per row
//   O += P V    mma.m16n8k16 (P from S's accumulators as bf16; V by ldmatrix.trans)
// Each K and V fragment read from shared memory feeds MT row tiles, so MT = 2 halves the
// shared-memory reads per tensor-core instruction (FlashAttention-2's 128-row tiles) at the cost
// of registers and of tiles twice as tall (fewer CTAs).
// Prefill (WARPS_M = 4, MT = 1 or 2): each warp owns whole rows, so it finishes alone. Decode
// (WARPS_M = 1, MT = 1: one 16-row tile whose rows are the group's heads of one token;
// WARPS_N = 4): the four warps split each chunk and merge their states through shared memory at
// the end; with WARP_PIPE (the engine's decode kernel) each warp copies only its own KEYS
// positions of every chunk and waits for them with __syncwarp, not a barrier of the CTA, so the
// warps drift apart freely; PREFETCH adds an L2 prefetch hint to the copies. With gridDim.z > 1
// the result goes out as split partials (attention_common.cuh), merged by the last split.
//
// Invariants: blockDim.x == 128; D in {64, 128}; dynamic shared memory of
// smem_bytes<D, MT, ROWS>(); the cache's K/V rows 16-byte aligned (D * 2 bytes); q rows 16-byte
// aligned.
#include "attention_common.cuh"

namespace {
constexpr int MMA_THREADS = 128;
constexpr int DEFAULT_STAGES = 3;  // K/V chunks in shared memory by default: two in flight while one is used
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Row stride of a staged K/V row, in elements: 16 bytes of padding put the 8 rows of one
// ldmatrix in 8 different bank groups.
template <int D>
__host__ __device__ constexpr int row_stride() {
    return D + 8;
}

// Dynamic shared memory of a CTA: the K/V stages of CHUNK positions, and the queries when they
// are staged (MT > 1).
template <int D, int MT, int ROWS, int CHUNK, int NSTAGES = DEFAULT_STAGES>
__host__ __device__ constexpr int smem_bytes() {
    return (NSTAGES * 2 * CHUNK + (MT == 1 ? 0 : ROWS)) * row_stride<D>() * 2;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; `bytes` 0 writes zeros instead. PREFETCH 128 or
// 256 asks L2 to fetch that many bytes around the address (the rest of a cache row's block).
template <int PREFETCH = 0>
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
    if constexpr (PREFETCH == 256) {
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
                     : "memory");
    } else if constexpr (PREFETCH == 128) {
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
                     : "memory");
    } else {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a (16x16, row) * b (16x8, col), bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// exp2 that is 0 for -inf arguments (and for -inf - -inf, which only arises for rows that saw
// nothing yet).
__device__ __forceinline__ float exp2_or_zero(float x) { return x == -INFINITY || x != x ? 0.f : exp2f(x); }
}  // namespace

template <int D, int WARPS_M, int MT, int CHUNK, int STAGES = DEFAULT_STAGES, int PREFETCH = 0, bool WARP_PIPE = false>
__device__ void paged_attention_mma(__nv_bfloat16* __restrict__ out, float* __restrict__ part_acc,
                                    float* __restrict__ part_ml, const __nv_bfloat16* __restrict__ q, int q_stride,
                                    int out_stride, const __nv_bfloat16* __restrict__ k_cache,
                                    const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ tiles,
                                    const int* __restrict__ seqs, const int* __restrict__ tables, int kv_heads,
                                    int ratio, int heads_per_cta, int block_size, int chunks_per_split, float scale,
                                    unsigned int* __restrict__ counters) {
    constexpr int WARPS_N = 4 / WARPS_M;
    constexpr int WARP_ROWS = 16 * MT;       // rows per warp: MT tiles of 16
    constexpr int ROWS = WARP_ROWS * WARPS_M;
    constexpr int KEYS = CHUNK / WARPS_N;  // positions of a chunk per warp
    constexpr int NT = KEYS / 8;           // 8-position tiles of S per warp
    constexpr int DT = D / 8;              // 8-column tiles of O
    constexpr int KD = D / 16;             // 16-wide steps over the head dimension
    constexpr int STRIDE = row_stride<D>();
    constexpr int VECS = CHUNK * D / 8;    // 16-byte vectors of K (and of V) per chunk
    static_assert(VECS % MMA_THREADS == 0 && KEYS % 16 == 0 && D % 32 == 0, "tile shapes");
    static_assert(MT == 1 || WARPS_N == 1, "several row tiles per warp only where a warp owns whole rows");
    static_assert(!WARP_PIPE || WARPS_M == 1, "a warp loads only its own positions where it owns whole chunks' slices");
    static_assert(smem_bytes<D, MT, ROWS, CHUNK, STAGES>() <= 227 * 1024, "a CTA's shared memory fits a Hopper SM");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [STAGES][2][CHUNK][STRIDE]
    __nv_bfloat16* q_s = kv_s + STAGES * 2 * CHUNK * STRIDE;           // [ROWS][STRIDE], when MT > 1

    const TileWork work(tiles, seqs, tables, ratio, heads_per_cta);
    const int kv_head = work.kv_head, head0 = work.head0, split = work.split, splits = work.splits;
    const int first = work.first, count = work.count, query_start = work.query_start;
    const int pos0 = work.pos0, rows = work.rows;
    const int* table = work.table;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    const int g = lane / 4, t = lane % 4;

    const int span = pos0 + count;
    const int num_chunks = (span + CHUNK - 1) / CHUNK;
    const int chunk_begin = split * chunks_per_split;
    const int chunk_end = min(num_chunks, chunk_begin + chunks_per_split);

    // Copies chunk c into stage c % STAGES (every thread VECS / 128 vectors of K and of V). With
    // WARP_PIPE each warp copies only the KEYS positions it reads itself, so it waits for its own
    // copies alone (no barrier of the whole CTA per chunk).
    auto load_chunk = [&](int c) {
        __nv_bfloat16* ks = kv_s + (size_t)(c % STAGES) * 2 * CHUNK * STRIDE;
        __nv_bfloat16* vs = ks + CHUNK * STRIDE;
#pragma unroll
        for (int j = 0; j < VECS / MMA_THREADS; ++j) {
            const int i = WARP_PIPE ? lane + j * 32 : threadIdx.x + j * MMA_THREADS;
            const int p = (WARP_PIPE ? wn * KEYS : 0) + i / (D / 8), col = (i % (D / 8)) * 8;
            const int pos = c * CHUNK + p;
            size_t row = 0;
            int bytes = 0;
            if (pos < span) {
                row = ((size_t)table[pos / block_size] * kv_heads + kv_head) * block_size + pos % block_size;
                bytes = 16;
            }
            cp_async16<PREFETCH>(smem_addr(ks + p * STRIDE + col), k_cache + row * D + col, bytes);
            cp_async16<PREFETCH>(smem_addr(vs + p * STRIDE + col), v_cache + row * D + col, bytes);
        }
    };
    // The pipeline's first chunks (a group is committed per chunk, empty or not, so that
    // wait_group counts chunks).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (chunk_begin + s < chunk_end) load_chunk(chunk_begin + s);
        cp_async_commit();
    }

    // Row r's query: head r % heads_per_cta of the tile's token r / heads_per_cta.
    auto q_row = [&](int r) -> const __nv_bfloat16* {
        return q + (size_t)(query_start + first + r / heads_per_cta) * q_stride + (head0 + r % heads_per_cta) * D;
    };
    // This thread's rows (g and g + 8 of each of the warp's 16-row tiles) and their positions.
    int r_lo[MT], r_hi[MT], pos_lo[MT], pos_hi[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        r_lo[mt] = wm * WARP_ROWS + mt * 16 + g;
        r_hi[mt] = r_lo[mt] + 8;
        pos_lo[mt] = r_lo[mt] < rows ? pos0 + r_lo[mt] / heads_per_cta : -1;
        pos_hi[mt] = r_hi[mt] < rows ? pos0 + r_hi[mt] / heads_per_cta : -1;
    }
    // The position of the warp's last real row (-1 without any): the same for the whole warp.
    const int warp_last_pos =
        wm * WARP_ROWS < rows ? pos0 + (min(wm * WARP_ROWS + WARP_ROWS - 1, rows - 1)) / heads_per_cta : -1;
    // Queries: one tile's fragments in registers for the whole launch (MT = 1), or all rows
    // staged in shared memory (zeros past the tile's rows; visible after the loop's first
    // barrier) and read by ldmatrix per chunk.
    uint32_t qa[MT == 1 ? KD : 1][4];
    if constexpr (MT == 1) {
        const __nv_bfloat16* q_lo = r_lo[0] < rows ? q_row(r_lo[0]) : nullptr;
        const __nv_bfloat16* q_hi = r_hi[0] < rows ? q_row(r_hi[0]) : nullptr;
        auto word = [](const __nv_bfloat16* row, int col) -> uint32_t {
            return row ? *reinterpret_cast<const uint32_t*>(row + col) : 0u;
        };
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            qa[kd][0] = word(q_lo, kd * 16 + 2 * t);
            qa[kd][1] = word(q_hi, kd * 16 + 2 * t);
            qa[kd][2] = word(q_lo, kd * 16 + 8 + 2 * t);
            qa[kd][3] = word(q_hi, kd * 16 + 8 + 2 * t);
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * (D / 8); i += MMA_THREADS) {
            const int r = i / (D / 8), col = (i % (D / 8)) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < rows) v = *reinterpret_cast<const uint4*>(q_row(r) + col);
            *reinterpret_cast<uint4*>(q_s + r * STRIDE + col) = v;
        }
    }

    const float scale_log2 = scale * LOG2E;
    float m_lo[MT], m_hi[MT], l_lo[MT], l_hi[MT];
    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_lo[mt] = m_hi[mt] = -INFINITY;
        l_lo[mt] = l_hi[mt] = 0.f;
#pragma unroll
        for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    }

    // ldmatrix addresses within a stage: K as B of S (x4: one 8-position tile, 32 dims), V as B
    // of O (x4.trans: 16 positions, two 8-column tiles), Q as A of S (x4: 16 rows, 16 dims).
    const int ld_row = lane % 8, ld_mat = lane / 8;
    const int k_off = (wn * KEYS + ld_row) * STRIDE + ld_mat * 8;
    const int v_off = (wn * KEYS + (ld_mat % 2) * 8 + ld_row) * STRIDE + (ld_mat / 2) * 8;
    const uint32_t q_base = smem_addr(q_s + (wm * WARP_ROWS + (ld_mat % 2) * 8 + ld_row) * STRIDE + (ld_mat / 2) * 8);

    for (int c = chunk_begin; c < chunk_end; ++c) {
        cp_async_wait<STAGES - 2>();
        // Chunk c landed for every thread (of the warp, with WARP_PIPE); chunk c - 1's stage is free.
        if constexpr (WARP_PIPE) {
            __syncwarp();
        } else {
            __syncthreads();
        }
        if (c + STAGES - 1 < chunk_end) load_chunk(c + STAGES - 1);
        cp_async_commit();

        const __nv_bfloat16* ks = kv_s + (size_t)(c % STAGES) * 2 * CHUNK * STRIDE;
        const uint32_t k_base = smem_addr(ks + k_off), v_base = smem_addr(ks + CHUNK * STRIDE + v_off);
        const int key0 = c * CHUNK + wn * KEYS;  // position of this warp's first key
        if (key0 > warp_last_pos) continue;  // nothing of this warp's slice is visible to its rows

        // S = Q K^T: two 16-wide steps over the head dimension per K load, each K fragment used
        // for every row tile of the warp.
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kd = 0; kd < KD; kd += 2) {
            uint32_t a[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if constexpr (MT == 1) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) a[mt][h][e] = qa[kd + h][e];
                    } else {
                        ldmatrix_x4(a[mt][h], q_base + (mt * 16 * STRIDE + (kd + h) * 16) * 2);
                    }
                }
            }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                uint32_t b[4];
                ldmatrix_x4(b, k_base + (n * 8 * STRIDE + kd * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(s[mt][n], a[mt][0], b[0], b[1]);
                    mma_bf16(s[mt][n], a[mt][1], b[2], b[3]);
                }
            }
        }

        // Per row tile: scale, mask, the rows' new maxima, rescaled sums and outputs, and P in
        // bf16 as the A operand of P V (one 16-position step per pair of S tiles).
        uint32_t pa[MT][NT / 2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = key0 + n * 8 + 2 * t + e;
                    s[mt][n][e] = kp <= pos_lo[mt] ? s[mt][n][e] * scale_log2 : -INFINITY;
                    s[mt][n][2 + e] = kp <= pos_hi[mt] ? s[mt][n][2 + e] * scale_log2 : -INFINITY;
                    mx_lo = fmaxf(mx_lo, s[mt][n][e]);
                    mx_hi = fmaxf(mx_hi, s[mt][n][2 + e]);
                }
            }
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
                mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
            }
            const float new_lo = fmaxf(m_lo[mt], mx_lo), new_hi = fmaxf(m_hi[mt], mx_hi);
            const float corr_lo = exp2_or_zero(m_lo[mt] - new_lo), corr_hi = exp2_or_zero(m_hi[mt] - new_hi);
            m_lo[mt] = new_lo;
            m_hi[mt] = new_hi;
            l_lo[mt] *= corr_lo;
            l_hi[mt] *= corr_hi;
#pragma unroll
            for (int i = 0; i < DT; ++i) {
                o[mt][i][0] *= corr_lo;
                o[mt][i][1] *= corr_lo;
                o[mt][i][2] *= corr_hi;
                o[mt][i][3] *= corr_hi;
            }
#pragma unroll
            for (int kk = 0; kk < NT / 2; ++kk) {
                float p[2][4];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = 2 * kk + h;
                    p[h][0] = exp2_or_zero(s[mt][n][0] - new_lo);
                    p[h][1] = exp2_or_zero(s[mt][n][1] - new_lo);
                    p[h][2] = exp2_or_zero(s[mt][n][2] - new_hi);
                    p[h][3] = exp2_or_zero(s[mt][n][3] - new_hi);
                    l_lo[mt] += p[h][0] + p[h][1];
                    l_hi[mt] += p[h][2] + p[h][3];
                }
                pa[mt][kk][0] = pack_bf16(p[0][0], p[0][1]);
                pa[mt][kk][1] = pack_bf16(p[0][2], p[0][3]);
                pa[mt][kk][2] = pack_bf16(p[1][0], p[1][1]);
                pa[mt][kk][3] = pack_bf16(p[1][2], p[1][3]);
            }
        }
        // O += P V: each V fragment used for every row tile of the warp.
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
#pragma unroll
            for (int i = 0; i < DT; i += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, v_base + (kk * 16 * STRIDE + i * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(o[mt][i], pa[mt][kk], b[0], b[1]);
                    mma_bf16(o[mt][i + 1], pa[mt][kk], b[2], b[3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // Row sums over the quad that shares each row.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            l_lo[mt] += __shfl_xor_sync(0xffffffffu, l_lo[mt], off);
            l_hi[mt] += __shfl_xor_sync(0xffffffffu, l_hi[mt], off);
        }
    }

    const size_t slot0 = ((size_t)(blockIdx.x * gridDim.y + blockIdx.y) * splits + split) * ROWS;
    // Writes row r's final state (max in log2 units): the output, or the split's partial.
    auto emit = [&](int r, float m, float l, int col, float v0, float v1) {
        if (r >= rows) return;
        if (splits == 1) {
            const int token = query_start + first + r / heads_per_cta, head = head0 + r % heads_per_cta;
            const float inv = 1.f / l;
            *reinterpret_cast<__nv_bfloat162*>(out + (size_t)token * out_stride + head * D + col) =
                __floats2bfloat162_rn(v0 * inv, v1 * inv);
        } else {
            const size_t slot = slot0 + r;
            *reinterpret_cast<float2*>(part_acc + slot * D + col) = make_float2(v0, v1);
            if (col == 0) {
                part_ml[slot * 2] = m == -INFINITY ? -INFINITY : m * LN2;
                part_ml[slot * 2 + 1] = l;
            }
        }
    };

    if constexpr (WARPS_N == 1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int i = 0; i < DT; ++i) {
                emit(r_lo[mt], m_lo[mt], l_lo[mt], i * 8 + 2 * t, o[mt][i][0], o[mt][i][1]);
                emit(r_hi[mt], m_hi[mt], l_hi[mt], i * 8 + 2 * t, o[mt][i][2], o[mt][i][3]);
            }
        }
    } else {
        // Merge the warps' states through shared memory (the stages are free once every warp is
        // past its last chunk).
        constexpr int OS = D + 4;
        float* o_s = reinterpret_cast<float*>(smem_raw);  // [WARPS_N][16][OS]
        float* ml_s = o_s + WARPS_N * 16 * OS;            // [WARPS_N][16][2]
        __syncthreads();
#pragma unroll
        for (int i = 0; i < DT; ++i) {
            *reinterpret_cast<float2*>(o_s + (wn * 16 + g) * OS + i * 8 + 2 * t) = make_float2(o[0][i][0], o[0][i][1]);
            *reinterpret_cast<float2*>(o_s + (wn * 16 + g + 8) * OS + i * 8 + 2 * t) =
                make_float2(o[0][i][2], o[0][i][3]);
        }
        if (t == 0) {
            ml_s[(wn * 16 + g) * 2] = m_lo[0];
            ml_s[(wn * 16 + g) * 2 + 1] = l_lo[0];
            ml_s[(wn * 16 + g + 8) * 2] = m_hi[0];
            ml_s[(wn * 16 + g + 8) * 2 + 1] = l_hi[0];
        }
        __syncthreads();
        // Thread: row threadIdx.x / 8, columns 2 (threadIdx.x % 8) + 16 j.
        const int r = threadIdx.x / 8;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS_N; ++w) m = fmaxf(m, ml_s[(w * 16 + r) * 2]);
        float wt[WARPS_N], l = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS_N; ++w) {
            wt[w] = exp2_or_zero(ml_s[(w * 16 + r) * 2] - m);
            l += wt[w] * ml_s[(w * 16 + r) * 2 + 1];
        }
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
            const int col = 2 * (threadIdx.x % 8) + 16 * j;
            float v0 = 0.f, v1 = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS_N; ++w) {
                const float2 x = *reinterpret_cast<const float2*>(o_s + (w * 16 + r) * OS + col);
                v0 += wt[w] * x.x;
                v1 += wt[w] * x.y;
            }
            emit(r, m, l, col, v0, v1);
        }
    }
    merge_if_last<__nv_bfloat16, D, ROWS>(out, part_acc, part_ml, out_stride, tiles, seqs, ratio, heads_per_cta,
                                          counters);
}

// paged_attention_mma_<prefill|prefill_wide|decode[_l2|_warp]>_bf16_d<D>[_combine]; a launch takes
// smem_bytes<D, MT, ROWS, CHUNK>() of dynamic shared memory (attention.rs mirrors the chunk, the
// stages, the staged queries and the row padding). The decode variants (`DecodeKernel` in
// attention/mod.rs) differ only in how K/V are copied: `_l2` asks L2 for 256 bytes around each
// copy, `_warp` (the default) does too and each warp copies and waits for its own positions,
// `_warp2` the same with two stages instead of three.
#define LUMEN_ATTENTION_MMA(NAME, D, WARPS_M, MT, CHUNK, STAGES, PREFETCH, WARP_PIPE)                            \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                                    \
        NAME(__nv_bfloat16* out, float* part_acc, float* part_ml, const __nv_bfloat16* q, int q_stride,          \
             int out_stride, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache, const int* tiles,       \
             const int* seqs, const int* tables, int kv_heads, int ratio, int heads_per_cta, int block_size,     \
             int chunks_per_split, float scale, unsigned int* counters) {                                       \
        await_previous_kernel();                                                                                 \
        paged_attention_mma<D, WARPS_M, MT, CHUNK, STAGES, PREFETCH, WARP_PIPE>(                                 \
            out, part_acc, part_ml, q, q_stride, out_stride, k_cache, v_cache, tiles, seqs, tables, kv_heads,    \
            ratio, heads_per_cta, block_size, chunks_per_split, scale, counters);                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                                    \
        NAME##_combine(__nv_bfloat16* out, const float* part_acc, const float* part_ml, int out_stride,          \
                       const int* tiles, const int* seqs, int ratio, int heads_per_cta, int splits) {            \
        await_previous_kernel();                                                                                 \
        combine_tile<__nv_bfloat16, D, 16 * WARPS_M * MT>(out, part_acc, part_ml, out_stride, tiles, seqs, ratio, \
                                                          heads_per_cta, splits);                                \
    }

// Tall prefill tiles read chunks of 32 positions: S of two row tiles over 64 positions would not
// fit the registers beside the output accumulators (it spilled at head size 128).
LUMEN_ATTENTION_MMA(paged_attention_mma_prefill_bf16_d64, 64, 4, 1, 64, DEFAULT_STAGES, 0, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_prefill_bf16_d128, 128, 4, 1, 64, DEFAULT_STAGES, 0, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_prefill_wide_bf16_d64, 64, 4, 2, 32, DEFAULT_STAGES, 0, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_prefill_wide_bf16_d128, 128, 4, 2, 32, DEFAULT_STAGES, 0, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_bf16_d64, 64, 1, 1, 64, DEFAULT_STAGES, 0, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_bf16_d128, 128, 1, 1, 64, DEFAULT_STAGES, 0, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_l2_bf16_d64, 64, 1, 1, 64, DEFAULT_STAGES, 256, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_l2_bf16_d128, 128, 1, 1, 64, DEFAULT_STAGES, 256, false)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_warp_bf16_d64, 64, 1, 1, 64, DEFAULT_STAGES, 256, true)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_warp_bf16_d128, 128, 1, 1, 64, DEFAULT_STAGES, 256, true)
// Two stages: smaller CTAs, three per Hopper multiprocessor (`warp2`).
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_warp2_bf16_d64, 64, 1, 1, 64, 2, 256, true)
LUMEN_ATTENTION_MMA(paged_attention_mma_decode_warp2_bf16_d128, 128, 1, 1, 64, 2, 256, true)
