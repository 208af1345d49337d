// Fused kernels of the T5 forward pass on CUDA, with ATen fallbacks that are
// the reference arithmetic everywhere else (CPU, autograd, a build without
// nvcc). The forward pass calls these and does not care which ran.
//
// Why: under a CUDA graph a flan-t5-large objective evaluation is bound by
// the number of small kernels (about 3,300 of them, most of them elementwise
// steps of RMS norm, attention and casts), not by the matmuls. One RMS-norm
// kernel replaces eight, and PyTorch's scaled-dot-product attention replaces
// the matmul / bias / softmax / matmul sequence. Fifth session (1,759
// kernels left): the residual add goes into the norm kernel, the gated GELU
// is one kernel, and short queries get their own attention kernel (PyTorch
// ran them on its math path, about twelve kernels each);
// tests/model/objective_ops_test pins the resulting op counts.
//
// Two implementations of the CUDA part, one per build (deploy/cmake/README.md,
// "CUDA-only sources"): fused_ops_cuda.cc + the .cu kernels (CMake with a
// CUDA LibTorch and nvcc; run_lora_kernels.cu holds the kernels of
// LoraRunDeltas) and fused_ops_stub.cc (everything else).
//
// Thread-safety: stateless; kernels run on the current CUDA stream.
#ifndef LORAHUB_CORE_MODEL_FUSED_OPS_H_
#define LORAHUB_CORE_MODEL_FUSED_OPS_H_

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace lorahub::model {

// True when the environment variable `name` is set to anything but empty or
// "0": the engine's switches (docs/TUNING.md). Callers read it once.
bool EnvFlag(const char* name);
// A positive integer from the environment variable `name`, else `fallback`
// (A/B switches; callers read it once).
int64_t EnvCount(const char* name, int64_t fallback);

// True when this binary holds the CUDA kernels; Enabled: and the environment
// does not turn them off (LORAHUB_NO_FUSED=1, for A/B timing).
bool FusedKernelsCompiled();
bool FusedKernelsEnabled();

// While one lives, the ATen ops of its thread skip the autograd and
// view-tracking dispatch keys: for work that never differentiates
// (generation, the serving engine's thread), whose eager prefills spend
// that host time per op while the GPU waits for their launches. Tensors
// made meanwhile are ordinary tensors; in-place writes do not bump version
// counters. LORAHUB_AUTOGRAD_DISPATCH=1 (read once): no effect (A/B).
class InferenceDispatchScope {
 public:
  InferenceDispatchScope();
  InferenceDispatchScope(const InferenceDispatchScope&) = delete;
  InferenceDispatchScope& operator=(const InferenceDispatchScope&) = delete;

 private:
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd_;
};

// True while the current CUDA stream of `device` is capturing a CUDA graph:
// work queued now runs only when the graph replays, so results computed
// now must not be kept for eager use. False for any other device and in a
// build without the CUDA kernels.
bool CurrentStreamCapturing(c10::Device device);

// RMS norm as T5 does it, over the last dimension of `x` (any float dtype):
// variance of x in fp32, x * rsqrt(variance + eps) times `weight`, all in
// fp32. `full` gets that fp32 result; `rounded` the same rounded once to
// `compute` (the same tensor as `full` when `compute` is fp32).
struct NormOutput {
  at::Tensor full;
  at::Tensor rounded;
};
NormOutput RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                   at::ScalarType compute);

// The residual update of a sublayer and the norm of the next one, ONE kernel
// on CUDA (it was an elementwise add plus the norm kernel per sublayer, 120
// adds per flan-t5-large objective evaluation): sum = x + delta in fp32
// (x fp32, the residual stream; delta of any float dtype, the sublayer
// output, same shape, widened; or SplitKProject's partials, whose
// SplitKSum(delta, compute) is the output), then RmsNorm(sum, weight, eps,
// compute).
// Exactly the arithmetic of `RmsNorm(x + delta, ...)`, which is the
// fallback (CPU, autograd, LORAHUB_NO_FUSED=1). `sum` is a new tensor.
// keep_full false: norm.full is left undefined where compute is not fp32,
// for a sublayer whose projections take no per-row LoRA delta (they read
// the rounded output only). On CUDA the kernel then does not write it:
// the encoder's feed-forward norm of a CMA-ES population pass wrote 94 MB
// of its 376 MB for nothing.
struct AddNormOutput {
  at::Tensor sum;
  NormOutput norm;
};
AddNormOutput AddRmsNorm(const at::Tensor& x, const at::Tensor& delta,
                         const at::Tensor& weight, double eps,
                         at::ScalarType compute, bool keep_full = true);

// x W^T for the residual stream, as the fp32 partial products of a GEMM
// split over K: [P, ..., N] with x [..., K], w [N, K] (P = 4: K slices of
// K / 4, one strided-batched cuBLAS call on views). Their sum in order
// p = 0 .. P-1, rounded to w's dtype (SplitKSum), is x W^T up to the order
// of the fp32 sums; AddRmsNorm and AddRmsNormShrink form it as they add the
// residual. Why: at decode-step sizes cuBLAS's own split-K GEMM is followed
// by a reduction kernel, and the unsplit GEMMs are latency-bound (H200,
// graph-replayed, weights from HBM: 64 x 1024 x 2816 7.30 -> 5.13 us,
// 64 x 1024 x 1024 4.95 -> 4.08 us, reduction included). For the attention
// outputs and wo of decode steps and of the objective's decoder: 64-row
// generation 30,645 -> 32,193 tok/s per row, an objective evaluation
// 2.845 -> 2.765 ms (twenty-sixth session). Also a short prompt's encoder
// (at most 64 tokens in all). Undefined, having run nothing,
// unless x and w are bf16 or fp16 on CUDA, not differentiable, with at most
// 64 rows and K a multiple of 8 P; or with LORAHUB_NO_SPLITK=1. A/B
// switches, read once: LORAHUB_NO_SPLITK=1, LORAHUB_SPLITK_PARTS=2 (P),
// LORAHUB_SPLITK_MAX_ROWS=N (rows). `parts` > 0: that P (2 to 4) instead
// (the decode steps' attention inputs, q|k|v and the cross-attention's q,
// in 2 parts, summed by the step kernel: DecodeStepInputs::parts).
at::Tensor SplitKProject(const at::Tensor& x, const at::Tensor& w,
                         int64_t parts = 0);
// True when `out` is SplitKProject's output for a sublayer whose output has
// `like`'s shape: fp32 [P, like's shape] with P >= 2.
bool IsSplitKOutput(const at::Tensor& out, const at::Tensor& like);
// The output SplitKProject's partials stand for: their fp32 sum in order,
// rounded to `dtype`.
at::Tensor SplitKSum(const at::Tensor& parts, at::ScalarType dtype);

