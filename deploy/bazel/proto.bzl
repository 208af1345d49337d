"""C++ code generation for .proto files with the system protoc and grpc_cpp_plugin."""

def lorahub_cc_grpc_library(name, srcs, deps = []):
    """cc_library `name` with the messages and gRPC stubs of `srcs`.

    srcs are paths relative to the calling package (which is the proto import
    root), e.g. "lorahub/v1/info.proto"; include the generated headers as
    "lorahub/v1/info.pb.h" and "lorahub/v1/info.grpc.pb.h".
    """
    outs = []
    for src in srcs:
        stem = src[:-len(".proto")]
        outs += [stem + ".pb.h", stem + ".pb.cc", stem + ".grpc.pb.h", stem + ".grpc.pb.cc"]
    native.genrule(
        name = name + "_gen",
        srcs = srcs,
        outs = outs,
        cmd = ("/usr/bin/protoc -I%s " % native.package_name() +
               "--cpp_out=$(RULEDIR) --grpc_out=$(RULEDIR) " +
               "--plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin $(SRCS)"),
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        includes = ["."],
        deps = deps + ["@grpc//:grpc++", "@protobuf"],
    )
