// The plain C interface of libsp_shim.so, the one place that touches
// SentencePiece.
//
// Why a separate shared library: Debian's libsentencepiece.so.0 carries its own
// protobuf 3.14 runtime and exports its symbols; linked into a process that
// also uses libprotobuf 3.21 (gRPC, LibTorch) it crashes at start-up or on the
// first model load. The shim links -lsentencepiece and is loaded with
// dlopen(RTLD_LOCAL | RTLD_DEEPBIND) so its protobuf copy stays private (see
// /work/shared/FACTS.md). Only ints, sizes and char buffers cross this line,
// so no C++ type from either protobuf leaks out.
//
// Conventions: functions that can fail return a negative value (or NULL) and
// write a NUL-terminated message into `err` (at most err_cap bytes, may be 0).
// Functions that fill a caller buffer return the number of elements the full
// result needs; when that is larger than `cap` nothing useful was written and
// the caller retries with a bigger buffer.
// Thread-safety: a handle may be used from several threads at once except in
// lh_sp_free (SentencePieceProcessor's const methods are thread-safe).
#ifndef LORAHUB_CORE_TOKENIZER_SP_SHIM_H_
#define LORAHUB_CORE_TOKENIZER_SP_SHIM_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bumped when any signature below changes; the loader refuses a mismatch.
#define LH_SP_ABI_VERSION 1

typedef struct lh_sp lh_sp;

int lh_sp_abi_version(void);

// Parses a serialized ModelProto (the bytes of spiece.model). Returns a handle
// owned by the caller (release with lh_sp_free) or NULL with `err` set.
lh_sp* lh_sp_load(const char* data, size_t size, char* err, size_t err_cap);
void lh_sp_free(lh_sp* sp);

// Number of pieces in the model (ids are 0 .. piece_size-1).
int lh_sp_piece_size(const lh_sp* sp);

// Encodes UTF-8 text (not NUL-terminated) to ids. Returns the id count, or -1.
long lh_sp_encode(const lh_sp* sp, const char* text, size_t text_len, int* ids,
                  size_t cap, char* err, size_t err_cap);

// Decodes ids (each must be in [0, piece_size)) to UTF-8 text. Returns the
// byte length of the text (no NUL is written), or -1.
long lh_sp_decode(const lh_sp* sp, const int* ids, size_t n, char* out,
                  size_t cap, char* err, size_t err_cap);

// The piece of `id`, byte length returned (no NUL), -1 if out of range.
long lh_sp_id_to_piece(const lh_sp* sp, int id, char* out, size_t cap);

// 1 if `id` is a control (e.g. <pad>, </s>) / the unknown piece, else 0
// (also 0 when out of range).
int lh_sp_is_control(const lh_sp* sp, int id);
int lh_sp_is_unknown(const lh_sp* sp, int id);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // LORAHUB_CORE_TOKENIZER_SP_SHIM_H_
