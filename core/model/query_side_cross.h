// The cross-attention of a teacher-forced decoder pass (t5_forward.h
// DecodeFull) computed from the query side, for a bf16 model on CUDA with
// few decoder positions per row (a CMA-ES population's scoring pass: 320
// rows of about 70 encoder tokens and 3 label tokens).
//
// The usual order projects every encoder token to keys and values for every
// block (K = X Wk^T, V = X Wv^T: a flan-t5-large population spent 3.5 ms of
// GEMMs and 2.4 ms of per-row value deltas on them) and then attends with
// few queries. Here the products are reassociated:
//   scores_h = q_h K_h^T = (q_h Wk_h) X^T,
//   context_h = P_h V_h = (P_h X) Wv_h^T + scale (P_h (X_full A^T)) B_h^T,
// so the encoder output X (bf16) is read, never projected, and the per-row
// value delta becomes a rank-r term after the softmax. The same real
// numbers; the GEMMs run on bf16 tensor cores with each fp32 operand split
// in two bf16 parts (fused_ops.h SplitBf16: about 2^-17 relative), so every
// product keeps about fp32 precision against the exact bf16 weights and X,
// as the fp32 keys, values and attention of the usual order do.
//
// Internal to core/model (t5_forward.cc). Holds references to the weights,
// the encoder output and the rows: it must not outlive them. Not
// thread-safe. Every call may throw c10::Error; none synchronises with the
// host (a CUDA graph may capture a pass).
#ifndef LORAHUB_CORE_MODEL_QUERY_SIDE_CROSS_H_
#define LORAHUB_CORE_MODEL_QUERY_SIDE_CROSS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/model/lora.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model::internal {

class QuerySideCross {
 public:
  // Null where it does not apply: not a bf16 model on CUDA with the fused
  // kernels, bf16 attention (AttentionDtype), adapted cross keys, per-row
  // value factors not fp32, LORAHUB_NO_QUERY_CROSS=1 or
  // LORAHUB_NO_GEMM_FLOAT=1 (A/B); or where it
  // would not pay: fewer than kMinQueries rows x positions, or more than
  // half the multiply-adds of the usual order (long decoder inputs, short
  // encoder outputs). `decoder_length`: T.
  // `biases` (optional): its cross_keys_twice and cross_values_twice are
  // read where defined (PrepareQuerySideWeights).
  static std::unique_ptr<QuerySideCross> Create(const T5Weights& w,
                                                const EncoderOutput& enc,
                                                const RowAdapters& rows,
                                                int64_t decoder_length,
                                                const PassBiases* biases = nullptr);

  // Decoder block `block`'s attention context [B, H, T, d_kv] fp32 for its
  // queries q [B, H, T, d_kv] fp32 (with their LoRA deltas), as
  // fused_ops.h Attention gives it before the output projection.
  at::Tensor Context(int64_t block, const at::Tensor& q);

  static constexpr int64_t kMinQueries = 256;

 private:
  QuerySideCross(const T5Weights& w, const EncoderOutput& enc,
                 const RowAdapters& rows, const PassBiases* biases);
  // Block i's keys' weight twice along its input rows, [H, 2 d_kv, d_model],
  // and its values' twice along the input, [H, 2 d_model, d_kv] (views).
  at::Tensor KeysTwice(int64_t block) const;
  at::Tensor ValuesTwice(int64_t block) const;

  const T5Weights& w_;
  const RowAdapters& rows_;
  at::Tensor x_;       // [B, S, D] bf16: the encoder output
  at::Tensor x_twice_;  // [B, 2S, D] bf16: x_ twice along the keys
  at::Tensor bias_;    // [B, S] fp32: the padding mask
  at::Tensor k_twice_;  // [L, H, 2 d_kv, D] bf16, or undefined (per block)
  at::Tensor v_twice_;  // [L, inner, 2D] bf16, or undefined (per block)
  // Per block with an adapted cross v: x_full A^T [B, S, r] fp32 and the
  // rows' scalings [B] fp32 (undefined elsewhere).
  std::vector<at::Tensor> xa_;
  std::vector<at::Tensor> row_scale_;
};

// Tests: -1 (default) as above, 0 never, 1 wherever the model is bf16 with
// fp32 attention and the adapters qualify, also where it would not pay and
// off CUDA (then its steps run as ATen ops: the same arithmetic, slower).
void SetQuerySideCrossForTesting(int value);

// Sets biases->cross_keys_twice and cross_values_twice for passes of
// `rows_times_positions` decoder queries over `w` where QuerySideCross may
// run (a bf16 model on CUDA with fused cross keys and values, enough
// queries); else leaves them undefined. The caller promises that w's
// weights do not change while `biases` is in use. May throw c10::Error.
void PrepareQuerySideWeights(const T5Weights& w, int64_t rows_times_positions,
                             PassBiases* biases);

}  // namespace lorahub::model::internal

#endif  // LORAHUB_CORE_MODEL_QUERY_SIDE_CROSS_H_
