// The tensor-core attention's kernels for bf16 keys and values (12 key
// counts; mma_attention.cuh says why they have a file of their own).
#include "core/model/mma_attention.cuh"

namespace lorahub::model::kernels::mma_attention {

LORAHUB_MMA_ATTENTION_LAUNCHES(/* defined here */, __nv_bfloat16);

}  // namespace lorahub::model::kernels::mma_attention