// gelu_tanh(gate) * up, T5's gated FFN with transformers' NewGELU
// (gelu_new and its aliases): ONE kernel on CUDA (it was a GELU and a
// multiply per block). gate, up: same shape and float dtype, each a view
// with unit last-dimension stride whose leading dimensions collapse into
// rows (the two column halves of the fused wi_0|wi_1 output qualify).
// Result: new, contiguous, same shape and dtype. The arithmetic of the
// fallback at::gelu(gate, "tanh") * up (CPU, autograd, LORAHUB_NO_FUSED=1):
// the GELU in fp32 rounded to the dtype, the product in fp32 rounded.
at::Tensor GatedGeluTanh(const at::Tensor& gate, const at::Tensor& up);

// softmax(q k^T + bias) v with no 1/sqrt(d) scaling (T5), in the dtype of q,
// k, v (fp32 in this engine, bf16 under AttentionBf16()). q: [B, H, T, d]; k, v: [B, H, S, d]; bias
// broadcastable to [B, H, T, S]. Returns [B, H, T, d].
//
// A single query (T == 1: every incremental decode step, with the KV cache
// or the static decoder) takes the short-query kernel on CUDA (seventh
// session: its vectorized variant, several keys per warp; the context
// written in the caller's dtype, heads last), else SingleQueryAttention;
// LORAHUB_DECODE_ATTN_BMM=1 keeps it on SingleQueryAttention and
// LORAHUB_DECODE_ATTN_GENERIC=1 sends it to GeneralAttention (read once;
// A/B in one build). Everything else takes GeneralAttention.
at::Tensor Attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias);

// Attention(q, k, v, bias).to(out_dtype), the same values: the short-query
// kernel rounds its fp32 result straight to out_dtype (no conversion kernel;
// the objective's output projections read bf16 contexts).
at::Tensor Attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias,
                     at::ScalarType out_dtype);

// Self-attention over rows packed end to end, without padding
// (t5_forward.h EncodePacked). q, k, v: [1, H, N, d] with the tokens along
// dimension 2 (views of one q|k|v GEMM's output qualify); row b's
// positions are the tokens host_starts[b] .. host_starts[b + 1] - 1, and
// `starts` holds the same offsets as int32 [B + 1] on q's device. Each row
// attends over its own tokens only, biased by bias[0, h, t, j] ([1, H, L,
// L], L the longest row; t and j positions within the row). Returns [1, H,
// N, d] in out_dtype (heads last in memory): for every row the values of
// Attention over that row alone, up to the order of fp32 sums. On CUDA one
// launch of the register-tiled kernel where it takes the shapes
// (fused_kernels.h AttentionArgs::seq_starts: 64-wide heads, a longest row
// of 33 to 128 positions); elsewhere one GeneralAttention per row.
// host_starts empty: the rows are known on the device only (a captured pass
// replayed over other rows, static_packed_encoder.h); the kernel, or a
// c10::Error. L may then exceed the longest row (a bound of it).
inline constexpr int64_t kPackedAttentionMaxRow = 128;  // the kernel's longest
at::Tensor PackedAttention(const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& bias,
                           const at::Tensor& starts,
                           const std::vector<int64_t>& host_starts,
                           at::ScalarType out_dtype);

// The general path: on CUDA, queries of at most kSmallQueryMax positions
// (the teacher-forced decoder of the objective: self- and cross-attention)
// take one hand-written kernel (fused_kernels.h LaunchSmallAttention: fp32
// scores and softmax, any strides, so no copies of the strided q/k/v views),
// unless LORAHUB_SMALL_ATTN_GENERIC=1 (read once; A/B). Longer queries
// whose keys and values fit in a block's shared memory (the encoder of the
// objective: fused_kernels.h TiledAttentionFits, S up to 256 for
// 64-wide heads) take the tiled kernel (LaunchTiledAttention; seventh session)
// unless LORAHUB_NO_TILED_ATTN=1 (TiledAttentionOff). Why: for these
// shapes PyTorch's scaled-dot-product attention picked its math path, about
// twelve kernels per call (three copies, two multiplies by 1, two GEMMs, the
// bias add, softmax and three kernels of its fully-masked-row guard).
// Longer queries take scaled-dot-product attention (the memory-efficient
// kernel for fp32); matmul / softmax / matmul elsewhere and under autograd. Same contract as Attention (k and v of another dtype than
// q are widened to q's first).
at::Tensor GeneralAttention(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias);
constexpr int64_t kSmallQueryMax = 32;

// True when LORAHUB_SMALL_ATTN_GENERIC=1 keeps short queries on
// scaled-dot-product attention. Read once.
bool SmallAttentionGeneric();
// True when LORAHUB_SMALL_ATTN_SCALAR=1 keeps the short-query kernel on its
// one-key-per-warp variant (fused_kernels.h AttentionVariant; A/B).
bool SmallAttentionScalar();
// True when LORAHUB_NO_SPLIT_ATTN=1 keeps the short-query kernel's
// T5-sized heads on the vectorized variant of the seventh session instead
// of the split-key one (tenth session; fused_kernels.h AttentionVariant;
// A/B). Read once.
bool SplitKeyAttentionOff();
// True when LORAHUB_NO_TILED_ATTN=1 keeps longer queries on
// scaled-dot-product attention (A/B). Read once.
bool TiledAttentionOff();
// True when LORAHUB_DECODE_ATTN_BMM=1 keeps single queries on
// SingleQueryAttention (the sixth session's decode path; A/B). Read once.
bool DecodeAttentionBmm();

// True when a bf16 model's teacher-forced passes (Encode, DecodeFull: the
// objective) run attention on bf16 q, k, v (LORAHUB_ATTN_BF16=1, read once;
// experimental, for an A/B): no widening of the projections' outputs and no
// rounding of the context for the output projection; the fused kernels form
// the scores and the softmax in fp32 (PyTorch's memory-efficient kernel and
// the short-query kernel accumulate in fp32), the probabilities are rounded
// to bf16 inside SDPA for the weighted values, the context is rounded once.
// What it rounds beyond the fp32 path: q and k and v adapted by fp32 LoRA
// deltas, the encoder's additive bias (position bias from a bf16 table:
// exact; masked entries: still about finfo(bf16).min), and inside SDPA the
// probabilities. The fallback (CPU) widens q, k, v to fp32 and rounds the
// context: the arithmetic of the short-query kernel.
bool AttentionBf16();
// Tests: 1 / 0 forces AttentionBf16(), -1 returns to the environment's.
void SetAttentionBf16ForTesting(int value);
// Tests: the tensor-core encoder attention's mode (fused_kernels.h
// LaunchMmaAttention: 0 never, 1 launches of many blocks, 2 every launch it
// fits) in place of LORAHUB_MMA_ATTENTION's; -1 returns to the
// environment's. It holds for launches after the call: a CUDA graph
// captured before it replays what it captured.
void SetMmaAttentionModeForTesting(int mode);

