// The bytes of libsp_shim.so, compiled in by the `sp_shim_embed` genrule
// (core/tokenizer/BUILD). Used only by sp_shim_loader.cc.
#ifndef LORAHUB_CORE_TOKENIZER_SP_SHIM_EMBED_H_
#define LORAHUB_CORE_TOKENIZER_SP_SHIM_EMBED_H_

#include <cstddef>

namespace lorahub::tokenizer::internal {

extern const unsigned char kSpShimBytes[];
extern const std::size_t kSpShimSize;

}  // namespace lorahub::tokenizer::internal

#endif  // LORAHUB_CORE_TOKENIZER_SP_SHIM_EMBED_H_
