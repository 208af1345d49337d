// Launchers of the hand-written CUDA kernels (norm_kernels.cu,
// attention_kernels.cu, tiled_attention_kernels.cu, lora_kernels.cu).
// Plain C++: no CUDA or ATen types, so that the .cu files need nothing but
// the CUDA runtime and the callers need no CUDA headers. Internal to core/model; only
// the CUDA build compiles the implementation.
#ifndef LORAHUB_CORE_MODEL_FUSED_KERNELS_H_
#define LORAHUB_CORE_MODEL_FUSED_KERNELS_H_

#include <cstdint>

namespace lorahub::model::kernels {

enum class DType { kNone = -1, kFloat = 0, kBFloat16 = 1, kHalf = 2, kInt8 = 3 };

// RMS norm of each of `rows` rows of `dim` fp32 values:
// full = weight * (x * rsqrt(mean(x^2) + eps)) in fp32, and, unless
// rounded_dtype is kNone, the same rounded to rounded_dtype into `rounded`.
// All pointers are device memory, contiguous; `stream` is a cudaStream_t.
// Returns the cudaError_t of the launch (0 = success).
int LaunchRmsNorm(const float* x, const void* weight, DType weight_dtype,
                  float* full, void* rounded, DType rounded_dtype,
                  int64_t rows, int64_t dim, float eps, void* stream);

// The sublayer output a residual norm adds (LaunchAddRmsNorm,
// AddNormShrinkArgs): `p` holds the norm's elements in `dtype`, or, with
// parts > 1, `parts` fp32 partial products of a split-K GEMM, part_stride
// elements apart, whose sum (in order, fp32) rounded to `dtype` is the
// output (fused_ops.h SplitKProject).
constexpr int kMaxNormDeltaParts = 4;
struct NormDelta {
  const void* p = nullptr;
  DType dtype = DType::kNone;
  int parts = 1;  // 1 .. kMaxNormDeltaParts
  int64_t part_stride = 0;
};

// The residual update and the RMS norm of the next sublayer in one pass:
// sum = x + delta (delta widened to fp32: the fp32 add of `x + delta` in
// ATen), then LaunchRmsNorm's outputs for `sum`. `sum` may not alias x or
// delta. Same conventions as LaunchRmsNorm, except that `full` may be null
// where `rounded` is not (the rounded output alone).
int LaunchAddRmsNorm(const float* x, const NormDelta& delta, float* sum,
                     const void* weight, DType weight_dtype, float* full,
                     void* rounded, DType rounded_dtype, int64_t rows,
                     int64_t dim, float eps, void* stream);

// out[r, c] = gelu_tanh(gate[r, c]) * up[r, c] for `rows` rows of `dim`
// values, all of one dtype (row strides in elements; unit column stride;
// out contiguous). As ATen computes at::gelu(gate, "tanh") * up: the GELU
// in fp32 rounded to the dtype, then the product in fp32 rounded.
int LaunchGatedGeluTanh(const void* gate, int64_t gate_row_stride,
                        const void* up, int64_t up_row_stride, void* out,
                        DType dtype, int64_t rows, int64_t dim, void* stream);

// softmax(q k^T + bias) v (no 1/sqrt(d) scaling) for short queries: one
// thread block per (row, head, query), scores and softmax in fp32 in shared
// memory. q [B, H, T, D] of q_dtype, k [B, H, S, D] and v [B, H, S, Dv] of
// qkv_dtype and bias [B, H, T, S] of bias_dtype (kFloat or kBFloat16) with
// any element strides (0 for broadcast dimensions); out: a contiguous
// [B, T, H, Dv] of out_dtype (heads last: the output projection's input
// layout), each value rounded once from fp32. Returns cudaErrorInvalidValue
// for shapes it does not take (D or Dv > 256, S > 8192).
// Keys and values with unit element stride, 16-byte aligned rows and
// D == Dv a power-of-two number of 16-byte vectors (64 fp32 or bf16: T5's
// heads) take a vectorized kernel (several keys per warp, 16-byte loads):
// by default the split-key one (the keys over 4 warps, each with an online
// softmax, merged once), else `variant` picks the earlier ones (A/B); the
// same arithmetic up to the order of the fp32 sums.
enum class AttentionVariant {
  kScalar,     // one key per warp (SmallAttentionKernel)
  kVector,     // several keys per warp, 256 threads, two passes
  kSplitKeys,  // kVector's loads, keys split over warps, one pass
};
struct AttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;
  DType q_dtype = DType::kNone;  // kNone: qkv_dtype
  DType qkv_dtype = DType::kNone;
  DType bias_dtype = DType::kNone;
  DType out_dtype = DType::kNone;  // kNone: qkv_dtype
  AttentionVariant variant = AttentionVariant::kSplitKeys;
  int64_t B = 0, H = 0, T = 0, S = 0, D = 0, Dv = 0;
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t bias_stride[4] = {0, 0, 0, 0};
  // Optional, LaunchTiledAttention's self-attention only (T == S): rows
  // packed end to end (t5_forward.h EncodePacked). Row b's positions are
  // the tokens seq_starts[b] .. seq_starts[b + 1] - 1 (device int32 [B + 1])
  // along the token dimension (stride[2]) of q, k and v, whose stride[0] is
  // then unused; T and S are the longest row's length; each row attends
  // over its own tokens only (positions t, j of the row index the bias),
  // and the output is [tokens, H, Dv].
  const int32_t* seq_starts = nullptr;
  // With seq_starts: the rows' tokens in all (N), which the launcher reads
  // to shape its blocks (0: unknown).
  int64_t packed_tokens = 0;
  // Optional, LaunchDecodeStepAttention without a store only (the other
  // launchers refuse it): the keys and values of rows packed end to end. Row
  // b's key j is token key_starts[b] + j (device int32 [B]) along the token
  // dimension (stride[2]) of k and v, whose stride[0] is then unused; the
  // caller keeps every row's first S tokens inside k and v.
  const int32_t* key_starts = nullptr;
};
int LaunchSmallAttention(const AttentionArgs& args, void* stream);