// The same arithmetic for one query per (row, head) as two batched matmuls
// (cuBLAS / CPU bmm over B*H matrices) around the bias add and the softmax,
// all in the dtype of q, k, v. Why: on CUDA the generic fp32 kernel is tuned
// for long queries; one query per row made it half of all kernel time of a
// decode step (docs/BENCHMARKS.md, fourth session); the short-query kernel
// with one query was slower still (sixth session: base generation at batch
// 64, 15.4k against 18.0k tokens/s on an H200; its vectorized variant now
// takes them, see Attention). Fixed shapes and no host
// synchronisation, so it can be captured in a CUDA graph. Masks stay in the
// bias (causal / cache length, padded encoder rows). q: [B, H, 1, d];
// k, v: [B, H, S, d] (any strides; a copy only where B and H do not fold
// into one batch dimension); bias broadcastable to [B, H, 1, S]. Returns a
// contiguous [B, H, 1, d]. Other shapes go to GeneralAttention. k and v may
// be bf16 with q and bias fp32 (DecodeKvDtype); the result is then fp32.
at::Tensor SingleQueryAttention(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& bias);

// While one lives, MatmulFloat on its thread rounds the GEMM's rows (the
// product of x's leading dimensions) up to a multiple of `multiple` (zero
// rows appended, their outputs dropped; 0 or 1: none): the same values up to
// the kernel the GEMM picks for its shape. Why: cuBLAS picks a kernel per
// shape on the host, and the serving engine's admissions meet a new row
// count at nearly every pass: the rows' cross keys and values of a mixed
// round, one fp32-output GEMM of 49,152 columns a pass, held the engine
// thread 1.1 ms each (sixty-sixth session, H100, profiled). Scopes nest;
// each restores the multiple it found.
class GemmRowsMultipleScope {
 public:
  explicit GemmRowsMultipleScope(int64_t multiple);
  ~GemmRowsMultipleScope();
  GemmRowsMultipleScope(const GemmRowsMultipleScope&) = delete;
  GemmRowsMultipleScope& operator=(const GemmRowsMultipleScope&) = delete;

 private:
  int64_t saved_;
};

// x W^T in fp32 for the inputs of an fp32 LoRA delta (t5_forward.cc):
// x [..., in] and weight [out, in] of one dtype. For bf16/fp16 on CUDA ONE
// cuBLAS GEMM whose output is its fp32 accumulator (at::bmm with
// out_dtype): no rounding to the compute dtype and no widening kernel
// (seventh session: 72 conversion kernels fewer per flan-t5-large
// objective evaluation, two per block of a decode step). Elsewhere (CPU,
// autograd, LORAHUB_NO_FUSED=1 or LORAHUB_NO_GEMM_FLOAT=1 for an A/B) the
// matmul in the operands' dtype, then widened: the previous arithmetic, so
// on CUDA the result is closer to the fp32 model's by the output's
// rounding. fp32 operands: the plain matmul. One "lorahub::gemm_float"
// profiler scope (counted as one GEMM by tests/model/objective_ops_test).
// Rows rounded up within a GemmRowsMultipleScope.
at::Tensor MatmulFloat(const at::Tensor& x, const at::Tensor& weight);

// out = a b for bf16 (or fp16) a [G, M, K] and b [G, K, N] (any strides, a
// batch broadcast by a zero stride included) with fp32 accumulation, written
// in place into an fp32 out [G, M, N] of unit column stride (cuBLAS's
// batched GEMM addresses it through its strides: column slices of a wider
// output need no copy). False, out untouched, where that does not run (CPU,
// other dtypes, autograd, LORAHUB_NO_FUSED=1, LORAHUB_NO_GEMM_FLOAT=1).
bool BmmFloatInto(const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& out);

// The non-GEMM steps of a teacher-forced decoder's cross-attention from the
// query side (query_side_cross.h), one kernel each on CUDA
// (fused_kernels.h LaunchSplitBf16, LaunchSplitScoresSoftmax,
// LaunchHeadLoraDeltas). All or nothing: false, nothing written, where they
// do not run (CPU, a build without the kernels, LORAHUB_NO_FUSED=1,
// autograd, other dtypes, shapes or layouts).
//
// SplitBf16: x fp32 [G, R, C] -> hi = bf16(x), lo = bf16(x - hi), both bf16
// [G, R, C] views of one buffer with equal strides (unit along C).
bool SplitBf16(const at::Tensor& x, const at::Tensor& hi, const at::Tensor& lo);
// SplitScoresSoftmax: scores fp32 [B, 2M, S] contiguous (rows m and M + m:
// the two parts of one row's scores), bias fp32 [B, S] (any strides) ->
// p = softmax(part0 + part1 + bias) fp32 [B, M, S] and its split
// p_split bf16 [B, M, 2S] (hi then lo along the last dimension), both
// contiguous.
bool SplitScoresSoftmax(const at::Tensor& scores, const at::Tensor& bias,
                        const at::Tensor& p, const at::Tensor& p_split);
// HeadLoraDeltas: ctx fp32 [B, T, H, D] += row_scale[b] * (u[b, t, h] .
// w[slots[b], h D .. h D + D - 1]) per element; u fp32 [B, T, H, r], w fp32
// [S, H D, r] (unit stride along r), slots int64 [B], row_scale fp32 [B].
bool HeadLoraDeltas(const at::Tensor& ctx, const at::Tensor& u,
                    const at::Tensor& w, const at::Tensor& slots,
                    const at::Tensor& row_scale);

// out = x w^T in fp32 with few output columns (LoRA down-projections of a
// bf16 model's fp32 deltas, N = the ranks): x [G, M, K], w [G, N, K], both
// fp32 with unit stride along K; out a new contiguous [G, M, N]. On CUDA
// one hand-written kernel (fused_kernels.h LaunchNarrowGemm: cuBLAS ran a
// split-K SIMT GEMM plus a reduction, 6-8 us per call); deterministic, the
// same products as a GEMM summed in another order. False, *out untouched,
// elsewhere (CPU, autograd, K not a multiple of 4, unaligned rows,
// LORAHUB_NO_NARROW_GEMM=1 or LORAHUB_NO_FUSED=1 for an A/B): the caller
// runs its GEMM.
bool NarrowGemm(const at::Tensor& x, const at::Tensor& w, at::Tensor* out);
// True when NarrowGemm can run (kernels compiled, not switched off). Read once.
bool NarrowGemmEnabled();

// The label of positions that add no loss (transformers' ignore index).
inline constexpr int64_t kIgnoredLabel = -100;

