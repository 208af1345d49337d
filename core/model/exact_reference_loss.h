// The "exact reference" numerics mode: the LoraHub reference loss of ONE
// composed adapter computed with the ATen operations that transformers 5.17 +
// PEFT 0.21 run for `Ref.score(w)` (bench/ref_lorahub.py), in their order,
// with their shapes, strides and scalar arguments. On the LibTorch build that
// the Python reference uses (torch 2.11 on the GPU host) the same kernels then
// run on the same operands, so the scores are bit-identical to the
// reference's and a deterministic optimizer (COBYLA) follows the reference's
// path. Our fast engine (t5_forward.h) fuses GEMMs and kernels and differs by
// ~1e-8 relative, which a chaotic 40-step search amplifies.
//
// The op sequence mirrored (fp32 only):
//   composition  for module i = 0..N-1, for each factor k of module 0's
//                state dict: final[k] = w[0] * sd[0][k] (i == 0) or
//                final[k] + w[i] * sd[i][k] (at::mul with a double scalar,
//                at::add); scaling of module 0 (the PeftModel's).
//   linear       at::linear(x, W) (no bias); with LoRA:
//                result + linear(linear(x, A), B) * scaling.
//   layer norm   x * rsqrt(mean(x^2, -1, keepdim) + eps), then weight * that.
//   attention    q/k/v linear, view(B, L, -1, d_kv).transpose(1, 2); in the
//                decoder k and v go through DynamicCache (cat with an empty
//                tensor: contiguous copies); position bias as T5's
//                compute_bias (bucket ops, embedding, permute(2, 0, 1),
//                unsqueeze(0)); attn_mask = where(bool mask, bias, finfo.min)
//                as transformers' create_position_bias_mask (the bias itself
//                when the batch has no padding; in decoder self-attention the
//                mask is the arange causal one, none for a single query);
//                at::scaled_dot_product_attention(q, k, v, attn_mask, 0,
//                false, scale 1.0); transpose(1, 2).contiguous(), reshape, o.
//   feed forward gated: act(wi_0 x) * (wi_1 x), then wo; gelu_new as
//                transformers' NewGELUActivation (mul, pow 3.0, mul, add,
//                mul, tanh, add, mul).
//   loss         lm_head linear (d_model^-0.5 first when
//                scale_decoder_outputs), at::cross_entropy_loss(logits
//                [-1, V], labels [-1], mean, ignore -100).
// Batches as the reference: examples in order, `batch_size` per batch (<= 0:
// all), inputs padded to the batch's longest with pad_token_id, labels padded
// with -100 (a label token equal to pad_token_id is -100 too), decoder inputs
// the labels shifted right. Loss = sum over batches of float(batch mean) in
// double, divided by the number of examples.
//
// Debugging: with the environment variable LORAHUB_EXACT_TRACE=<file> every
// major intermediate (the composed factors, then the forward's) is appended
// to <file> as "name<TAB>[shape]/[strides]<TAB>sum<TAB>abs-sum" (float64
// sums, %.17g), like the last column of deploy/gpu/ref_op_trace.py's op
// traces; deploy/gpu/compare_exact_trace.py finds the first one that no
// reference op reproduces. Unset, the cost is one pointer test per
// intermediate (and one getenv per batch).
//
// Slow by design (one candidate at a time, no fusion); thread-compatible:
// concurrent calls on distinct inputs are fine (weights are only read).
#ifndef LORAHUB_CORE_MODEL_EXACT_REFERENCE_LOSS_H_
#define LORAHUB_CORE_MODEL_EXACT_REFERENCE_LOSS_H_

#include <vector>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

// The composed adapter of `modules` (same sites and ranks, else
// InvalidArgument) with one weight each, in the reference's operation order
// (see above). Factors are fp32 on the modules' device; scaling per site is
// module 0's. InvalidArgument on a count mismatch or no modules.
absl::StatusOr<LoraAdapter> ComposeExactReference(
    const std::vector<const LoraAdapter*>& modules,
    const std::vector<double>& weights);

// The mean token cross-entropy of one batch (transformers' loss, fp32) for
// `adapter` (nullptr: the base model). InvalidArgument if `weights` is not
// fp32, an example is empty or has an id outside the vocabulary, or the
// activation is not relu / gelu / gelu_new; Internal on a LibTorch error.
absl::StatusOr<float> ExactReferenceBatchLoss(const T5Weights& weights,
                                              const LoraAdapter* adapter,
                                              const std::vector<Example>& batch);

// The reference loss over all examples: batches of `batch_size` (<= 0: one
// batch), sum of the batch losses (each rounded to float as torch returns
// it, accumulated in double), divided by the number of examples.
absl::StatusOr<double> ExactReferenceLoss(const T5Weights& weights,
                                          const LoraAdapter* adapter,
                                          const std::vector<Example>& examples,
                                          int batch_size);

// The reference's score: loss + 0.05 * sum(|w|) / len(w) evaluated left to
// right as Python does ((0.05 * sum) / len); `regularization` replaces 0.05.
double ExactReferenceScore(double loss, const std::vector<double>& weights,
                           double regularization = 0.05);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_EXACT_REFERENCE_LOSS_H_
