// RegisterTiledAttentionKernel's bf16 instantiations in blocks of 16 rows
// (register_tiled_attention.cuh says why they have a file of their own).
#include "core/model/register_tiled_attention.cuh"

namespace lorahub::model::kernels::register_tiled {

LORAHUB_REGISTER_TILED_LAUNCHES(/* defined here */, __nv_bfloat16, 16);

}  // namespace lorahub::model::kernels::register_tiled
