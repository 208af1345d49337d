// How far cuBLASLt's first heuristic choice is from its fastest algorithm on
// the weight GEMMs of flan-t5-large that the engine runs: y[M, N] = x[M, K]
// W[N, K]^T, bf16 operands, fp32 accumulation, bf16 or fp32 output. Why: in
// the objective evaluation 242 such GEMMs take about 1.5 of 2.9 ms, the
// decoder's (M = 15) 4.2-6.4 us each for 2-11 MB of weights; a decode step of
// 64 rows runs 144 of them. LibTorch calls cuBLAS with its default heuristic;
// this says what choosing per shape (autotuning) could gain before any code
// in the engine does it.
//
//   nvcc -std=c++17 -arch=sm_90 -O3 deploy/gpu/gemm_algo_bench.cu -lcublasLt -o /tmp/gemm_algo \
//     && /tmp/gemm_algo
//
// Per shape: up to kAlgos algorithms from cublasLtMatmulAlgoGetHeuristic (in
// its order), each timed as a CUDA graph of kReps GEMMs over kCopies distinct
// weight copies (so that, as in the model, weights come from HBM rather than
// L2), after one warm-up replay. Prints the heuristic's first choice, the
// fastest and its rank, in microseconds per GEMM.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kAlgos = 32;
constexpr int kReps = 96;
constexpr int kCopies = 24;  // 24 x 11.5 MB (wi_01) > the H200's 50 MB L2
constexpr size_t kWorkspace = 32u << 20;

#define CHECK_CUDA(x)                                                     \
  do {                                                                    \
    cudaError_t e = (x);                                                  \
    if (e != cudaSuccess) {                                               \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__,              \
                   cudaGetErrorString(e));                                \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)
#define CHECK_LT(x)                                                       \
  do {                                                                    \
    cublasStatus_t lt_status = (x);                                       \
    if (lt_status != CUBLAS_STATUS_SUCCESS) {                             \
      std::fprintf(stderr, "%s:%d cublasLt status %d\n", __FILE__,        \
                   __LINE__, static_cast<int>(lt_status));                \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)

struct Shape {
  const char* what;
  int m, n, k;
  bool fp32_out;
};

__global__ void Fill(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    p[i] = __float2bfloat16((static_cast<int>(h & 1023) - 512) / 4096.0f);
  }
}

// Microseconds per GEMM of `algo` (negative: the algorithm failed).
float TimeAlgo(cublasLtHandle_t lt, cublasLtMatmulDesc_t op,
               cublasLtMatrixLayout_t a_layout, cublasLtMatrixLayout_t b_layout,
               cublasLtMatrixLayout_t c_layout, const cublasLtMatmulAlgo_t* algo,
               const std::vector<__nv_bfloat16*>& weights, const __nv_bfloat16* x,
               void* y, void* workspace, cudaStream_t stream) {
  const float alpha = 1.f, beta = 0.f;
  cudaGraph_t graph;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  for (int i = 0; i < kReps && status == CUBLAS_STATUS_SUCCESS; ++i) {
    // Column-major: y^T [N, M] = W [K, N]^T x^T [K, M].
    status = cublasLtMatmul(lt, op, &alpha, weights[i % weights.size()], a_layout, x,
                            b_layout, &beta, y, c_layout, y, c_layout, algo, workspace,
                            kWorkspace, stream);
  }
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  if (status != CUBLAS_STATUS_SUCCESS) {
    CHECK_CUDA(cudaGraphDestroy(graph));
    return -1.f;
  }
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));  // warm-up
  float best = 1e30f;
  for (int round = 0; round < 3; ++round) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    best = ms < best ? ms : best;
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  return 1e3f * best / kReps;
}

}  // namespace

