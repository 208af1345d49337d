#!/usr/bin/env python3
"""Proves deploy/cmake/sync_check.py notices every way the builds drift apart.

Each test writes a small Bazel workspace into a temporary directory, generates
its targets.cmake, then changes one thing (a source, a test, a hand edit...)
and expects the check to fail, naming what changed.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

SCRIPT = os.path.abspath("deploy/cmake/sync_check.py")

FILES = {
    "WORKSPACE": """
        workspace(name = "mini")
        [new_local_repository(name = n, path = "/usr/include", build_file = "//deploy/bazel:%s.BUILD" % n)
         for n in ["absl"]]
    """,
    "deploy/bazel/BUILD": 'exports_files(glob(["*.BUILD"]))\n',
    "deploy/bazel/absl.BUILD": 'cc_library(name = "absl", linkopts = ["-labsl_base"])\n',
    "deploy/bazel/proto.bzl": """
        def lorahub_cc_grpc_library(name, srcs, deps = []):
            native.genrule(name = name + "_gen", srcs = srcs, outs = ["x.pb.cc"], cmd = "protoc")
    """,
    "deploy/cmake/CMakeLists.txt": 'include("${CMAKE_CURRENT_LIST_DIR}/targets.cmake")\n',
    "lib/BUILD": """
        cc_library(
            name = "a",
            srcs = ["a.cc"],
            hdrs = glob(["*.h"]),
            deps = ["@absl"],
            copts = select({"//conditions:default": ["-DLIB_A"]}),
        )
        cc_binary(name = "tool", srcs = ["tool.cc"], deps = [":a"])
    """,
    "lib/a.cc": "int a() { return 1; }\n",
    "lib/a.h": "int a();\n",
    "lib/tool.cc": "int main() {}\n",
    "proto/BUILD": """
        load("//deploy/bazel:proto.bzl", "lorahub_cc_grpc_library")
        lorahub_cc_grpc_library(name = "api_cc", srcs = ["v1/api.proto"])
    """,
    "proto/v1/api.proto": 'syntax = "proto3";\n',
    "tests/BUILD": """
        cc_test(
            name = "a_test",
            srcs = ["a_test.cc"],
            deps = ["//lib:a", "//proto:api_cc"],
            args = ["$(rootpath //lib:tool)", "tests/data"],
            data = ["//lib:tool"],
            size = "small",
        )
    """,
    "tests/a_test.cc": "int main() {}\n",
}


class SyncCheckTest(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        for path, text in FILES.items():
            self.write(path, textwrap.dedent(text).lstrip("\n"))
        rc, out = self.run_check("--write")
        self.assertEqual(rc, 0, out)
        self.targets = self.read("deploy/cmake/targets.cmake")

    def tearDown(self):
        shutil.rmtree(self.root)

    def write(self, path, text):
        full = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)

    def read(self, path):
        with open(os.path.join(self.root, path)) as f:
            return f.read()

    def run_check(self, *args):
        p = subprocess.run([sys.executable, SCRIPT, "--root", self.root] + list(args),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
        return p.returncode, p.stdout

    def assert_out_of_step(self, *needles):
        rc, out = self.run_check()
        self.assertEqual(rc, 1, out)
        self.assertIn("out of step", out)
        for n in needles:
            self.assertIn(n, out)

    def test_fresh_file_passes(self):
        rc, out = self.run_check()
        self.assertEqual(rc, 0, out)
        self.assertIn("OK", out)

    def test_generated_file_translates_the_build_files(self):
        t = self.targets
        self.assertIn("${SRC}/lib/a.cc", t)
        self.assertIn("${SRC}/lib/a.h", t)           # from glob()
        self.assertIn("-DLIB_A", t)                  # select() default branch
        self.assertIn("-labsl_base", t)              # the external repository
        self.assertIn("TEST_NAME //tests:a_test", t)
        self.assertIn("$<TARGET_FILE:lib_tool>", t)  # $(rootpath //lib:tool)
        self.assertIn("lorahub_cc_grpc_library(proto_api_cc", t)
        self.assertIn("v1/api.proto", t)

    def add_cuda_library(self, extra_branch=""):
        self.write("deploy/cmake/BUILD", 'config_setting(name = "cuda", '
                   'define_values = {"lorahub_cuda": "1"})\n')
        self.write("lib/g_stub.cc", "int g() { return 0; }\n")
        self.write("lib/g_cuda.cc", "int g() { return 1; }\n")
        self.write("lib/BUILD", self.read("lib/BUILD") + textwrap.dedent("""
            cc_library(
                name = "g",
                srcs = ["g_common.h"] + select({
                    "//deploy/cmake:cuda": ["g_cuda.cc"],
                    %s"//conditions:default": ["g_stub.cc"],
                }),
            )
        """ % extra_branch))
        self.write("lib/g_common.h", "int g();\n")

    def test_cuda_only_sources_replace_the_stub(self):
        self.add_cuda_library()
        rc, out = self.run_check("--write")
        self.assertEqual(rc, 0, out)
        self.assertNotIn("is in no Bazel target", out)  # the CUDA branch counts as used
        t = self.read("deploy/cmake/targets.cmake")
        block = t[t.index("lorahub_cc_library(lib_g"):]
        block = block[:block.index(")")]
        self.assertIn("  SRCS\n    ${SRC}/lib/g_common.h\n", block)
        self.assertIn("  CPU_SRCS\n    ${SRC}/lib/g_stub.cc\n", block)
        self.assertIn("  CUDA_SRCS\n    ${SRC}/lib/g_cuda.cc\n", block)
        # Dropping the CUDA source from the BUILD file puts the builds out of step.
        self.write("lib/BUILD", self.read("lib/BUILD").replace('["g_cuda.cc"]', '[]'))
        self.assert_out_of_step("-    ${SRC}/lib/g_cuda.cc")

    def test_cuda_select_with_other_conditions_is_an_error(self):
        self.add_cuda_library('"//lib:other": ["g_cuda.cc"],\n                    ')
        rc, out = self.run_check("--write")
        self.assertEqual(rc, 2, out)
        self.assertIn("may only have that condition", out)

    def test_source_added_to_bazel_only(self):
        self.write("lib/b.cc", "int b() { return 2; }\n")
        self.write("lib/BUILD", self.read("lib/BUILD").replace('["a.cc"]', '["a.cc", "b.cc"]'))
        self.assert_out_of_step("+    ${SRC}/lib/b.cc")

    def test_header_picked_up_by_glob(self):
        self.write("lib/c.h", "int c();\n")
        self.assert_out_of_step("+    ${SRC}/lib/c.h")

    def test_test_added_to_bazel_only(self):
        self.write("tests/BUILD", self.read("tests/BUILD") +
                   'cc_test(name = "b_test", srcs = ["a_test.cc"])\n')
        self.assert_out_of_step("//tests:b_test")

    def test_source_only_in_cmake(self):
        self.write("deploy/cmake/targets.cmake",
                   self.targets.replace("    ${SRC}/lib/a.cc\n",
                                        "    ${SRC}/lib/a.cc\n    ${SRC}/lib/tool.cc\n"))
        self.assert_out_of_step("-    ${SRC}/lib/tool.cc")

    def test_test_only_in_cmake(self):
        self.write("tests/BUILD", "")
        self.assert_out_of_step("-  TEST_NAME //tests:a_test")

    def test_hand_written_cmake_names_a_source(self):
        self.write("deploy/cmake/extra.cmake", "add_executable(x lib/tool.cc)\n")
        rc, out = self.run_check()
        self.assertEqual(rc, 1, out)
        self.assertIn("deploy/cmake/extra.cmake names lib/tool.cc", out)

    def test_unknown_attribute_is_an_error(self):
        self.write("lib/BUILD", self.read("lib/BUILD").replace(
            'name = "tool",', 'name = "tool", frobnicate = 1,'))
        rc, out = self.run_check()
        self.assertEqual(rc, 2, out)
        self.assertIn("frobnicate", out)

    def test_unknown_rule_is_an_error(self):
        self.write("lib/BUILD", self.read("lib/BUILD") + 'java_library(name = "j")\n')
        rc, out = self.run_check()
        self.assertEqual(rc, 2, out)
        self.assertIn("java_library", out)

    def test_missing_source_is_an_error(self):
        os.remove(os.path.join(self.root, "lib/a.cc"))
        rc, out = self.run_check()
        self.assertEqual(rc, 2, out)
        self.assertIn("lib/a.cc does not exist", out)

    def test_unknown_dependency_is_an_error(self):
        self.write("lib/BUILD", self.read("lib/BUILD").replace('deps = [":a"]', 'deps = [":nope"]'))
        rc, out = self.run_check()
        self.assertEqual(rc, 2, out)
        self.assertIn(":nope is not a known target", out)


if __name__ == "__main__":
    unittest.main()