// The per-row LoRA expand of one attention input (q, or a new value) done by
// the decode-step attention kernel as it loads that input:
//   x[b, h, d] += s_b * sum_c xa[b, c] * w[slot_b, h * D + d, c],  c < r,
// s_b = scale[slot_b] * (mask ? mask[b] : 1), slot_b = slots[b] (the
// DecodeStepArgs'). xa: fp32, this site's ranks of row b at
// xa + b * xa_row_stride; w: bf16 [S, H * D, r] with unit stride along r,
// r a multiple of 8, or int8 (w_dtype kInt8: the step factors of lora.h
// SiteBank::b_int8, whose quantization scale `scale` carries), r a multiple
// of 16; 16-byte aligned xa and w rows (the launcher checks).
// The arithmetic of LaunchLoraExpand: fp32 sums of the same products, in the
// same order, added as y + s * sum.
struct AttentionRowLora {
  const float* xa = nullptr;  // null: no delta
  int64_t xa_row_stride = 0;
  const void* w = nullptr;  // bf16, or int8
  DType w_dtype = DType::kBFloat16;
  int64_t w_stride[2] = {0, 0};  // slot, output
  int64_t r = 0;
  const float* scale = nullptr;
  int64_t scale_stride = 0;
};

// One decode step's attention (T == 1) with work folded in that would
// otherwise be kernels of their own: the per-row LoRA expand of q and, for
// a self-attention step, storing the new key and value in the cache.
// `attn`: as for LaunchSmallAttention, T == 1, keys and values as the
// split-key kernel takes them (16-byte rows, D == Dv of 64 fp32 or bf16
// elements per 16 lanes / 8 lanes: the kernel's T5-sized heads), q fp32 of
// unit stride along D. With k_new set (a self-attention step), attn.k and
// attn.v are the cache [B, H, C, D] this kernel writes: the new key and
// value (fp32 [B, H, D] at k_new / v_new with element strides
// kv_new_stride (b, h), unit along D; v_new plus v_lora's delta) are stored
// at position t[b * t_stride] (device int64: one position for all rows with
// t_stride 0, a row's own with 1) rounded to the cache's dtype, and the keys
// attended are 0..t; the bias must mask keys after t (causal), which are
// not read. Without k_new, the keys are those LaunchSmallAttention would
// attend. Returns cudaErrorInvalidValue, having launched nothing, for
// arguments it does not take.
inline constexpr int kMaxStepParts = 2;
struct DecodeStepArgs {
  AttentionRowLora q_lora;
  AttentionRowLora v_lora;
  const int64_t* slots = nullptr;  // needed with a delta
  const float* mask = nullptr;  // null: every row adapted
  int64_t mask_stride = 0;
  const float* k_new = nullptr;  // null: no store
  const float* v_new = nullptr;
  int64_t kv_new_stride[2] = {0, 0};
  const int64_t* t = nullptr;
  int64_t t_stride = 0;
  // q (the attention's), k_new and v_new as fp32 partials summed in order
  // p = 0 .. parts - 1 (parts <= kMaxStepParts), partial p at p *
  // part_stride elements (16-byte aligned) from each: a split-K
  // projection's (fused_ops.h SplitKProject). With a store (k_new), for an
  // fp32 cache, or a bf16 one through the staged self step (stage_self).
  int parts = 1;
  int64_t part_stride = 0;
  // Optional, with AttentionArgs::key_starts (a cross-attention step): row
  // b's visible keys are its first key_lens[b] (device int32 [B]), on which
  // the bias is zero (it is not read), the others masked; a row of -1 (or
  // 0) reads the bias and scans it for its end instead. Then the keys and
  // values go through shared memory, loaded before q and the LoRA sum are
  // formed (StagedStepAttentionKernel); the sums are the same.
  const int32_t* key_lens = nullptr;
  // A self-attention step (k_new) of an fp32 or bf16 cache with an fp32
  // bias: the keys and values before t go through shared memory the same
  // way.
  bool stage_self = false;
  // Set by LaunchDecodeStepAttention, not by callers: the per-row LoRA sums
  // through the loop of earlier builds (LORAHUB_ROW_LORA_LOOP=1, an A/B
  // switch; the same sums).
  bool row_lora_loop = false;
};
int LaunchDecodeStepAttention(const AttentionArgs& attn,
                              const DecodeStepArgs& step, void* stream);

