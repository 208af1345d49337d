#!/usr/bin/python3
"""Keeps the CMake build (deploy/cmake/) in step with the Bazel BUILD files.

Bazel is the source of truth. This script evaluates every BUILD file of the
workspace (and the BUILD files of the system libraries named in WORKSPACE) as
Python with stub rule functions, and writes deploy/cmake/targets.cmake: one
call per Bazel target (sources, headers, deps, copts, test args...). The
hand-written deploy/cmake/*.cmake files turn those calls into CMake targets.

    deploy/cmake/sync_check.py            # check: exit 1 and a diff if out of step
    deploy/cmake/sync_check.py --write    # regenerate deploy/cmake/targets.cmake
    deploy/cmake/sync_check.py --ctest-dir BUILD_DIR
                                          # also check `ctest -N` lists every cc_test

The check also fails when a hand-written CMake file names a project source
file (sources belong in BUILD files only) and when a rule, macro or attribute
is used that this script does not know how to translate. Standard library
only; runs under Python 3.8+ (Debian's /usr/bin/python3 and the GPU host's).
"""

import argparse
import difflib
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.path.dirname(os.path.dirname(HERE))
TARGETS_FILE = "deploy/cmake/targets.cmake"
SOURCE_EXTS = (".cc", ".cpp", ".c", ".h", ".hpp", ".inc", ".proto")

# Macros from .bzl files that are translated as a whole instead of being
# evaluated (their native.genrule would hard-code Debian tool paths).
SPECIAL_MACROS = {
    ("//deploy/bazel:proto.bzl", "lorahub_cc_grpc_library"): "grpc_library",
}

# Attributes that do not change what CMake builds; accepted and dropped.
IGNORED_ATTRS = {
    "visibility", "testonly", "licenses", "compatible_with", "features",
    "deprecation", "restricted_to", "target_compatible_with", "exec_compatible_with",
    "linkstatic", "stamp", "shard_count", "flaky", "local", "toolchains",
    "exec_properties", "applicable_licenses", "output_licenses", "malloc",
    "nocopts", "win_def_file", "additional_linker_inputs", "strip_include_prefix",
    "include_prefix", "implementation_deps", "tools", "message", "output_to_bindir",
    "executable", "exec_tools", "cmd_bash", "output_licenses",
}
TEST_TIMEOUTS = {"short": 60, "moderate": 300, "long": 900, "eternal": 3600}
SIZE_TIMEOUTS = {"small": 60, "medium": 300, "large": 900, "enormous": 3600}


class SyncError(Exception):
    """A BUILD construct the generator cannot translate, or a broken label."""


# ---------------------------------------------------------------- labels


def parse_label(label, pkg, repo=""):
    """Returns (repo, package, name) of `label` used inside //pkg (of @repo)."""
    if not isinstance(label, str):
        raise SyncError("label %r in //%s is not a string" % (label, pkg))
    if label.startswith("@"):
        if "//" in label:
            repo, rest = label[1:].split("//", 1)
        else:
            repo, rest = label[1:], ""
            return repo, "", repo
        label = "//" + rest
    if label.startswith("//"):
        rest = label[2:]
        if ":" in rest:
            p, n = rest.split(":", 1)
        else:
            p, n = rest, rest.rsplit("/", 1)[-1]
        return repo, p, n
    if label.startswith(":"):
        return repo, pkg, label[1:]
    return repo, pkg, label


def fmt_label(repo, pkg, name):
    return "%s//%s:%s" % ("@" + repo if repo else "", pkg, name)


def cmake_name(repo, pkg, name):
    """CMake target name of a Bazel label: //core/io:x -> core_io_x."""
    parts = (["ext", repo] if repo else []) + ([pkg] if pkg else []) + [name]
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))


# ---------------------------------------------------------------- evaluation


class Rule(object):
    def __init__(self, kind, repo, pkg, attrs):
        self.kind = kind
        self.repo = repo
        self.pkg = pkg
        self.name = attrs.get("name")
        self.attrs = attrs

    @property
    def label(self):
        return fmt_label(self.repo, self.pkg, self.name)


