# Where the libraries come from. Two set-ups:
#  * Debian 12 with the -dev packages installed (deploy/setup_debian.sh): the
#    default search paths find everything; LibTorch is Debian's CPU 1.13.
#  * The GPU host: LORAHUB_DEPS_PREFIX is a directory into which
#    deploy/gpu/build_and_test.sh unpacked Debian 12 .deb files with dpkg -x;
#    LibTorch is the CUDA one of the installed PyTorch (CMAKE_PREFIX_PATH =
#    torch.utils.cmake_prefix_path).
# The system-library targets themselves (@absl, @grpc//:grpc++, ...) are
# generated from deploy/bazel/*.BUILD into targets.cmake as their linkopts;
# LORAHUB_OVERRIDE_<cmake name> replaces one with a CMake target.

set(LORAHUB_DEPS_PREFIX "" CACHE PATH
    "Root of dpkg -x unpacked Debian 12 packages (empty: use the system's)")

if(LORAHUB_DEPS_PREFIX)
  get_filename_component(LORAHUB_DEPS_PREFIX "${LORAHUB_DEPS_PREFIX}" ABSOLUTE)
  set(_lh_inc "${LORAHUB_DEPS_PREFIX}/usr/include")
  set(_lh_libdirs "${LORAHUB_DEPS_PREFIX}/usr/lib/x86_64-linux-gnu"
                  "${LORAHUB_DEPS_PREFIX}/lib/x86_64-linux-gnu")
  if(NOT EXISTS "${_lh_inc}/grpcpp/grpcpp.h")
    message(FATAL_ERROR "LORAHUB_DEPS_PREFIX=${LORAHUB_DEPS_PREFIX} has no usr/include/grpcpp")
  endif()
  # BEFORE: the prefix's headers must win over any copy elsewhere (Debian's
  # Abseil uses its own inline namespace, protobuf headers must match 3.21).
  include_directories(BEFORE SYSTEM "${_lh_inc}" "${_lh_inc}/x86_64-linux-gnu")
  link_directories(BEFORE ${_lh_libdirs})
  # DT_RPATH (not RUNPATH) so that the libraries' own dependencies (libgrpc's
  # libabsl_*, libre2, ...) are also found in the prefix.
  set(CMAKE_BUILD_RPATH ${_lh_libdirs})
  add_link_options("LINKER:--disable-new-dtags")
  list(PREPEND CMAKE_PROGRAM_PATH "${LORAHUB_DEPS_PREFIX}/usr/bin")
  # protoc and grpc_cpp_plugin from the prefix need its libraries.
  string(JOIN ":" _lh_ldpath ${_lh_libdirs})
  set(LORAHUB_TOOL_ENV "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${_lh_ldpath}")
  message(STATUS "lorahub: libraries from ${LORAHUB_DEPS_PREFIX}")
else()
  set(LORAHUB_TOOL_ENV "")
endif()