// Longer queries (T >= kTiledQueryMin; the encoder, T = S): one block per
// (b, h, tile of queries) with the head's keys and values in shared memory
// as fp32 (TiledAttentionFits: up to kTiledMaxShared, above the default
// 48 KB by opt-in; S up to 256 keys for 64-wide heads; D a multiple of 4
// with D / 4 dividing 32). Same arguments and result as
// LaunchSmallAttention (q of any stride; k and v of one dtype with any
// strides); cudaErrorInvalidValue for shapes that do not fit.
inline constexpr int64_t kTiledQueryMin = 33;
inline constexpr int64_t kTiledMaxShared = 200 * 1024;
inline constexpr int64_t kTiledMaxKeys = 256;
inline constexpr int64_t kTiledWarps = 8;
inline constexpr int64_t kTiledQueriesPerWarp = 4;  // at a time
constexpr int64_t TiledAttentionShared(int64_t S, int64_t D) {
  // keys and values [S, D + 4] (rows 16-byte aligned, conflict-free across
  // rows), per warp its query rows [D] and their probabilities [S], fp32.
  return (2 * S * (D + 4) + kTiledWarps * kTiledQueriesPerWarp * (D + S)) * 4;
}
constexpr bool TiledAttentionFits(int64_t S, int64_t D, int64_t Dv) {
  return D == Dv && D > 0 && D % 4 == 0 && D <= 128 && 32 % (D / 4) == 0 &&
         S > 0 && S <= kTiledMaxKeys &&
         TiledAttentionShared(S, D) <= kTiledMaxShared;
}
// TiledAttentionFits, and the current device lets a block opt into that
// much shared memory (an H100/H200: 227 KB; other GPUs less).
bool TiledAttentionAvailable(int64_t S, int64_t D, int64_t Dv);
int LaunchTiledAttention(const AttentionArgs& args, void* stream);

// LaunchTiledAttention's first choice for launches of at least one block a
// multiprocessor (a population pass's encoder, a batch prefill;
// LORAHUB_MMA_ATTENTION=2: all, =0: none; read once): the same attention on
// the tensor cores (mma_attention.cuh), for 64-wide heads, 33 to 128
// keys, fp32 or bf16 keys and values (queries fp32 or of their dtype) of
// unit element stride and rows aligned to four elements, with out_dtype and
// q_dtype set. Its fp32 operands are split into TF32 pairs so that the
// products keep about 20 bits; the sums go in another order. Returns -1,
// having launched nothing, for the other shapes and with the switch off,
// else 0 or the cudaError_t.
int LaunchMmaAttention(const AttentionArgs& args, void* stream);
// fused_ops.h SetMmaAttentionModeForTesting's mode, or -1 (none set).
int MmaAttentionModeForTesting();

// Per-row LoRA of single-token rows (decode steps), as Punica's BGMV: every
// row b reads the factors of its own adapter slot slots[b] (device int64)
// straight from the bank, so no gather copies A or B per row.
//
// Shrink: out[b, c] = sum_i x[b, i] * a[slots[b], c, i] for c < R, fp32
// accumulation; x fp32 [B, in], a of a_dtype [S, R, in] (element strides),
// out a contiguous fp32 [B, R]. One warp per (row, c); in <= kMaxLoraIn.
inline constexpr int64_t kMaxLoraIn = 8192;   // x staged in shared memory
inline constexpr int64_t kMaxLoraRanks = 4096;  // xa staged in shared memory
struct LoraShrinkArgs {
  const float* x = nullptr;
  int64_t x_stride[2] = {0, 0};
  const void* a = nullptr;
  DType a_dtype = DType::kNone;
  int64_t a_stride[3] = {0, 0, 0};
  const int64_t* slots = nullptr;
  float* out = nullptr;
  int64_t B = 0, R = 0, in = 0;
};
int LaunchLoraShrink(const LoraShrinkArgs& args, void* stream);