// Each position's negative log-likelihood of its label under bf16 logits,
// -log_softmax(logits.float())[label], 0 where label == kIgnoredLabel
// (other negative labels take class 0, as ATen's clamp_min(0) + gather):
// logits bf16 [B, T, V] contiguous on CUDA, labels int64 [B, T] contiguous
// on its device; *nll a new fp32 [B, T]. One kernel (fused_kernels.h
// LaunchTokenNll) in ATen's order (the max, the sum of exponentials, then
// log(sum) - (x - max)), its sums in another order; a label >= V gives NaN.
// Why: the fp32 copy of the logits and log_softmax over it were two passes
// over [B T, V] (H200, a CMA-ES population: 198 us). False, *nll untouched,
// elsewhere (CPU, autograd, other dtypes or shapes, LORAHUB_NO_FUSED=1,
// LORAHUB_NO_TOKEN_NLL=1 for an A/B).
bool TokenNll(const at::Tensor& logits, const at::Tensor& labels, at::Tensor* nll);

// A teacher-forced decoder of few rows as one persistent kernel
// (fused_kernels.h LaunchPersistentDecoder; persistent_decoder.cuh says
// how): the blocks' self-attention, cross-attention and gated feed-forward
// sublayers over the fp32 embeddings `embedded` [B, T, d_model] (B T <= 16),
// then the final norm: *hidden a new fp32 [B, T, d_model], as the unfused
// blocks' final norm output (t5_forward.cc DecoderHidden), the same
// roundings, the sums in another order (fp32 rounding apart). Each layer:
// `weights` q, k, v, o, cross q, cross o, wi_0, wi_1, wo, bf16 [out, in]
// with contiguous rows, on one CUDA device; `norms` the three bf16
// [d_model] norm weights; `cross_k`/`cross_v` fp32 [B, H, S, d_kv] with
// d_kv contiguous (S <= 512). self_bias fp32 [1, H, T, T] (keys contiguous,
// the causal mask in it); cross_bias fp32 [B, 1, 1, S] (the padding mask).
// flan-t5-large's shape only (d_model 1024, 16 heads of 64, d_ff 2816).
// Why: an objective evaluation's decoder (15 rows) was 24 x 12 kernels of a
// few microseconds each, latency-bound. False, *hidden untouched, elsewhere
// (CPU, autograd, other shapes or dtypes, a device that cannot hold one CTA
// of its kernel an SM, LORAHUB_NO_FUSED=1), and unless
// LORAHUB_PERSISTENT_DECODER=1: opt-in, measured slower than the unfused
// blocks so far (BENCHMARKS, eightieth and eighty-first sessions).
struct PersistentDecoderLayerInputs {
  at::Tensor weights[9];
  at::Tensor norms[3];
  at::Tensor cross_k, cross_v;
};
bool PersistentDecoder(const std::vector<PersistentDecoderLayerInputs>& layers,
                       const at::Tensor& final_norm, const at::Tensor& embedded,
                       const at::Tensor& self_bias, const at::Tensor& cross_bias,
                       double eps, at::Tensor* hidden);
// True where PersistentDecoder can take a model of this shape, `rows` = B T
// and `keys` = S, on CUDA (the kernels compiled, not switched off): the
// caller may then prepare its inputs. Every tensor is still checked there.
bool PersistentDecoderFits(int64_t d_model, int64_t heads, int64_t d_kv, int64_t d_ff,
                           int64_t rows, int64_t keys);

// Greedy decoding's pick: *next = logits.argmax(-1) (a new int64 [B]: the
// first index of each row's largest logit, NaN above every number) from
// fp32 or bf16 logits [B, V] contiguous on CUDA. With `unfinished` (bool
// [B] on the logits' device, contiguous; else null) as generation keeps it:
// next = where(unfinished, argmax, pad), then unfinished &= next != eos in
// place.
// One kernel (fused_kernels.h LaunchGreedyTokens). Why: at::argmax took
// 9.9 us of a 64-row decode step over 32,128 logits (H200), the where, ne
// and and-ing four more launches. False, nothing written, elsewhere (CPU,
// other dtypes or shapes, LORAHUB_NO_FUSED=1, LORAHUB_NO_GREEDY_KERNEL=1
// for an A/B).
// `into` (optional, each entry): where the tokens go besides, so that a
// decode loop copies nothing between steps (DtoD and DtoH copies cost a
// 64-row step about 15 us of gaps on an H200, thirty-eighth session):
//  device: int64 [B] contiguous on the logits' device, written and returned
//    as *next instead of a new tensor (a static decoder's input buffer);
//  host: int64 [B] contiguous pinned host memory that the kernel writes as
//    well through its device mapping, valid once the stream has passed the
//    kernel; *host_written (if not null) says whether it did (false where
//    the memory is not mapped: then copy *next).
struct GreedyInto {
  at::Tensor device;
  at::Tensor host;
};
bool GreedyTokens(const at::Tensor& logits, at::Tensor* unfinished,
                  int64_t pad, int64_t eos, at::Tensor* next,
                  const GreedyInto& into = {}, bool* host_written = nullptr);

// A static decoder step's inputs from its state: `hidden` [B, 1, d] fp32,
// the embeddings (table [V, d]) of tokens (int64 [B]); `bias` [R, H, 1, C]
// fp32, row t[r] of the causal self bias (fp32 [1, H, C, C] contiguous) for
// each of t's R rows (t int64 [1] or [B], the positions); `t` this step's
// positions (t's values before the call). t itself advances in place to
// min(t + 1, t_max). On CUDA one kernel (fused_kernels.h
// LaunchDecoderStepStart; no host sync, so a CUDA graph may capture it),
// else, and under LORAHUB_NO_STEP_START=1 (read once; A/B), the ATen ops
// (embedding, conversion, index_select, add, clamp). Why: they were four
// launches of a 64-row step (about 10 us with their gaps, H200).
struct DecoderStepStart {
  at::Tensor hidden;
  at::Tensor bias;
  at::Tensor t;
};
DecoderStepStart StartDecoderStep(const at::Tensor& table,
                                  const at::Tensor& tokens,
                                  const at::Tensor& self_bias, at::Tensor& t,
                                  int64_t t_max);

// out[s] = x[s] a[s]^T in fp32 for runs of rows per slot (the LoRA
// down-projection of a CMA-ES population's encoder output through every
// decoder block's cross v factors, R = 384 for flan-t5-large): x [S, M, in]
// and a [S, R, in], both fp32 with unit stride along in; out a new
// contiguous [S, M, R]. On CUDA the run kernels' tensor-core shrink
// (fused_kernels.h LaunchRunShrink, 3xTF32: about 22 bits of each product,
// summed in fp32; cuBLAS's fp32 batched GEMM ran on the SIMT cores). False,
// *out untouched, elsewhere (CPU, autograd, M < 32, in not a multiple of
// 32, R not 16, 32 or a multiple of 64, unaligned rows, LORAHUB_NO_FUSED=1,
// LORAHUB_NO_RUN_LORA=1 or LORAHUB_NO_MMA_SHRINK=1): the caller runs its
// GEMM.
bool RunShrink(const at::Tensor& x, const at::Tensor& a, at::Tensor* out);