# CUDA-only sources: a srcs select() with this condition (besides
# //conditions:default) names sources that replace the default branch when the
# CMake build finds a LibTorch with CUDA. Bazel here never sets it.
CUDA_CONDITION = "//deploy/cmake:cuda"


class Select(object):
    def __init__(self, branches):
        self.branches = branches

    def default(self):
        if "//conditions:default" not in self.branches:
            raise SyncError("select() without //conditions:default: %r" % (self.branches,))
        return self.branches["//conditions:default"]

    def cuda_key(self):
        """The key of the CUDA branch, or None."""
        for k in self.branches:
            if k != "//conditions:default" and fmt_label(*parse_label(k, "deploy/cmake")) \
                    == CUDA_CONDITION:
                return k
        return None

    def __add__(self, other):
        return _plus(self, other)

    def __radd__(self, other):
        return _plus(other, self)


def _plus(a, b):
    # A select() on CUDA_CONDITION survives concatenation (each branch gets the
    # other operand); any other select() resolves to its default branch.
    for sel, other, left in ((a, b, True), (b, a, False)):
        if isinstance(sel, Select) and sel.cuda_key() and not isinstance(other, Select):
            return Select({k: (v + other if left else other + v)
                           for k, v in sel.branches.items()})
    a = a.default() if isinstance(a, Select) else a
    b = b.default() if isinstance(b, Select) else b
    return a + b


def _glob_regex(pattern):
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def is_package_dir(path):
    return any(os.path.isfile(os.path.join(path, b)) for b in ("BUILD", "BUILD.bazel"))