// LaunchAddRmsNorm's pass over B rows of `in` values (shrink.B, shrink.in)
// and LaunchLoraShrink of its fp32 output `full` in one kernel (decode
// steps: the norm before an adapted projection; it was two kernels, the
// shrink waiting for the norm's output): every block recomputes its row's
// norm in shared memory and one block per row writes sum, full and
// rounded. The outputs are bit for bit the two launches' (shrink.x is not
// read). Without a delta (delta.p and sum null): LaunchRmsNorm's pass over
// x and the shrink of its output. Takes in <= 2048, a multiple of a 16-byte
// word of factors, factor rows 16-byte aligned with unit inner stride
// (AddRmsNormShrinkFits); returns cudaErrorInvalidValue otherwise.
struct AddNormShrinkArgs {
  const float* x = nullptr;  // the residual stream [B, in]
  NormDelta delta;           // p null: none (sum null too)
  float* sum = nullptr;
  const void* weight = nullptr;
  DType weight_dtype = DType::kNone;
  float* full = nullptr;
  void* rounded = nullptr;  // null with rounded_dtype kNone
  DType rounded_dtype = DType::kNone;
  float eps = 0.f;
  LoraShrinkArgs shrink;
};
// True when LaunchAddRmsNormShrink takes these arguments (the outputs
// sum, full, rounded and shrink.out aside).
bool AddRmsNormShrinkFits(const AddNormShrinkArgs& args);
int LaunchAddRmsNormShrink(const AddNormShrinkArgs& args, void* stream);

// Expand, for up to kMaxExpandSites sites in one launch: for every site k,
// y_k[b, o] += s_kb * sum_c xa[b, off_k + c] * w_k[slots[b], o, c] for
// o < out_k, c < r_k, where s_kb = scale_k[slots[b]] * (mask ? mask[b] : 1);
// xa fp32 [B, xa_cols] (the shrink's output: every site's ranks side by
// side), w_k of w_dtype [S, out_k, r_k], y_k fp32 [B, out_k] (a column slice
// of a wider output); element strides. One thread per (row, site, o);
// xa_cols <= kMaxLoraRanks.
inline constexpr int kMaxExpandSites = 4;
struct LoraExpandSite {
  const void* w = nullptr;
  int64_t w_stride[3] = {0, 0, 0};
  const float* scale = nullptr;
  int64_t scale_stride = 0;
  float* y = nullptr;
  int64_t y_stride[2] = {0, 0};
  int64_t out = 0, r = 0, rank_offset = 0;
};
struct LoraExpandArgs {
  const float* xa = nullptr;
  int64_t xa_stride[2] = {0, 0};
  int64_t xa_cols = 0;
  DType w_dtype = DType::kNone;
  const float* mask = nullptr;  // null: every row
  int64_t mask_stride = 0;
  const int64_t* slots = nullptr;
  int64_t B = 0;
  int num_sites = 0;
  LoraExpandSite sites[kMaxExpandSites];
};
int LaunchLoraExpand(const LoraExpandArgs& args, void* stream);

// out[g, m, n] = sum_k x[g, m, k] * w[g, n, k] in fp32 for G batches of an
// M x K by K x N product with few output columns (N: LoRA ranks): the
// down-projection x A^T of an objective's composed adapter (the engine
// passes G = 1). Why: cuBLAS ran these as a SIMT GEMM with split-K plus a
// reduction kernel, 6-8 us per call for 15-360 rows (73 calls per
// flan-t5-large evaluation). One block per (kNarrowRows rows, 32 columns,
// batch), or for at most kNarrowSmallMaxRows rows per (8 rows, 8 columns,
// batch), with the K range split over its warps, 16-byte loads, a
// fixed-order reduction: deterministic, differing from a GEMM only in the
// order of the fp32 sums. x, w: unit element stride along k, K a multiple
// of 4, 16-byte aligned rows; out contiguous [G, M, N]. Returns
// cudaErrorInvalidValue otherwise.
inline constexpr int kNarrowRows = 8;
inline constexpr int64_t kNarrowSmallMaxRows = 32;
struct NarrowGemmArgs {
  const float* x = nullptr;
  int64_t x_stride[2] = {0, 0};  // batch, row (elements)
  const float* w = nullptr;
  int64_t w_stride[2] = {0, 0};  // batch, row (elements)
  float* out = nullptr;
  int64_t G = 0, M = 0, N = 0, K = 0;
};
// True when LaunchNarrowGemm takes these arguments (out aside): the checks
// a caller makes before allocating `out`.
bool NarrowGemmFits(const NarrowGemmArgs& args);
int LaunchNarrowGemm(const NarrowGemmArgs& args, void* stream);