find_program(LORAHUB_PROTOC protoc REQUIRED)
find_program(LORAHUB_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
find_program(LORAHUB_PYTHON3 NAMES python3 REQUIRED)
message(STATUS "lorahub: protoc ${LORAHUB_PROTOC}, plugin ${LORAHUB_GRPC_CPP_PLUGIN}")

# LibTorch: find_package(Torch) (CUDA build on the GPU host, Debian's CPU
# build here); a plain -l fallback if no TorchConfig.cmake is found.
option(LORAHUB_REQUIRE_TORCH "Fail unless find_package(Torch) succeeds" OFF)
if(LORAHUB_REQUIRE_TORCH)
  find_package(Torch REQUIRED)
else()
  find_package(Torch QUIET)
endif()
add_library(lorahub_torch INTERFACE)
if(Torch_FOUND)
  target_link_libraries(lorahub_torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(lorahub_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
  message(STATUS "lorahub: LibTorch from ${Torch_DIR}")
else()
  target_link_libraries(lorahub_torch INTERFACE -ltorch -ltorch_cpu -lc10)
  target_include_directories(lorahub_torch SYSTEM INTERFACE /usr/include/torch/csrc/api/include)
  message(STATUS "lorahub: no TorchConfig.cmake, linking -ltorch -ltorch_cpu -lc10")
endif()
set(LORAHUB_OVERRIDE_ext_libtorch_libtorch lorahub_torch)

# CUDA-only sources (README.md): compiled when LibTorch has CUDA. AUTO looks
# for libtorch_cuda next to the LibTorch found above; ON/OFF force it.
set(LORAHUB_CUDA AUTO CACHE STRING "Compile the CUDA-only sources: AUTO, ON or OFF")
set(LORAHUB_CUDA_ENABLED OFF)
# What a CUDA-only source that cannot be used costs: with AUTO a warning (the
# target keeps its CPU sources); with ON a configure error, so that a GPU
# build never runs the CPU stubs unnoticed.
set(LORAHUB_CUDA_FALLBACK WARNING)
if(LORAHUB_CUDA STREQUAL "ON")
  set(LORAHUB_CUDA_FALLBACK FATAL_ERROR)
endif()
if(LORAHUB_CUDA STREQUAL "AUTO")
  if(Torch_FOUND AND (TARGET torch_cuda OR "${TORCH_LIBRARIES}" MATCHES "torch_cuda"
                      OR EXISTS "${TORCH_INSTALL_PREFIX}/lib/libtorch_cuda.so"))
    set(LORAHUB_CUDA_ENABLED ON)
  endif()
elseif(LORAHUB_CUDA)
  set(LORAHUB_CUDA_ENABLED ON)
endif()
if(LORAHUB_CUDA_ENABLED)
  # The CUDA sources include cuda_runtime_api.h and call the runtime directly.
  find_package(CUDAToolkit QUIET)
  if(TARGET CUDA::cudart)
    target_link_libraries(lorahub_torch INTERFACE CUDA::cudart)
  endif()
  # Probe the CUDA graph API of this LibTorch (it changed across versions) by compiling a
  # snippet, so that an API mismatch turns the CUDA-only sources off (their CPU stubs make
  # callers run eagerly) instead of breaking the build.
  set(_lh_probe_dir "${CMAKE_BINARY_DIR}/cuda_graph_probe")
  set(_lh_probe_head "#include <ATen/ATen.h>\n#include <ATen/cuda/CUDAGraph.h>\n#include <c10/cuda/CUDAGuard.h>\n#include <c10/cuda/CUDAStream.h>\n#include <cuda_runtime_api.h>\nvoid f(at::cuda::CUDAGraph& g, c10::Device d) {\n  c10::cuda::CUDAGuard guard(d);\n  c10::cuda::CUDAStream s = c10::cuda::getStreamFromPool(false, d.index());\n  c10::cuda::CUDAStreamGuard sg(s);\n  s.synchronize();\n")
  set(_lh_probe_tail "  g.capture_end();\n  g.replay();\n  (void)cudaDeviceSynchronize();\n  (void)cudaGetLastError();\n}\n")
  file(WRITE "${_lh_probe_dir}/mode.cc" "${_lh_probe_head}  g.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);\n${_lh_probe_tail}")
  file(WRITE "${_lh_probe_dir}/plain.cc" "${_lh_probe_head}  g.capture_begin();\n${_lh_probe_tail}")
  set(_lh_probe_inc ${TORCH_INCLUDE_DIRS} ${CUDAToolkit_INCLUDE_DIRS})
  set(_lh_saved_type "${CMAKE_TRY_COMPILE_TARGET_TYPE}")
  set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)  # compile only
  foreach(_lh_variant mode plain)
    try_compile(_lh_probe_${_lh_variant} "${_lh_probe_dir}/build_${_lh_variant}"
                SOURCES "${_lh_probe_dir}/${_lh_variant}.cc"
                CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${_lh_probe_inc}"
                CXX_STANDARD 17
                OUTPUT_VARIABLE _lh_probe_out_${_lh_variant})
  endforeach()
  set(CMAKE_TRY_COMPILE_TARGET_TYPE "${_lh_saved_type}")
  # What rules.cmake compiles each CUDA-only source with, to check it before using it.
  set(LORAHUB_CUDA_PROBE_INCLUDES "${SRC}" "${GEN}" ${_lh_probe_inc})
  if(LORAHUB_DEPS_PREFIX)
    list(PREPEND LORAHUB_CUDA_PROBE_INCLUDES "${_lh_inc}" "${_lh_inc}/x86_64-linux-gnu")
  endif()
  set(LORAHUB_CUDA_PROBE_DEFINES "")
  if(_lh_probe_mode)
    add_compile_definitions(LORAHUB_CUDA_GRAPH_CAPTURE_MODE=1)
    set(LORAHUB_CUDA_PROBE_DEFINES "-DLORAHUB_CUDA_GRAPH_CAPTURE_MODE=1")
  elseif(NOT _lh_probe_plain)
    message(${LORAHUB_CUDA_FALLBACK} "lorahub: the CUDA graph API probe did not compile; "
            "CUDA-only sources OFF (objective runs eagerly). Output:\n${_lh_probe_out_plain}")
    set(LORAHUB_CUDA_ENABLED OFF)
  endif()
endif()
# Hand-written kernels (.cu among the CUDA-only sources) need nvcc; without
# one, the targets holding them keep their CPU sources (rules.cmake).
set(LORAHUB_NVCC OFF)
set(LORAHUB_CUDA_ARCHITECTURES 90 CACHE STRING "GPU architectures of the kernels (H100/H200: 90)")
if(LORAHUB_CUDA_ENABLED)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # Torch's CMake config may leave this OFF (nvcc's default, JIT-compiled PTX).
    if(NOT CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "OFF")
      set(CMAKE_CUDA_ARCHITECTURES ${LORAHUB_CUDA_ARCHITECTURES})
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 17)
    string(APPEND CMAKE_CUDA_FLAGS " -O3")
    set(LORAHUB_NVCC ON)
  endif()
endif()
message(STATUS "lorahub: CUDA-only sources ${LORAHUB_CUDA_ENABLED} (LORAHUB_CUDA=${LORAHUB_CUDA}), "
        "nvcc ${LORAHUB_NVCC} (${CMAKE_CUDA_COMPILER}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