// Experimental, off by default: while alive with `on` and
// LORAHUB_TF32_LORA=1 (read once), fp32 cuBLAS GEMMs on this process run on
// TF32 tensor cores: operands rounded to 10-bit mantissas (2^-11 relative),
// products accumulated in fp32. Meant for the fp32 LoRA deltas of a bf16
// model (t5_forward.cc ProjectFused), whose GEMMs otherwise run on the SIMT
// cores (sm80 fp32 kernels, a fifth of a CMA-ES population's kernel time).
// H200, twelfth session: CMA-ES 867 against 784 candidates/s, per-row
// generation 29428 against 28907 tok/s, the golden bf16 losses within 0.07
// points of their fp32-LoRA values; but on a 24+24-block random bf16 model
// the fused and the separate-weight runners, whose LoRA GEMMs run partly on
// the NarrowGemm kernel (fp32), then differed by 6% in loss (2% without):
// the rounding is visible where a model amplifies it, hence opt-in.
// Restores the previous setting on destruction. Thread-safety: ATen's flag
// is process-wide, so a GEMM of an fp32 model on another thread in that
// window would use TF32 too.
class Tf32LoraScope {
 public:
  explicit Tf32LoraScope(bool on);
  ~Tf32LoraScope();
  Tf32LoraScope(const Tf32LoraScope&) = delete;
  Tf32LoraScope& operator=(const Tf32LoraScope&) = delete;

 private:
  bool set_ = false;
  bool previous_ = false;
};

// One adapted site of LoraRowDeltas: the B factor [S, out, r] and scalings
// [S, 1, 1] (fp32) of the bank, the site's output columns [col, col + out)
// of y and its ranks [rank_offset, rank_offset + r) among the rows of `a`.
struct LoraRowSite {
  int64_t col = 0;
  int64_t rank_offset = 0;
  at::Tensor b;
  at::Tensor scale;
};

// Per-row LoRA deltas of single-token rows (decode steps) on CUDA, in the
// manner of Punica's BGMV: with slot = slots[b],
//   y[b, col_k : col_k + out_k] += scale_k[slot] * mask[b]
//       * (x[b] a[slot]^T)[rank_k] b_k[slot]^T
// for every site k, as one shrink kernel for all sites (their A factors side
// by side in `a` [S, R, in]) and one expand kernel per four sites, reading
// every row's factors straight from the bank: no gather copies, no batched
// GEMV.
// y: fp32 [B, total] (any strides; e.g. a fused projection's output), x:
// fp32 [B, in] (in <= 8192), a [S, R, in] (R <= 4096) and every b (one
// dtype for all b): fp32, bf16 or fp16, slots: int64 [B] (the
// rows' slots, clamped to >= 0), mask: fp32 [B, 1, 1] or undefined (every
// row adapted). All or nothing: returns false having changed nothing when it
// does not take these tensors (not CUDA, a build without the kernels,
// LORAHUB_NO_FUSED=1 or LORAHUB_NO_LORA_GEMV=1, autograd, other dtypes or
// shapes); the caller then runs its GEMMs. fp32 accumulation; differs from
// the GEMMs only in summation order.
bool LoraRowDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask);
// True when LoraRowDeltas can run (CUDA kernels compiled and not switched
// off by LORAHUB_NO_FUSED / LORAHUB_NO_LORA_GEMV, read once).
bool LoraRowGemvEnabled();

inline constexpr size_t kLoraRunMaxSites = 4;  // = kernels::kRunLoraMaxSites

// One adapted site of LoraRunDeltas: its B factors for the run's slots,
// fp32 [slots, out, r], and its output columns [col, col + out) of y.
struct LoraRunSite {
  at::Tensor b;
  int64_t col = 0;
  // With LoraRunSlots: the site's scaling of every bank slot, fp32 with
  // b.size(0) elements, contiguous (SiteBank::scale).
  at::Tensor scales;
};

// Runs that take their adapter slots from a table instead of in order (the
// serving engine's admissions: one row per run, each at the bank slot its
// adapter was loaded into): run s takes a[slots[s]] and each site's
// b[slots[s]], a and b then the whole bank ([bank slots, ...]), scaled by
// the site's scales[slots[s]] times mask[s] where defined (0: a row
// without an adapter), the `scale` argument unused. slots: int64 [runs]
// on y's device, contiguous, every value in [0, bank slots) (the caller
// checks: MakeRowAdapters); mask: fp32, contiguous, runs elements.
// Why: those rows gathered every row's factors (index_select) for batched
// GEMMs, about 7 operators a site; the kernels read the bank in place.
struct LoraRunSlots {
  at::Tensor slots;
  at::Tensor mask;
};

// LoRA deltas of runs of rows per adapter slot (a CMA-ES population's
// candidates, a per-row prefill's prompts) on CUDA, fp32, in two kernels
// (fused_kernels.h LaunchRunLora: the shrink, one expand for every site)
// instead of 1 + sites batched cuBLAS GEMMs: for each slot s and site k,
//   y[s, :, col_k : col_k + out] += scale * (x[s] a[s]^T)[:, k r : (k+1) r]
//                                   b_k[s]^T
// y: [slots, M, N] (unit column stride, any slot and token strides); x
// [slots, M, in] and a [slots, num_sites * r, in] (the sites' A factors side
// by side), or x and a undefined and xa [slots, M, num_sites * r] given (the
// expand alone). The products of the GEMMs it replaces (a batched shrink,
// a batched expand per site), summed in another order, so only for models
// whose numerics do not pin cuBLAS's order (reduced-precision models). All
// or nothing: false, having changed nothing, where it does not take these
// tensors (not CUDA, a build without the kernels, LORAHUB_NO_FUSED=1 or
// LORAHUB_NO_RUN_LORA=1, autograd, other dtypes, shapes or alignments).
// At most kLoraRunMaxSites sites per call.
// y_round (expand alone, optional): bf16 of y's sizes and strides that takes
// each sum y + delta rounded once, y then only read (the per-row cross
// values into the decoder's bf16 cache, CrossKeyValues::CopyTo).
// run_slots (optional): the runs' slots (LoraRunSlots).
bool LoraRunDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const at::Tensor& xa,
                   const std::vector<LoraRunSite>& sites, double scale,
                   const at::Tensor& y_round = at::Tensor(),
                   const LoraRunSlots* run_slots = nullptr);

// LoraRunDeltas (the shrink and the expand) over runs of different lengths
// packed end to end (t5_forward.h EncodePacked): y [1, N, columns] and x
// [1, N, in] fp32, slot s's run the tokens starts[s] .. starts[s + 1] - 1
// (starts: int32 [slots + 1] on y's device), max_run the longest run; a
// [slots, R, in] and each site's b [slots, out, r]. The same arithmetic per
// token as LoraRunDeltas; all or nothing, false where it does not run.
// y_round as LoraRunDeltas' (the per-row cross values of a packed prompt
// batch, CrossKeyValues::CopyPackedTo).
// run_slots as LoraRunDeltas' (starts then [runs + 1]).
bool LoraPackedRunDeltas(const at::Tensor& y, const at::Tensor& x,
                         const at::Tensor& a,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round = at::Tensor(),
                         const LoraRunSlots* run_slots = nullptr);