// The LoRA deltas of runs of rows per adapter slot (a CMA-ES population's
// candidates, a per-row prefill's prompts), fp32 (run_lora_kernels.cu): for
// slot s < slots and token m < M,
//   xa[s, m, :] = x[s, m, :] a[s]^T                    (a: [R, in] per slot)
//   y[s, m, site.col + o] += scale * sum_c xa[s, m, k r + c] b_k[s, o, c]
// for each site k < num_sites (o < out, c < r; R = num_sites * r): a shrink
// kernel writing xa into xa_buffer (contiguous [slots, M, R]), then one
// expand kernel for every site. With x == nullptr, xa is given (the expand
// alone). Deterministic; the products of the GEMMs it replaces, summed in
// another order. Strides in elements; unit stride along in (x, a), ranks
// (xa, b) and columns (y); 16-byte aligned rows. The shrink takes R = 8, 16
// or 32; r a multiple of 4 up to kRunLoraMaxRank. Returns
// cudaErrorInvalidValue for what it does not take (RunLoraFits), the
// launch's error otherwise.
inline constexpr int kRunLoraMaxSites = 4;
inline constexpr int kRunLoraMaxRank = 32;
struct RunLoraSite {
  const float* b = nullptr;  // slot 0's [out, r] (the run's first slot)
  int64_t col = 0;           // first output column in y
  // With run_slots: the site's scaling of each bank slot (fp32 [bank
  // slots]), in place of `scale`.
  const float* slot_scales = nullptr;
};
struct RunLoraArgs {
  const float* x = nullptr;  // slot 0's [M, in]; null: xa given
  int64_t x_stride[2] = {0, 0};  // slot, token
  const float* a = nullptr;  // slot 0's [R, in]
  int64_t a_stride[2] = {0, 0};  // slot, rank
  int64_t in = 0;
  const float* xa = nullptr;  // slot 0's [M, R] (x == nullptr only)
  int64_t xa_stride[2] = {0, 0};  // slot, token
  float* xa_buffer = nullptr;  // [slots, M, R], the shrink's output (x given)
  RunLoraSite sites[kRunLoraMaxSites];
  int num_sites = 0;
  int64_t b_stride[2] = {0, 0};  // slot, output (every site's b)
  int64_t r = 0, R = 0, out = 0;
  float scale = 1.f;
  float* y = nullptr;  // slot 0's [M, columns]
  int64_t y_stride[2] = {0, 0};  // slot, token
  // Optional: the sums y + delta go here, rounded to bf16, instead of into
  // y (then only read): slot 0's [M, columns] with y's strides.
  void* y_bf16 = nullptr;
  int64_t slots = 0, M = 0;
  // Optional: runs of different lengths packed end to end (t5_forward.h
  // EncodePacked). Slot s's tokens are run_starts[s] .. run_starts[s + 1]
  // - 1 (device int32 [slots + 1]) along the token stride of x, xa and y
  // (their slot strides unused, xa_buffer [tokens, R]); M is the longest
  // run.
  const int32_t* run_starts = nullptr;
  // Optional: run s takes the factors of bank slot run_slots[s] (device
  // int64 [slots], each within the bank: the caller checks) instead of
  // slot s, a and b then the bank's slot 0, and each site's scaling of
  // that slot (RunLoraSite::slot_scales, required then), times run_mask[s]
  // where given (device fp32 [slots]; 0 for a row without an adapter).
  // Why: the serving engine's admissions hold arbitrary bank slots, one
  // row each; without this their deltas gathered every row's factors.
  const int64_t* run_slots = nullptr;
  const float* run_mask = nullptr;
};
bool RunLoraFits(const RunLoraArgs& args);
int LaunchRunLora(const RunLoraArgs& args, void* stream);
// The shrink alone, xa_buffer[s, m, :] = x[s, m, :] a[s]^T, on the tensor
// cores (3xTF32) only: x, a, in, R, slots, M, their strides and xa_buffer
// ([slots, M, R] contiguous) are read, the rest ignored. R = 16, 32 or a
// multiple of 64; in a multiple of 32; M >= 32; at least two 64-token
// tiles per SM; 16-byte aligned rows. RunShrinkFits says whether it takes
// them (xa_buffer aside); LaunchRunShrink returns cudaErrorInvalidValue
// where not (or without an aligned xa_buffer), else the launch's error.
bool RunShrinkFits(const RunLoraArgs& args);
int LaunchRunShrink(const RunLoraArgs& args, void* stream);
// The shrink alone on the FMA kernel, R a multiple of 32 taken in groups of
// 32 ranks (a block per slot, 8 or 16 tokens and group): each group's
// values bit for bit LaunchRunLora's shrink of those 32 ranks alone. Why: a
// per-row prefill's cross values shrank the same x once per 2 decoder
// blocks (12 launches for flan-t5-large); every block's A side by side now
// takes one.
// Reads what LaunchRunShrink reads (run_starts too); 16-byte aligned rows.
// RunShrinkGroupsFits says whether it takes them (xa_buffer aside);
// LaunchRunShrinkGroups returns cudaErrorInvalidValue where not (or
// without an aligned xa_buffer), else the launch's error.
bool RunShrinkGroupsFits(const RunLoraArgs& args);
int LaunchRunShrinkGroups(const RunLoraArgs& args, void* stream);

// Negative log-likelihoods of labels under bf16 logits (token_nll_kernels.cu),
// for fused_ops.h TokenNll: nll[i] = log(sum_v exp(x[i, v] - m_i)) -
// (x[i, label_i] - m_i) with m_i the row's max, in fp32, for i < rows;
// logits [rows, vocab] bf16 contiguous, labels int64 [rows], nll fp32
// [rows], all in device memory. A label of kIgnoredLabel gives 0, other
// negative labels take class 0, labels >= vocab NaN. Returns the launch's
// error (0: none).
inline constexpr int64_t kIgnoredLabel = -100;
int LaunchTokenNll(const void* logits, int64_t rows, int64_t vocab,
                   const int64_t* labels, float* nll, void* stream);

