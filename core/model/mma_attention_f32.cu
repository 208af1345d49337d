// The tensor-core attention's kernels for fp32 keys and values (12 key
// counts; mma_attention.cuh says why they have a file of their own).
#include "core/model/mma_attention.cuh"

namespace lorahub::model::kernels::mma_attention {

LORAHUB_MMA_ATTENTION_LAUNCHES(/* defined here */, float);

}  // namespace lorahub::model::kernels::mma_attention