// LoraPackedRunDeltas in two halves, for many sites that share x (a per-row
// prefill's cross values: every decoder block's v from the encoder output).
// LoraPackedRunShrink returns xa = x a^T, fp32 [1, N, R], for a [slots, R,
// in] with R a multiple of 32, each 32 ranks' values bit for bit
// LoraPackedRunDeltas' shrink of those ranks alone, or an undefined tensor,
// having run nothing, where it does not take them (fused_kernels.h
// LaunchRunShrinkGroups; as LoraPackedRunDeltas otherwise).
// LoraPackedRunExpand adds the deltas of up to kLoraRunMaxSites sites from
// xa [1, N, sites * r] (a view of that output: unit rank stride), as
// LoraPackedRunDeltas' expand, all or nothing.
at::Tensor LoraPackedRunShrink(const at::Tensor& x, const at::Tensor& a,
                               const at::Tensor& starts, int64_t max_run);
bool LoraPackedRunExpand(const at::Tensor& y, const at::Tensor& xa,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round = at::Tensor());

// AddRmsNorm(x, delta, weight, eps, compute) and LoraRowShrink of its fp32
// output, xa[b] = full[b] a[slots[b]]^T (fp32 [B, R]), in ONE kernel on
// CUDA (decode steps: the norm before an adapted projection; the shrink was
// a kernel of its own that waited for the norm's output). x: contiguous
// fp32 [..., dim] of B rows, delta contiguous of x's shape, a [S, R, dim]
// with dim <= 2048 and 16-byte aligned factor rows, slots int64 [B]. The
// outputs are bit for bit AddRmsNorm's and the shrink kernel's. delta
// undefined: RmsNorm(x)'s outputs instead (out->sum undefined; the first
// decoder block's norm, which has no sublayer output to add). False,
// nothing touched, elsewhere (CPU, autograd, other shapes,
// LORAHUB_NO_NORM_SHRINK=1 for an A/B, or where LoraRowShrink does not run).
bool AddRmsNormShrink(const at::Tensor& x, const at::Tensor& delta,
                      const at::Tensor& weight, double eps,
                      at::ScalarType compute, const at::Tensor& a,
                      const at::Tensor& slots, AddNormOutput* out,
                      at::Tensor* xa);

// LoraRowDeltas in two halves, for a caller that folds the expand into
// another kernel (DecodeStepAttention): LoraRowShrink returns the shrink's
// xa = x a[slots[b]]^T, fp32 [B, R], or an undefined tensor, having run
// nothing, where LoraRowDeltas would not take x, a and slots; LoraRowExpand
// adds the sites' deltas from xa into y, or returns false, having changed
// nothing, where LoraRowDeltas would not take these sites.
at::Tensor LoraRowShrink(const at::Tensor& x, const at::Tensor& a,
                         const at::Tensor& slots);
bool LoraRowExpand(const at::Tensor& y, const at::Tensor& xa,
                   const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask);

// One decode step's attention (one query per row) with the work around it
// that would otherwise be kernels of their own: the per-row LoRA expand of q
// (and of the new value) from the shrink's output, and, for a
// self-attention step, storing the new key and value in the cache.
// Why: in a decode step of 64 rows with per-row adapters these were three
// kernels per self-attention and one per cross-attention of about 3.5 us
// each (tenth session: 1,536 expands and 768 stores per 64 x 32 Generate,
// 7.9 ms of kernel time, 10% of it).
//
// Per-row LoRA of one input x (q or v_new) [B, H, 1, D]: with slot =
// slots[b], x[b, h, 0, d] += scale[slot] * mask[b] * (xa[b, rank_offset:
// rank_offset + r] . b[slot, h * D + d, :]) (LoraRowDeltas' expand).
struct RowLoraExpand {
  at::Tensor xa;  // fp32 [B, R]: the shrink's output for a run of sites
  int64_t rank_offset = 0;
  at::Tensor b;      // [S, H * D, r]
  at::Tensor scale;  // fp32 [S, 1, 1]
};
inline constexpr int64_t kMaxStepParts = 2;  // = kernels::kMaxStepParts
struct DecodeStepInputs {
  at::Tensor q;     // fp32 [B, H, 1, D]
  at::Tensor k, v;  // [B, H, S, D]; with k_new, the cache: written here
  at::Tensor bias;  // broadcastable to [B, H, 1, S]
  const RowLoraExpand* q_lora = nullptr;
  // A self-attention step: the new key and value, fp32 [B, H, 1, D], stored
  // at position t (int64 on the device: [1], one position for every row, or
  // [B], each row's own) of k and v (rounded to their dtype) before the
  // attention, which then reads keys 0..t: the bias must mask the keys after
  // t (causal).
  at::Tensor k_new, v_new;
  const RowLoraExpand* v_lora = nullptr;  // needs k_new
  at::Tensor t;
  at::Tensor slots;  // int64 [B], with a delta
  at::Tensor mask;   // fp32 [B, 1, 1]; undefined: every row adapted
  // q (and k_new, v_new) as `parts` fp32 partials (SplitKProject; at most
  // kMaxStepParts): each tensor is partial 0, partial p lies p * part_stride
  // elements after it, and the value is their sum in order (parts 1: q
  // itself).
  int64_t parts = 1;
  int64_t part_stride = 0;
  // Optional, without k_new (a cross-attention step): k and v hold rows
  // packed end to end, row b's key j at token key_starts[b] + j (int32 [B]
  // on the device) of their token dimension, as GatherKeyRows reads them.
  at::Tensor key_starts;
  // Optional, with key_starts: row b's visible keys are its first
  // key_lens[b] (int32 [B] on the device), where the bias is exactly zero,
  // and the bias masks the rest; -1: not known (the bias decides). Only a
  // faster kernel follows from it (CrossKeyLengths makes it so).
  at::Tensor key_lens;
};
// Returns the context as Attention(q, k, v, bias, out_dtype) does for the
// inputs so updated (on CUDA one kernel, fused_kernels.h
// LaunchDecodeStepAttention; elsewhere, or where the kernel does not take
// the inputs, the ATen ops in that order: the same values up to the order
// of fp32 sums).
at::Tensor DecodeStepAttention(const DecodeStepInputs& step,
                               at::ScalarType out_dtype);