class Workspace(object):
    """All packages of the workspace and of the external repositories."""

    def __init__(self, root):
        self.root = root
        self.rules = {}          # label -> Rule
        self.packages = {}       # (repo, pkg) -> list of Rule
        self.pkg_files = set()   # (repo, pkg, relative file) seen in rules
        self.exported = set()
        self.external = {}       # repo name -> BUILD file path (relative to root)
        self.bzl_cache = {}
        self.errors = []

    # Packages -----------------------------------------------------------

    def find_packages(self):
        pkgs = []
        ignored = set()
        ign = os.path.join(self.root, ".bazelignore")
        if os.path.isfile(ign):
            ignored = {l.strip().strip("/") for l in open(ign) if l.strip() and not l.startswith("#")}
        for dirpath, dirnames, _ in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and not d.startswith("bazel-")
                and os.path.join(rel, d) not in ignored
                and not os.path.islink(os.path.join(dirpath, d))
                and not os.path.isfile(os.path.join(dirpath, d, "CMakeCache.txt"))
                # A nested WORKSPACE is another repository; //... skips it.
                and not os.path.isfile(os.path.join(dirpath, d, "WORKSPACE")))
            if is_package_dir(dirpath):
                pkgs.append(rel)
        return pkgs

    def build_file(self, repo, pkg):
        if repo:
            return self.external[repo]
        for b in ("BUILD.bazel", "BUILD"):
            p = os.path.join(pkg, b)
            if os.path.isfile(os.path.join(self.root, p)):
                return p
        raise SyncError("no BUILD file in //%s" % pkg)

    def load_workspace(self):
        ext = self.external

        def new_local_repository(name, path, build_file=None, **_):
            if build_file:
                r, p, n = parse_label(build_file, "")
                ext[name] = os.path.join(p, n)

        env = {
            "workspace": lambda **kw: None,
            "local_repository": lambda **kw: None,
            "new_local_repository": new_local_repository,
            "load": lambda *a, **kw: None,
        }
        for f in ("WORKSPACE", "WORKSPACE.bazel"):
            path = os.path.join(self.root, f)
            if os.path.isfile(path):
                exec(compile(open(path).read(), path, "exec"), env)
                return
        raise SyncError("no WORKSPACE in %s" % self.root)

    def load_all(self):
        self.load_workspace()
        for pkg in self.find_packages():
            self.load_package("", pkg)
        for repo in sorted(self.external):
            self.load_package(repo, "")

    # Evaluation ---------------------------------------------------------

    def _glob(self, pkg, include, exclude=(), exclude_directories=1, allow_empty=True):
        base = os.path.join(self.root, pkg)
        inc = [_glob_regex(p) for p in include]
        exc = [_glob_regex(p) for p in exclude]
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames[:] = sorted(d for d in dirnames if not is_package_dir(os.path.join(dirpath, d)))
            for f in filenames:
                rel = os.path.join(rel_dir, f)
                if any(r.match(rel) for r in inc) and not any(r.match(rel) for r in exc):
                    found.append(rel)
        if not found and not allow_empty:
            raise SyncError("glob(%r) in //%s matched nothing" % (include, pkg))
        return sorted(found)

    def _native(self, repo, pkg):
        """The functions a BUILD file (or native.* in a macro) can call."""
        ws = self

        def make_rule(kind):
            def rule(**attrs):
                if "name" not in attrs:
                    raise SyncError("%s without name in //%s" % (kind, pkg))
                r = Rule(kind, repo, pkg, attrs)
                if r.label in ws.rules:
                    raise SyncError("duplicate target %s" % r.label)
                ws.rules[r.label] = r
                ws.packages.setdefault((repo, pkg), []).append(r)
                return None
            return rule

        env = {}
        for kind in ("cc_library", "cc_binary", "cc_test", "genrule", "filegroup", "alias",
                     "sh_test", "sh_binary", "sh_library", "py_test", "py_binary", "py_library",
                     "test_suite", "config_setting", "cc_import"):
            env[kind] = make_rule(kind)
        env["glob"] = lambda include=(), exclude=(), **kw: self._glob(pkg, include, exclude, **kw)
        env["select"] = lambda branches, **kw: Select(branches)
        env["package"] = lambda **kw: None
        env["licenses"] = lambda *a, **kw: None
        env["package_name"] = lambda: pkg
        env["repository_name"] = lambda: "@" + repo
        env["exports_files"] = lambda srcs, **kw: ws.exported.update((repo, pkg, s) for s in srcs)
        env["existing_rules"] = lambda: {r.name: r.attrs for r in ws.packages.get((repo, pkg), [])}
        return env

    def _special(self, kind, repo, pkg):
        ws = self

        def grpc_library(name, srcs, deps=(), **kw):
            for k in kw:
                if k not in IGNORED_ATTRS:
                    raise SyncError("lorahub_cc_grpc_library(%s): attribute %s is not translated "
                                    "by sync_check.py" % (name, k))
            r = Rule("lorahub_cc_grpc_library", repo, pkg,
                     {"name": name, "srcs": list(srcs), "deps": list(deps)})
            ws.rules[r.label] = r
            ws.packages.setdefault((repo, pkg), []).append(r)
        return {"grpc_library": grpc_library}[kind]

    def _load_bzl(self, label, pkg, repo):
        r, p, n = parse_label(label, pkg, repo)
        key = fmt_label(r, p, n)
        if key not in self.bzl_cache:
            if r:
                raise SyncError("load(%s): .bzl files of external repositories are not supported" % label)
            path = os.path.join(self.root, p, n)

            class Native(object):
                pass
            native_ns = Native()
            # native.* resolves against the package that calls the macro.
            native_ns.__dict__["_ws"] = self

            def native_getattr(attr):
                def call(*a, **kw):
                    env = self._native(self._current[0], self._current[1])
                    return env[attr](*a, **kw)
                return call
            Native.__getattr__ = lambda s, attr: native_getattr(attr)
            env = {"native": native_ns, "load": lambda *a, **kw: None,
                   "fail": self._fail, "select": lambda b, **kw: Select(b),
                   "struct": lambda **kw: type("struct", (), kw)()}
            exec(compile(open(path).read(), path, "exec"), env)
            self.bzl_cache[key] = env
        return key, self.bzl_cache[key]

    @staticmethod
    def _fail(msg="", *a, **kw):
        raise SyncError("fail(): %s" % msg)

    def load_package(self, repo, pkg):
        build = self.build_file(repo, pkg)
        self._current = (repo, pkg)
        self.packages.setdefault((repo, pkg), [])
        env = self._native(repo, pkg)
        env["fail"] = self._fail

        def load(bzl, *symbols, **aliases):
            key, bzl_env = self._load_bzl(bzl, pkg, repo)
            for local, remote in list(zip(symbols, symbols)) + list(aliases.items()):
                special = SPECIAL_MACROS.get((key, remote))
                if special:
                    env[local] = self._special(special, repo, pkg)
                elif remote in bzl_env:
                    env[local] = bzl_env[remote]
                else:
                    raise SyncError("load(%s, %s): symbol not found" % (bzl, remote))
        env["load"] = load
        path = os.path.join(self.root, build)
        try:
            exec(compile(open(path).read(), path, "exec"), env)
        except SyncError:
            raise
        except Exception as e:  # Starlark the stubs do not cover.
            raise SyncError("cannot evaluate %s: %s: %s" % (build, type(e).__name__, e))