int main() {
  const Shape shapes[] = {
      {"dec qkv", 15, 3072, 1024, true},   {"dec o", 15, 1024, 1024, false},
      {"dec wi01", 15, 5632, 1024, false}, {"dec wo", 15, 1024, 2816, false},
      {"dec o f32", 15, 1024, 1024, true}, {"step qkv", 64, 3072, 1024, true},
      {"step o", 64, 1024, 1024, false},   {"step wi01", 64, 5632, 1024, false},
      {"step wo", 64, 1024, 2816, false},  {"enc qkv", 360, 3072, 1024, true},
      {"enc o", 360, 1024, 1024, false},   {"enc wi01", 360, 5632, 1024, false},
      {"enc wo", 360, 1024, 2816, false},
  };
  cublasLtHandle_t lt;
  CHECK_LT(cublasLtCreate(&lt));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  void* workspace;
  CHECK_CUDA(cudaMalloc(&workspace, kWorkspace));
  std::printf("%-10s %4s %5s %5s %4s | %9s | %9s %4s | %6s | %s\n", "shape", "M", "N", "K", "out",
              "heur0 us", "best us", "rank", "gain", "algos ok");
  double total_heur = 0, total_best = 0;
  for (const Shape& s : shapes) {
    std::vector<__nv_bfloat16*> weights(kCopies);
    for (auto& w : weights) {
      CHECK_CUDA(cudaMalloc(&w, sizeof(__nv_bfloat16) * s.n * s.k));
      Fill<<<264, 256, 0, stream>>>(w, static_cast<size_t>(s.n) * s.k, 17u);
    }
    __nv_bfloat16* x;
    void* y;
    CHECK_CUDA(cudaMalloc(&x, sizeof(__nv_bfloat16) * s.m * s.k));
    CHECK_CUDA(cudaMalloc(&y, sizeof(float) * s.m * s.n));
    Fill<<<264, 256, 0, stream>>>(x, static_cast<size_t>(s.m) * s.k, 5u);
    CHECK_CUDA(cudaStreamSynchronize(stream));

    const cudaDataType_t out_type = s.fp32_out ? CUDA_R_32F : CUDA_R_16BF;
    cublasLtMatmulDesc_t op;
    CHECK_LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
    CHECK_LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                            sizeof(trans_a)));
    CHECK_LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                            sizeof(trans_b)));
    cublasLtMatrixLayout_t a_layout, b_layout, c_layout;
    CHECK_LT(cublasLtMatrixLayoutCreate(&a_layout, CUDA_R_16BF, s.k, s.n, s.k));
    CHECK_LT(cublasLtMatrixLayoutCreate(&b_layout, CUDA_R_16BF, s.k, s.m, s.k));
    CHECK_LT(cublasLtMatrixLayoutCreate(&c_layout, out_type, s.n, s.m, s.n));
    cublasLtMatmulPreference_t pref;
    CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = kWorkspace;
    CHECK_LT(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t results[kAlgos];
    int found = 0;
    CHECK_LT(cublasLtMatmulAlgoGetHeuristic(lt, op, a_layout, b_layout, c_layout, c_layout,
                                            pref, kAlgos, results, &found));
    float heur0 = -1.f, best = 1e30f;
    int best_rank = -1, ok = 0;
    for (int i = 0; i < found; ++i) {
      const float us = TimeAlgo(lt, op, a_layout, b_layout, c_layout, &results[i].algo,
                                weights, x, y, workspace, stream);
      if (i == 0) heur0 = us;
      if (us > 0) {
        ++ok;
        if (us < best) {
          best = us;
          best_rank = i;
        }
      }
    }
    std::printf("%-10s %4d %5d %5d %4s | %9.2f | %9.2f %4d | %5.1f%% | %d of %d\n", s.what, s.m,
                s.n, s.k, s.fp32_out ? "f32" : "bf16", heur0, best, best_rank,
                100.0 * (heur0 - best) / heur0, ok, found);
    if (heur0 > 0) {
      total_heur += heur0;
      total_best += best;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(a_layout);
    cublasLtMatrixLayoutDestroy(b_layout);
    cublasLtMatrixLayoutDestroy(c_layout);
    cublasLtMatmulDescDestroy(op);
    for (auto* w : weights) CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
  }
  std::printf("sum of one of each: heuristic %.2f us, best %.2f us\n", total_heur, total_best);
  CHECK_CUDA(cudaFree(workspace));
  cublasLtDestroy(lt);
  return 0;
}