// The padded keys (or values) [B, H, S, D] of `kv` read through
// `key_starts` (DecodeStepInputs::key_starts): out[b, :, j] is token
// key_starts[b] + j of kv's token dimension, where kv [B, H, S, D] views
// B * S tokens laid out as CrossKvBuffer does (kv.stride(0) ==
// S * kv.stride(2)); tokens past the last are read as the last. For the
// paths the step kernel does not take.
at::Tensor GatherKeyRows(const at::Tensor& kv, const at::Tensor& key_starts);
// DecodeStepInputs::key_lens of a cross-attention bias [B, 1, 1, S] (fp32):
// row b's last visible key (bias above -1e30) + 1 where every key before
// it has a bias of exactly zero, else -1 (no visible key, or one masked or
// biased among them). A few device ops, no sync.
at::Tensor CrossKeyLengths(const at::Tensor& bias);
// True when LORAHUB_NO_CROSS_KEY_LENS=1 keeps cross-attention steps without
// key_lens (the step kernel then scans the bias; A/B). Read once.
bool CrossKeyLengthsOff();
// True when LORAHUB_NO_STAGED_SELF_STEP=1 keeps self-attention steps on the
// kernel that loads the cached keys after q and the LoRA sums
// (fused_kernels.h DecodeStepArgs::stage_self; A/B). Read once.
bool StagedSelfStepOff();
// True when DecodeStepAttention on CUDA sums a self-attention step's
// split-K partials of q, the new key and value (DecodeStepInputs::parts)
// for this cache and bias: an fp32 cache, or a bf16 one through the staged
// step (an fp32 bias; its lanes of 4 values). Elsewhere the projection
// stays whole (SelfAttentionStep).
bool DecodeStepSumsSelfParts(const at::Tensor& cache, const at::Tensor& bias);
// Writes x [B, H, 1, D] into the cache [B, H, C, D] at position t (int64 on
// the cache's device: [1], the same position for every row, or [B], row b at
// t[b]), rounded to the cache's dtype: DecodeStepAttention's store where the
// kernel does not run.
void StoreAtPositions(const at::Tensor& cache, const at::Tensor& t,
                      const at::Tensor& x);

// True unless LORAHUB_NO_STEP_ATTN=1 (read once; A/B) or the kernels are
// off or not compiled: the decoder then runs the expands, the store and the
// attention as separate ops.
bool DecodeStepAttentionEnabled();

// True when LORAHUB_DECODE_ATTN_GENERIC=1 sends single queries to
// GeneralAttention too. Read once.
bool DecodeAttentionGeneric();

// The dtype of decode-step self-attention caches off the step kernel
// (DecodeSelfKvDtype) and of cross-attention keys / values where
// DecodeCrossKvDtype defers to it, for a model computing in `compute`:
// fp32, or bf16 when compute is bf16 and LORAHUB_DECODE_ATTN_BF16=1 (read
// once; experimental, for an A/B). With bf16 keys and values SingleQueryAttention
// multiplies bf16 operands with fp32 accumulation and fp32 results (cuBLAS
// bmm with out_dtype fp32; products of two bf16 are exact in fp32, so the
// CPU fallback, fp32 bmm on the widened operands, is the same arithmetic):
// q is rounded to bf16, the scores, bias and softmax stay fp32, the
// probabilities are rounded to bf16 for probs . V, the context is fp32.
// What it rounds beyond the fp32 path: q, keys and values adapted in fp32
// (LoRA deltas), and the probabilities, each once to 2^-9 relative.
at::ScalarType DecodeKvDtype(at::ScalarType compute);

// The dtype of the decode-step self-attention cache of a model computing
// in `compute` on `device`: bf16 for a bf16 model on CUDA whose steps take
// the staged step kernel (DecodeStepAttentionEnabled, !StagedSelfStepOff),
// unless LORAHUB_DECODE_SELF_FP32=1 (read once; A/B); else DecodeKvDtype.
// What transformers' bf16 model stores: the new key and value rounded once
// (2^-9 relative), attended as stored, q, scores, softmax and
// probabilities fp32. Why: the cache is read whole by every step, 0.5 MB a
// position at 64 rows in fp32 (flan-t5-large), so later steps' attention
// moved toward its HBM bound (fortieth session: a self-attention call 5.81
// -> 7.35 us from position 0 to 27).
at::ScalarType DecodeSelfKvDtype(at::ScalarType compute,
                                 const c10::Device& device);

// The dtype of the cross-attention keys and values of decode steps on
// `device`: bf16 for a bf16 model on CUDA where single queries take the
// short-query kernel (fp32 q, scores, softmax and probabilities over the
// widened bf16 keys and values: what transformers' bf16 model stores, and
// nothing rounded beyond them), unless LORAHUB_DECODE_CROSS_FP32=1 (read
// once; A/B); else DecodeKvDtype. Why: they are written once per prompt
// but read by every step, 144 keys per row against at most the step count
// of the self-attention cache.
at::ScalarType DecodeCrossKvDtype(at::ScalarType compute,
                                  const c10::Device& device);

// The dtype of the per-row LoRA factors the decode kernels read (lora.h
// AttachRowKernelCopies) for a model computing in `compute` on `device`:
// bf16 for a bf16 model on CUDA where LoraRowDeltas runs, unless
// LORAHUB_ROW_LORA_FP32=1 (read once; A/B); else fp32 (no copies). The
// deltas' arithmetic stays fp32; the factors are rounded once (2^-9
// relative), as transformers' bf16 model stores them.
at::ScalarType RowKernelFactorDtype(at::ScalarType compute,
                                    const c10::Device& device);

// Whether banks for a model computing in `compute` on `device` also keep
// int8 copies of their factors for the decode steps' norm+shrink and
// step-attention kernels (lora.h SiteBank::a_int8): where the per-row
// kernels read bf16 copies (RowKernelFactorDtype), unless
// LORAHUB_ROW_LORA_BF16=1 (read once; A/B). Why: at batch 64 with 64
// distinct adapters every decode step reads every row's factors of every
// decoder attention (about 300 MB a step for flan-t5-large at r = 16 in
// bf16), and those reads are most of what per-row adapters cost; int8
// halves them. The rounding: each factor block of a slot and site scaled by
// its absolute maximum over 127 (QuantizeFactorsInt8), about 0.9% of a
// Gaussian block's spread against bf16's 0.2%, on the adapters' delta only.
bool RowKernelInt8(at::ScalarType compute, const c10::Device& device);

// One slot of one site to quantize (QuantizeFactorsInt8): the fp32 factor
// blocks a and b (contiguous) into a_q and b_q (int8, contiguous, the same
// element counts), and scale_out (one fp32 value) = lora_scale (one fp32
// value) * s_a * s_b, s = the block's largest |v| / 127.
struct Int8Quantization {
  at::Tensor a, b, a_q, b_q, lora_scale, scale_out;
};
// Jobs checked once and, on CUDA, their job table on the device, to be run
// any number of times (each run reads the factors as they are then). Why:
// the serving bank quantizes a slot's 144 sites at every adapter load on
// the engine thread; a kept table makes that one launch.
struct Int8QuantizationPlan {
  std::vector<Int8Quantization> jobs;
  at::Tensor device_table;  // undefined: ATen ops per job
};
// Throws c10::Error for malformed jobs.
Int8QuantizationPlan PlanInt8Quantization(std::vector<Int8Quantization> jobs);
// On CUDA one kernel launch (no host sync), else ATen ops per job. q =
// round-half-even(v / s), zeros for a block of zeros.
void RunInt8Quantization(const Int8QuantizationPlan& plan);
// Both, once.
void QuantizeFactorsInt8(std::vector<Int8Quantization> jobs);