# ---------------------------------------------------------------- translation


class Generator(object):
    def __init__(self, ws):
        self.ws = ws
        self.cmake_names = {}

    def resolve_rule(self, label, rule):
        repo, pkg, name = parse_label(label, rule.pkg, rule.repo)
        full = fmt_label(repo, pkg, name)
        seen = set()
        while full in self.ws.rules and self.ws.rules[full].kind == "alias":
            if full in seen:
                raise SyncError("alias cycle at %s" % full)
            seen.add(full)
            a = self.ws.rules[full]
            repo, pkg, name = parse_label(a.attrs["actual"], a.pkg, a.repo)
            full = fmt_label(repo, pkg, name)
        return full

    def target_of(self, label, rule, what):
        full = self.resolve_rule(label, rule)
        if full not in self.ws.rules:
            raise SyncError("%s of %s: %s is not a known target" % (what, rule.label, label))
        dep = self.ws.rules[full]
        return cmake_name(dep.repo, dep.pkg, dep.name)

    def files_of(self, label, rule, what):
        """Files (${SRC}/... or ${GEN}/...) named by a srcs/hdrs/data entry."""
        full = self.resolve_rule(label, rule)
        if full in self.ws.rules:
            dep = self.ws.rules[full]
            if dep.kind == "filegroup":
                out = []
                for s in self._list(dep, "srcs"):
                    out += self.files_of(s, dep, what)
                return out
            if dep.kind == "genrule":
                return ["${GEN}/" + os.path.join(dep.pkg, o) for o in self._list(dep, "outs")]
            if dep.kind == "lorahub_cc_grpc_library":
                return []
            return ["$<TARGET_FILE:%s>" % cmake_name(dep.repo, dep.pkg, dep.name)]
        repo, pkg, name = parse_label(full, rule.pkg, rule.repo)
        # A generated file named as an output of a genrule of that package.
        for r in self.ws.packages.get((repo, pkg), []):
            if r.kind == "genrule" and name in self._list(r, "outs"):
                return ["${GEN}/" + os.path.join(pkg, name)]
        path = os.path.join(pkg, name)
        if repo:
            raise SyncError("%s of %s: files of external repositories are not supported: %s"
                            % (what, rule.label, label))
        if not os.path.exists(os.path.join(self.ws.root, path)):
            raise SyncError("%s of %s: %s does not exist" % (what, rule.label, path))
        if os.path.isdir(os.path.join(self.ws.root, path)):
            return ["${SRC}/" + path + "/"]
        return ["${SRC}/" + path]

    @staticmethod
    def _list(rule, attr):
        v = rule.attrs.get(attr, [])
        if isinstance(v, Select):
            v = v.default()
        if isinstance(v, str):
            return [v]
        return list(v)

    def expand_make_vars(self, text, rule):
        """$(location x), $(rootpath x) ... -> CMake file expressions."""
        def repl(m):
            kind, arg = m.group(1), m.group(2).strip()
            files = self.files_of(arg, rule, "$(%s)" % kind)
            if kind in ("location", "execpath", "rootpath", "rlocationpath") and len(files) != 1:
                raise SyncError("$(%s %s) in %s names %d files" % (kind, arg, rule.label, len(files)))
            return " ".join(files)
        out = re.sub(r"\$\((location|locations|execpath|execpaths|rootpath|rootpaths|rlocationpath)"
                     r"\s+([^)]+)\)", repl, text)
        if "$(" in out:
            raise SyncError("%s: make variable in %r is not translated by sync_check.py"
                            % (rule.label, text))
        return out

    def check_attrs(self, rule, known):
        for k in rule.attrs:
            if k not in known and k not in IGNORED_ATTRS and k != "name":
                raise SyncError("%s %s: attribute %s is not translated by sync_check.py; "
                                "teach deploy/cmake/sync_check.py (and rules.cmake) about it"
                                % (rule.kind, rule.label, k))

    def generate(self):
        out = [
            "# GENERATED by deploy/cmake/sync_check.py --write from the Bazel BUILD files.",
            "# Do not edit: change the BUILD files and regenerate. Checked by",
            "# //tests/build:cmake_sync_test. ${SRC}/${GEN} are the source/generated roots.",
            "",
        ]
        names = {}
        sections = [("External repositories (deploy/bazel/*.BUILD via WORKSPACE)", True),
                    ("Workspace packages", False)]
        for title, external in sections:
            out.append("# " + "=" * 70)
            out.append("# " + title)
            for (repo, pkg) in sorted(self.ws.packages):
                if bool(repo) != external:
                    continue
                rules = self.ws.packages[(repo, pkg)]
                out.append("")
                out.append("# ---- %s  (%s)" % (fmt_label(repo, pkg, "")[:-1],
                                               self.ws.build_file(repo, pkg)))
                for rule in rules:
                    cname = cmake_name(rule.repo, rule.pkg, rule.name)
                    if cname in names and rule.kind not in ("config_setting",):
                        raise SyncError("%s and %s map to the same CMake name %s"
                                        % (names[cname], rule.label, cname))
                    names[cname] = rule.label
                    lines = self.translate(rule, cname)
                    if lines:
                        out.append("")
                        out += lines
        return "\n".join(out) + "\n"

    def _call(self, func, cname, rule, fields):
        lines = ["# %s (%s)" % (rule.label, rule.kind), "%s(%s" % (func, cname)]
        for key, values in fields:
            if values is None or values == [] or values == "":
                continue
            if isinstance(values, (list, tuple)):
                lines.append("  %s" % key)
                for v in values:
                    lines.append("    %s" % cmake_quote(v))
            elif values is True:
                lines.append("  %s" % key)
            else:
                lines.append("  %s %s" % (key, cmake_quote(str(values))))
        lines.append(")")
        return lines

    def translate(self, rule, cname):
        k = rule.kind
        L = lambda a: self._list(rule, a)
        if k in ("cc_library", "cc_binary", "cc_test"):
            common = {"srcs", "hdrs", "deps", "copts", "defines", "local_defines", "includes",
                      "linkopts", "data", "textual_hdrs", "alwayslink", "tags"}
            if k == "cc_binary":
                common |= {"linkshared", "args", "env"}
            if k == "cc_test":
                common |= {"args", "env", "size", "timeout"}
            self.check_attrs(rule, common)
            cpu_only, cuda_only = self.cuda_srcs(rule)
            srcs = []
            for s in L("srcs") + L("hdrs") + L("textual_hdrs"):
                if s not in cpu_only:
                    srcs += self.files_of(s, rule, "srcs")
            cpu_files, cuda_files = [], []
            for s in cpu_only:
                cpu_files += self.files_of(s, rule, "srcs")
            for s in cuda_only:
                cuda_files += self.files_of(s, rule, "srcs")
            deps = [self.target_of(d, rule, "deps") for d in L("deps")]
            data_targets, data = self.data_of(rule)
            fields = [
                ("PACKAGE", rule.pkg),
                ("SRCS", [s for s in srcs if not s.startswith("$<")]),
                ("CPU_SRCS", cpu_files),
                ("CUDA_SRCS", cuda_files),
                ("DEPS", deps),
                ("COPTS", L("copts")),
                ("DEFINES", L("defines")),
                ("LOCAL_DEFINES", L("local_defines")),
                ("INCLUDES", L("includes")),
                ("LINKOPTS", L("linkopts")),
            ]
            if rule.attrs.get("alwayslink"):
                fields.append(("ALWAYSLINK", True))
            if k == "cc_library":
                if rule.repo:
                    func = "lorahub_external_library"
                    fields = [("LABEL", rule.label)] + fields
                else:
                    func = "lorahub_cc_library"
                    fields.append(("OUTPUT_NAME", rule.name))
            elif k == "cc_binary":
                func = "lorahub_cc_binary"
                fields.append(("OUTPUT_NAME", rule.name))
                if rule.attrs.get("linkshared"):
                    fields.append(("SHARED", True))
                fields.append(("DATA_TARGETS", data_targets))
            else:
                func = "lorahub_cc_test"
                fields += self.test_fields(rule, data_targets)
                fields.insert(0, ("TEST_NAME", rule.label))
            return self._call(func, cname, rule, fields)
        if k in ("sh_test", "py_test"):
            known = {"srcs", "deps", "data", "args", "env", "size", "timeout", "tags", "main",
                     "python_version", "srcs_version"}
            self.check_attrs(rule, known)
            srcs = L("srcs")
            main = rule.attrs.get("main") or (srcs[0] if len(srcs) == 1 else None)
            if not main:
                raise SyncError("%s %s: cannot tell its main file" % (k, rule.label))
            script = self.files_of(main, rule, "srcs")
            data_targets, _ = self.data_of(rule)
            fields = [("TEST_NAME", rule.label), ("PACKAGE", rule.pkg),
                      ("INTERPRETER", "bash" if k == "sh_test" else "python3"),
                      ("SCRIPT", script[0])] + self.test_fields(rule, data_targets)
            return self._call("lorahub_script_test", cname, rule, fields)
        if k == "genrule":
            self.check_attrs(rule, {"srcs", "outs", "cmd", "tags"})
            srcs = []
            for s in L("srcs"):
                srcs += self.files_of(s, rule, "srcs")
            cmd = rule.attrs["cmd"].replace("$$", "\0")  # Bazel's escaped $
            cmd = cmd.replace("$(RULEDIR)", "${GEN}/" + rule.pkg)
            cmd = cmd.replace("$(SRCS)", " ".join(srcs)).replace("$<", " ".join(srcs))
            outs = ["${GEN}/" + os.path.join(rule.pkg, o) for o in L("outs")]
            cmd = cmd.replace("$(OUTS)", " ".join(outs)).replace("$@", " ".join(outs))
            cmd = self.expand_make_vars(cmd, rule).replace("\0", "$")
            return self._call("lorahub_genrule", cname, rule,
                              [("PACKAGE", rule.pkg), ("SRCS", srcs), ("OUTS", outs), ("CMD", cmd)])
        if k == "lorahub_cc_grpc_library":
            deps = [self.target_of(d, rule, "deps") for d in L("deps")]
            protos = []
            for s in L("srcs"):
                protos += self.files_of(s, rule, "srcs")
            return self._call("lorahub_cc_grpc_library", cname, rule,
                              [("LABEL", rule.label), ("PACKAGE", rule.pkg),
                               ("PROTOS", [os.path.relpath(p[len("${SRC}/"):], rule.pkg)
                                           for p in protos]),
                               ("SRCS", protos), ("DEPS", deps)])
        if k == "alias":
            self.check_attrs(rule, {"actual", "tags"})
            actual = self.resolve_rule(rule.attrs["actual"], rule)
            if actual not in self.ws.rules:
                raise SyncError("alias %s: %s is not a known target" % (rule.label, actual))
            a = self.ws.rules[actual]
            if a.kind not in ("cc_binary", "cc_library", "cc_test"):
                return ["# %s: alias of %s" % (rule.label, actual)]
            return self._call("lorahub_alias", cname, rule,
                              [("ACTUAL", cmake_name(a.repo, a.pkg, a.name))])
        if k in ("filegroup", "config_setting", "sh_binary", "sh_library", "py_binary",
                 "py_library", "test_suite", "cc_import"):
            if k == "cc_import":
                raise SyncError("cc_import %s is not translated by sync_check.py" % rule.label)
            return ["# %s (%s): nothing to build in CMake" % (rule.label, k)]
        raise SyncError("rule %s of %s is not translated by sync_check.py" % (k, rule.label))

    def cuda_srcs(self, rule):
        """(sources only without CUDA, sources only with CUDA) of a srcs select()
        on CUDA_CONDITION; ([], []) when srcs has none."""
        v = rule.attrs.get("srcs", [])
        if not isinstance(v, Select) or not v.cuda_key():
            return [], []
        extra = set(v.branches) - {"//conditions:default", v.cuda_key()}
        if extra:
            raise SyncError("%s: a srcs select() on %s may only have that condition and "
                            "//conditions:default, not %s" % (rule.label, CUDA_CONDITION,
                                                              sorted(extra)))
        cpu, cuda = list(v.default()), list(v.branches[v.cuda_key()])
        return [s for s in cpu if s not in cuda], [s for s in cuda if s not in cpu]

    def data_of(self, rule):
        targets, files = [], []
        for d in self._list(rule, "data"):
            full = self.resolve_rule(d, rule)
            r = self.ws.rules.get(full)
            if r is not None and r.kind in ("cc_binary", "cc_library", "genrule"):
                targets.append(cmake_name(r.repo, r.pkg, r.name))
            elif r is not None and r.kind == "filegroup":
                for s in self._list(r, "srcs"):
                    sub = self.ws.rules.get(self.resolve_rule(s, r))
                    if sub is not None and sub.kind in ("cc_binary", "cc_library", "genrule"):
                        targets.append(cmake_name(sub.repo, sub.pkg, sub.name))
            else:
                files += self.files_of(d, rule, "data")
        return targets, files

    def test_fields(self, rule, data_targets):
        args = [self.expand_make_vars(a, rule) for a in self._list(rule, "args")]
        env = rule.attrs.get("env", {}) or {}
        env = ["%s=%s" % (k, self.expand_make_vars(v, rule)) for k, v in sorted(env.items())]
        timeout = TEST_TIMEOUTS.get(rule.attrs.get("timeout")) or \
            SIZE_TIMEOUTS[rule.attrs.get("size", "medium")]
        tags = self._list(rule, "tags")
        return [("ARGS", args), ("ENV", env), ("TIMEOUT", str(timeout)),
                ("LABELS", tags), ("DATA_TARGETS", data_targets)]