// Greedy decoding's tokens (greedy_kernels.cu), for fused_ops.h
// GreedyTokens: next[r] = the first index of row r's largest logit (NaN
// above every number, as at::argmax), logits [rows, vocab] contiguous of
// `dtype` kFloat or kBFloat16 (else cudaErrorInvalidValue);
// with `unfinished` (bool [rows], else null): next[r] = pad where
// !unfinished[r], then unfinished[r] &= next[r] != eos, in place. All in
// device memory, except host_next (may be null): host memory mapped into the
// device's address space (its device pointer), written with next. Returns
// the launch's error (0: none).
int LaunchGreedyTokens(const void* logits, DType dtype, int64_t rows,
                       int64_t vocab, bool* unfinished, int64_t pad,
                       int64_t eos, int64_t* next, int64_t* host_next,
                       void* stream);

// A static decoder step's inputs (step_start_kernels.cu), for fused_ops.h
// StartDecoderStep: for every row b < rows, hidden[b, :] = table[tokens[b],
// :] widened to fp32 (a token outside [0, vocab) clamped into it); for
// every row b < t_rows (t has 1 or `rows` rows), with t = t[b] before the
// call: bias[b, h, :] = self_bias[h, min(t, capacity - 1), :] for h <
// heads, t_step[b] = t, t[b] = min(t + 1, t_max). table [vocab, dim] of
// kFloat or kBFloat16 (dim a multiple of a 16-byte word, the table and
// hidden 16-byte aligned), self_bias fp32 [heads, capacity, capacity],
// bias fp32 [t_rows, heads, capacity], all contiguous in device memory.
// Returns the launch's error (0: none; cudaErrorInvalidValue, nothing
// launched, for arguments it does not take).
struct DecoderStepStartArgs {
  const void* table = nullptr;
  const int64_t* tokens = nullptr;
  const float* self_bias = nullptr;
  int64_t* t = nullptr;
  float* hidden = nullptr;
  float* bias = nullptr;
  int64_t* t_step = nullptr;
  int64_t rows = 0, t_rows = 0, dim = 0, vocab = 0, heads = 0, capacity = 0;
  int64_t t_max = 0;
};
int LaunchDecoderStepStart(const DecoderStepStartArgs& args, DType table_dtype,
                           void* stream);

// Weighted sums of equally long vectors (weighted_sum_kernels.cu), for
// fused_ops.h WeightedSums: for every job and element i < n,
//   dst[i] = sum over the job's terms t of weight_t * src_t[i]
// in fp32, in term order, each product and sum rounded on its own (no
// fused multiply-add), stored as fp32 or bf16 (to nearest even); a job
// without terms stores `fill`. `jobs` and `terms` are in device memory;
// max_n >= every job's n. vector_loads false: every job takes the scalar
// loop (A/B). Returns the launch's error (0: none).
struct WeightedSumTerm {
  const void* src = nullptr;
  float weight = 0.f;
  int32_t src_bf16 = 0;  // 1: bf16, 0: fp32
};
struct WeightedSumJob {
  void* dst = nullptr;
  int64_t n = 0;
  int32_t first_term = 0;  // index into the term table
  int32_t num_terms = 0;
  float fill = 0.f;
  int32_t dst_bf16 = 0;  // 1: bf16, 0: fp32
  int64_t src_offset = 0;  // LaunchSliceSums: elements into every term
};
int LaunchWeightedSums(const WeightedSumJob* jobs, const WeightedSumTerm* terms,
                       int num_jobs, int64_t max_n, bool vector_loads, void* stream);

// The same sums over slices of a few long buffers, for fused_ops.h
// RunSliceSums: a job with num_terms != 0 sums every term of `terms` (by
// value: a launch's buffers and weights), each read from its element
// job.src_offset on; a job with num_terms == 0 stores `fill`. Why: a slot
// load's jobs stay in device memory while each load passes only the
// buffers it reads.
constexpr int kMaxSliceTerms = 32;
struct SliceTerms {
  WeightedSumTerm terms[kMaxSliceTerms];
  int32_t num = 0;
};
int LaunchSliceSums(const WeightedSumJob* jobs, int num_jobs, int64_t max_n,
                    const SliceTerms& terms, void* stream);

// A weighted sum of the rows of a bf16 matrix (weighted_sum_kernels.cu),
// for fused_ops.h ComposeFromBf16: out[j] = sum_i w[i] * factors[i, j] for
// j < n, `factors` [num_modules, n] bf16 (rows contiguous), w and out fp32;
// fp32 fused multiply-adds in row order. All in device memory. Returns the
// launch's error (0: none).
int LaunchComposeBf16(const float* w, int num_modules, const void* factors, int64_t n,
                      float* out, void* stream);