// One output of WeightedSums: dst = sum_t weights[t] * terms[t], elementwise
// in fp32 in term order, each product and sum rounded (so the same bits on
// every device), stored in dst's dtype; `fill` without terms. dst and every
// term contiguous, fp32 or bf16, of dst's numel and device.
struct WeightedSum {
  at::Tensor dst;
  std::vector<at::Tensor> terms;
  std::vector<float> weights;  // one per term
  float fill = 0.f;
};

// Every sum of `sums`. On CUDA one kernel launch for all of them (plus the
// copy of its job table from pinned memory; no host sync), else ATen ops
// per sum. Why: a composition and its copy into the serving bank are a few
// hundred small tensors (2 x 144 factors for flan-t5-large), which cost
// more as separate ops on the engine thread than their bytes on the device.
// Throws c10::Error for malformed sums (nothing written then).
void WeightedSums(const std::vector<WeightedSum>& sums);

// One output of RunSliceSums: dst = sum_t weights[t] * terms[t][offset,
// offset + dst.numel()), as WeightedSum (fp32 arithmetic in term order, each
// product and sum rounded, stored in dst's dtype); `fill` where !summed.
struct SliceSum {
  at::Tensor dst;  // contiguous, fp32 or bf16
  int64_t offset = 0;
  bool summed = true;
  float fill = 0.f;
};
// Sums checked once and, on CUDA, their job table on the device, to be run
// with any buffers (RunSliceSums). Why: a composition of modules that each
// lie in one buffer, loaded straight into a serving slot, is 720 sums of
// slices of those buffers (flan-t5-large); made per load they held the
// engine thread ~0.5 ms (sixty-ninth session), while the slot's sums stay
// the same from load to load and only the buffers and weights change.
struct SliceSumPlan {
  std::vector<SliceSum> sums;
  int64_t max_end = 0;  // the largest offset + numel of a summed slice
  int64_t max_n = 0;    // the largest numel of a destination
  at::Tensor device_table;  // undefined: ATen ops per sum
};
// Throws c10::Error for malformed sums (a destination not contiguous fp32 or
// bf16, on other devices, a negative offset).
SliceSumPlan PlanSliceSums(std::vector<SliceSum> sums);
constexpr int kMaxSliceSumTerms = 32;
// Runs `plan` with `terms`: contiguous 1-D fp32 or bf16 buffers on the
// plan's device, at least plan.max_end long, at most kMaxSliceSumTerms,
// one weight each. On CUDA one kernel launch (no host sync, no upload),
// else ATen ops (WeightedSums of the slices): the same bits. Throws
// c10::Error for terms that do not fit (nothing written then).
void RunSliceSums(const SliceSumPlan& plan, const std::vector<at::Tensor>& terms,
                  const std::vector<float>& weights);

// One update of LowRankMerge: out = w + scale * (b a), the product in fp32,
// rounded once to out's dtype.
struct LowRankUpdate {
  at::Tensor w;    // [rows, cols], fp32 or bf16, contiguous
  at::Tensor out;  // like w; may be w itself (in place)
  at::Tensor a;    // [rank, cols], fp32, contiguous
  at::Tensor b;    // [rows, rank], fp32, contiguous
  float scale = 1.f;
};

// out[0, j] = sum_i w[0, i] * factors[i, j]: `factors` [N, n] bf16, w [1, N]
// and out [1, n] fp32, all contiguous on one CUDA device; fp32 fused
// multiply-adds in module order, in one kernel launch that reads w on the
// device (a CUDA graph may capture it). False, and nothing written, without
// the kernels (CPU, LORAHUB_NO_FUSED). Throws c10::Error for tensors
// that do not fit. Why: the merged objective composed its adapter from the
// fp32 module pool through cuBLAS's gemv, 125 us for 377 MB (flan-t5-large,
// 20 modules, r = 16 on q and v), and then rounds the merged weights to
// bf16 anyway; the bf16 pool is half the bytes.
bool ComposeFromBf16(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out);

// out = w factors: `factors` [N, n], w [C, N] and out [C, n] fp32, all
// contiguous on one CUDA device; each output an fp32 fused multiply-add
// chain over the modules in order, in one kernel launch that reads w on the
// device. False, and nothing written, without the kernels (CPU,
// LORAHUB_NO_FUSED, LORAHUB_COMPOSE_GEMM=1: A/B, read once) or where they
// do not take the shapes (N > 32, C N > 12288, n % 4 != 0, unaligned
// storage); the caller then multiplies. Throws c10::Error for tensors that
// do not fit. Why: a CMA-ES population's composition (ObjectiveRunner: 64
// candidates, flan-t5-large, 20 modules, r = 16 on q and v) writes 1.21 GB
// of fp32 factors; cuBLAS's SIMT GEMM for K = 20 took 696 us of a
// population pass, this kernel 560 us, every output the same bits (H100,
// sixty-second session; deploy/gpu/compose_bench.py: 722 against 580 us).
bool ComposeRows(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out);

// A fixed list of LowRankUpdates, all written by Run(). On CUDA (ranks up
// to kernels::kMaxLowRankMergeRank, cols % 4 == 0, 16-byte aligned rows) one
// kernel launch over a job table made once, at construction, so a CUDA
// graph can capture Run() and each replay reads the tensors' contents then;
// else ATen ops per update (whose fp32 sums may be ordered differently).
// Why: a composed adapter merged into a bf16 model's weights takes the LoRA
// GEMMs out of the forward pass (objective_runner.h).
//
// max_blocks > 0: the tensor-core kernel runs on at most that many blocks,
// each looping over tiles (the same outputs), so that a merge beside other
// work (the objective runner's decoder merge beside its encoder) leaves the
// rest of the device to that work; 0: a block a tile.
//
// Holds references to the tensors, which must keep their storage while the
// merge lives. Construction throws c10::Error for malformed updates.
// Thread-safety: Run() on one thread at a time.
class LowRankMerge {
 public:
  explicit LowRankMerge(std::vector<LowRankUpdate> updates, int max_blocks = 0);
  void Run() const;
  // True when Run() is the one kernel launch.
  bool fused() const { return table_.defined(); }
  // True when that kernel is the tensor-core one (every update bf16, its
  // rank a multiple of 4, its factors 16-byte aligned).
  bool tensor_cores() const { return tensor_cores_; }

 private:
  std::vector<LowRankUpdate> updates_;
  at::Tensor table_;  // the kernel's job table on the device
  int64_t max_tiles_ = 0;
  bool tensor_cores_ = false;
  int max_blocks_ = 0;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_FUSED_OPS_H_