def cmake_quote(v):
    v = str(v)
    if v and re.match(r"^[A-Za-z0-9_./${}:<>+=,@-]+$", v) and ";" not in v:
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- checks


def handwritten_source_refs(root):
    """Project source files named by hand-written CMake files (should be none)."""
    bad = []
    cm_dir = os.path.join(root, "deploy", "cmake")
    if not os.path.isdir(cm_dir):
        return bad
    for f in sorted(os.listdir(cm_dir)):
        if not (f.endswith(".cmake") or f == "CMakeLists.txt") or f == "targets.cmake":
            continue
        text = open(os.path.join(cm_dir, f)).read()
        for m in re.finditer(r"[A-Za-z0-9_./-]+\.(?:cc|cpp|c|h|hpp|proto)\b", text):
            path = m.group(0).lstrip("./")
            if os.path.isfile(os.path.join(root, path)):
                bad.append("deploy/cmake/%s names %s" % (f, path))
    return bad


def orphan_sources(ws):
    """Source files under the workspace that no Bazel target uses (a warning)."""
    used = set()
    for rule in ws.rules.values():
        if rule.repo:
            continue
        for attr in ("srcs", "hdrs", "textual_hdrs", "data"):
            v = rule.attrs.get(attr, [])
            values = Generator._list(rule, attr)
            if isinstance(v, Select):  # every branch counts as used
                values = [x for b in v.branches.values() for x in
                          ([b] if isinstance(b, str) else list(b))]
            for s in values:
                if isinstance(s, str) and not s.startswith(("@", "//", ":")):
                    used.add(os.path.normpath(os.path.join(rule.pkg, s)))
                elif isinstance(s, str) and s.startswith("//"):
                    _, p, n = parse_label(s, rule.pkg)
                    used.add(os.path.normpath(os.path.join(p, n)))
    orphans = []
    for pkg in ws.find_packages():
        for f in ws._glob(pkg, ["**"]):
            path = os.path.normpath(os.path.join(pkg, f))
            if path.endswith(SOURCE_EXTS) and path not in used and not path.startswith("deploy/"):
                orphans.append(path)
    return orphans