// Every candidate's weighted sum of the rows of an fp32 matrix
// (weighted_sum_kernels.cu), for fused_ops.h ComposeRows: out[c, j] =
// sum_i w[c, i] * factors[i, j] for c < rows, j < n; `factors`
// [num_modules, n], w [rows, num_modules] and out [rows, n], fp32, rows
// contiguous, factors and out 16-byte aligned, n % 4 == 0, num_modules <=
// kMaxComposeModules, rows * num_modules <= kMaxComposeWeights (w is staged
// in shared memory); fp32 fused multiply-adds in module order. All in
// device memory. Returns the launch's error (0: none; cudaErrorInvalidValue
// for shapes outside those bounds, nothing launched).
constexpr int kMaxComposeModules = 32;
constexpr int64_t kMaxComposeWeights = 12288;  // 48 KB
int LaunchComposeRows(const float* w, int rows, int num_modules, const float* factors,
                      int64_t n, float* out, void* stream);

// One site of one slot of a bank whose step factors are kept in int8
// (LaunchQuantizeFactorsInt8): the fp32 factors a (na elements) and b (nb),
// each contiguous, to a_q and b_q, each scaled by its own absolute maximum
// over 127 (q = round-to-nearest-even(v / s), in [-127, 127]; s = 0 for a
// block of zeros, whose values are all 0), and *scale_out = *lora_scale *
// s_a * s_b: what the product of the two int8 blocks is multiplied by.
struct Int8FactorJob {
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t na = 0, nb = 0;
  int8_t* a_q = nullptr;
  int8_t* b_q = nullptr;
  const float* lora_scale = nullptr;
  float* scale_out = nullptr;
};
// Every job of `jobs` (device memory), a block each. Returns the
// cudaError_t of the launch.
int LaunchQuantizeFactorsInt8(const Int8FactorJob* jobs, int num_jobs, void* stream);

// Low-rank updates of weight matrices (low_rank_merge_kernels.cu), for
// fused_ops.h LowRankMerge: for every job, out = w + scale * (b a), where
// w and out are [rows, cols] (fp32 or bf16, rows contiguous, 16-byte
// aligned), a is [rank, cols] and b [rows, rank] (fp32, contiguous). Each
// element's sum over the rank runs in fp32 in rank order with fused
// multiply-adds, then is multiplied by scale and added to w (each rounded),
// then rounded once to out's dtype. With `tensor_cores` (the caller's
// promise: every job bf16, its rank a multiple of 4, a and b 16-byte
// aligned) the sum runs on the tensor cores instead, each factor split into
// two bf16 parts (about 16 bits of each product, against the 8 of the bf16
// result; LORAHUB_MERGE_FMA=1 keeps the FMAs, A/B). Requires cols % 4 == 0
// and 1 <= rank <= kMaxLowRankMergeRank. `jobs` is in device memory;
// max_tiles >= LowRankMergeTiles of every job. Returns the launch's error
// (0: none).
inline constexpr int kMaxLowRankMergeRank = 32;
struct LowRankMergeJob {
  const void* w = nullptr;
  void* out = nullptr;
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t rows = 0, cols = 0;
  int32_t rank = 0;
  float scale = 1.f;
  int32_t bf16 = 0;  // 1: w and out bf16, 0: fp32
};
int64_t LowRankMergeTiles(int64_t rows, int64_t cols);
// max_blocks > 0: the tensor-core kernel on at most that many blocks, each
// looping over tiles (the FMA kernel ignores it); 0: a block a tile.
int LaunchLowRankMerge(const LowRankMergeJob* jobs, int num_jobs,
                       int64_t max_tiles, bool tensor_cores, int max_blocks,
                       void* stream);

// The kernels of a teacher-forced decoder's cross-attention from the query
// side (query_side_cross.h; query_side_kernels.cu) around its cuBLAS GEMMs.
//
// LaunchSplitBf16: each fp32 x of `in` [G, R, C] (element strides
// in_stride = {g, r}, unit along C) as two bf16 parts, hi = bf16(x) and
// lo = bf16(x - hi) (x = hi + lo to about 2^-17 relative), written to `hi`
// [G, R, C] (strides out_stride, unit along C) and to the same places
// lo_offset elements further: a GEMM of the two parts side by side against
// an exact bf16 operand then sums products of about fp32 precision.
struct SplitBf16Args {
  const float* in = nullptr;
  void* hi = nullptr;  // bf16
  int64_t G = 0, R = 0, C = 0;
  int64_t in_stride[2] = {0, 0};
  int64_t out_stride[2] = {0, 0};
  int64_t lo_offset = 0;
};
int LaunchSplitBf16(const SplitBf16Args& args, void* stream);

// Softmax over j < S of s[b, m, j] = (scores[b, m, j] + scores[b, M + m, j])
// + bias[b, j] (the scores of a split query's two parts; bias element (b, j)
// at b * bias_stride[0] + j * bias_stride[1]), in fp32 as ATen's softmax
// (max, exponentials, their sum, a division): p [B, M, S] and its split
// p_split, bf16 [B, M, 2S] (hi in [0, S), lo in [S, 2S) of each row).
// scores, p and p_split contiguous.
struct SplitScoresSoftmaxArgs {
  const float* scores = nullptr;  // [B, 2M, S]
  const float* bias = nullptr;
  int64_t bias_stride[2] = {0, 0};
  float* p = nullptr;
  void* p_split = nullptr;
  int64_t B = 0, M = 0, S = 0;
};
int LaunchSplitScoresSoftmax(const SplitScoresSoftmaxArgs& args, void* stream);

// The per-row LoRA delta of each head's output, added in place:
//   ctx[b, t, h, e] += row_scale[b] * sum_c u[b, t, h, c] * w[slots[b], h D + e, c]
// ctx fp32 [B, T, H, D] and u fp32 [B, T, H, r] contiguous; w fp32 with
// element (s, o, c) at s * w_stride[0] + o * w_stride[1] + c; slots int64
// [B], row_scale fp32 [B]. The sum over c in order with fused multiply-adds.
struct HeadLoraArgs {
  float* ctx = nullptr;
  const float* u = nullptr;
  const float* w = nullptr;
  int64_t w_stride[2] = {0, 0};
  const int64_t* slots = nullptr;
  const float* row_scale = nullptr;
  int64_t B = 0, T = 0, H = 0, D = 0, r = 0;
};
int LaunchHeadLoraDeltas(const HeadLoraArgs& args, void* stream);

// A teacher-forced T5 decoder of at most kPersistentDecoderMaxRows rows as
// one persistent kernel (persistent_decoder_kernels.cu): flan-t5-large's
// shape only (d_model 1024, 16 heads of 64, gated tanh GELU of d_ff 2816),
// bf16 weights without LoRA deltas (an objective evaluation's merged
// weights), fp32 stream, attention and keys, for fused_ops.h
// PersistentDecoder. One CTA an SM, every CTA resident at once (a
// cooperative launch): grid-wide barriers order the phases of a block.
inline constexpr int kPersistentDecoderMaxLayers = 32;
inline constexpr int kPersistentDecoderMaxRows = 16;
inline constexpr int kPersistentDecoderMaxKeys = 512;
inline constexpr int kPersistentDecoderModel = 1024;
inline constexpr int kPersistentDecoderHeads = 16;
inline constexpr int kPersistentDecoderHeadDim = 64;
inline constexpr int kPersistentDecoderFeedForward = 2816;
// The launch's counters: the grid's barriers, then one a (layer, head)
// (LORAHUB_PD_EXP_HEAD_COUNTERS, persistent_decoder.cuh).
inline constexpr int kPersistentDecoderCounters =
    1 + kPersistentDecoderMaxLayers * kPersistentDecoderHeads;
// Per-unit sums of squares of the stream ([units][rows], fp32).
inline constexpr int kPersistentDecoderPartials =
    kPersistentDecoderModel / 8 * kPersistentDecoderMaxRows;
enum PersistentDecoderWeight {
  kPdQ, kPdK, kPdV, kPdO, kPdCrossQ, kPdCrossO, kPdWi0, kPdWi1, kPdWo,
  kPdWeights
};
struct PersistentDecoderLayer {
  // bf16 [out][in], each row contiguous (row stride = in).
  const void* w[kPdWeights] = {};
  // bf16 [d_model]: the self-attention, cross-attention, feed-forward norms.
  const void* norm[3] = {};
  // fp32 keys and values of the cross-attention: row b, head h, key j at
  // b * cross_stride[0] + h * cross_stride[1] + j * cross_stride[2] (the
  // d_kv elements contiguous; the strides in PersistentDecoderArgs).
  const float* cross_k = nullptr;
  const float* cross_v = nullptr;
};
struct PersistentDecoderArgs {
  PersistentDecoderLayer layer[kPersistentDecoderMaxLayers];
  const void* final_norm = nullptr;  // bf16 [d_model]
  int64_t cross_stride[3] = {0, 0, 0};
  const float* cross_bias = nullptr;  // row b's key j at b * cross_bias_stride + j
  int64_t cross_bias_stride = 0;
  // Head h, query i, key j at h * self_bias_stride[0] + i * self_bias_stride[1] + j
  // (the causal mask in it).
  const float* self_bias = nullptr;
  int64_t self_bias_stride[2] = {0, 0};
  float* h = nullptr;        // [R][d_model]: in the embeddings; out the stream
  float* qkv = nullptr;      // [R][3 d_model] scratch
  void* ctx = nullptr;       // bf16 [R][d_model] scratch
  float* cross_q = nullptr;  // [R][d_model] scratch
  void* gelu = nullptr;      // bf16 [R][d_ff] scratch
  float* partial = nullptr;  // [kPersistentDecoderPartials] scratch
  float* out = nullptr;      // [R][d_model]: the final norm of the stream
  unsigned* counter = nullptr;  // [kPersistentDecoderCounters], zero at launch
  int layers = 0, B = 0, T = 0, S = 0;  // R = B * T rows, row b * T + t
  float eps = 0.f;
};
// 0 or the launch's cudaError_t; cudaErrorNotSupported where the device
// cannot hold one CTA an SM or launch cooperatively (nothing launched).
int LaunchPersistentDecoder(const PersistentDecoderArgs& args, void* stream);

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_FUSED_KERNELS_H_