def bazel_tests(ws):
    return sorted(r.label for r in ws.rules.values()
                  if r.kind in ("cc_test", "sh_test", "py_test") and not r.repo)


def ctest_tests(build_dir):
    out = subprocess.run(["ctest", "-N"], cwd=build_dir, stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return sorted(m.group(1) for m in re.finditer(r"Test\s+#\d+:\s+(\S+)", out))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=DEFAULT_ROOT, help="workspace root (default: from this file)")
    ap.add_argument("--write", action="store_true", help="regenerate %s" % TARGETS_FILE)
    ap.add_argument("--ctest-dir", help="a configured CMake build dir to compare `ctest -N` with")
    ap.add_argument("--list-tests", action="store_true", help="print the Bazel test labels")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    hint = "run: /usr/bin/python3 deploy/cmake/sync_check.py --write  (see deploy/cmake/README.md)"

    ws = Workspace(root)
    try:
        ws.load_all()
        text = Generator(ws).generate()
    except SyncError as e:
        print("sync_check: ERROR: %s" % e, file=sys.stderr)
        return 2
    if args.list_tests:
        print("\n".join(bazel_tests(ws)))
        return 0

    target_path = os.path.join(root, TARGETS_FILE)
    old = open(target_path).read() if os.path.isfile(target_path) else ""
    status = 0
    if args.write:
        if old != text:
            with open(target_path, "w") as f:
                f.write(text)
            print("sync_check: wrote %s" % TARGETS_FILE)
        else:
            print("sync_check: %s is up to date" % TARGETS_FILE)
    elif old != text:
        sys.stdout.writelines(difflib.unified_diff(
            old.splitlines(True), text.splitlines(True),
            TARGETS_FILE + " (committed)", TARGETS_FILE + " (from BUILD files)"))
        print("sync_check: FAIL: %s is out of step with the BUILD files; %s" % (TARGETS_FILE, hint))
        status = 1

    for b in handwritten_source_refs(root):
        print("sync_check: FAIL: %s; list sources in BUILD files only" % b)
        status = 1
    for o in orphan_sources(ws):
        print("sync_check: warning: %s is in no Bazel target (so in neither build)" % o)

    if args.ctest_dir:
        want, have = bazel_tests(ws), ctest_tests(args.ctest_dir)
        for t in sorted(set(want) - set(have)):
            print("sync_check: FAIL: Bazel test %s is not registered in CTest" % t)
            status = 1
        for t in sorted(set(have) - set(want)):
            print("sync_check: FAIL: CTest test %s is not a Bazel test" % t)
            status = 1
    n_rules = sum(1 for r in ws.rules.values() if not r.repo)
    if status == 0:
        print("sync_check: OK: %d Bazel targets in %d packages, %d tests, in step with %s"
              % (n_rules, sum(1 for k in ws.packages if not k[0]), len(bazel_tests(ws)),
                 TARGETS_FILE))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
