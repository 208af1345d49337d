#include "core/io/torch_pickle.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/io/zip_reader.h"
#include "core/util/status_macros.h"

namespace lorahub::io {
namespace {

// Fixed bounds on the unpickler's state, on top of the bound by input size
// (every push, memo entry and mark costs at least one input byte).
constexpr size_t kMaxStack = 1 << 20;
constexpr size_t kMaxMarks = 1 << 16;
constexpr size_t kMaxMemo = 1 << 20;
// Values created over the whole pickle (~150 bytes each). A state dict needs
// about 25 per tensor, so this allows some 40,000 tensors.
constexpr size_t kMaxValues = 1 << 20;
constexpr int kMaxDepth = 64;  // container nesting; bounds destructor recursion
constexpr size_t kMaxGlobalPart = 256;
constexpr size_t kMaxDims = 64;

// The only callables a pickle may name (see torch/_weights_only_unpickler.py).
enum class Global {
  kOrderedDict,
  kRebuildTensorV2,
  kRebuildParameter,
  kRebuildParameterWithState,
  kStorageType,  // torch.<T>Storage; Value::dtype says which
};

struct StorageClass {
  const char* name;
  DType dtype;
};
constexpr StorageClass kStorageClasses[] = {
    {"DoubleStorage", DType::kF64}, {"FloatStorage", DType::kF32},
    {"HalfStorage", DType::kF16},   {"BFloat16Storage", DType::kBF16},
    {"LongStorage", DType::kI64},   {"IntStorage", DType::kI32},
    {"ShortStorage", DType::kI16},  {"CharStorage", DType::kI8},
    {"ByteStorage", DType::kU8},    {"BoolStorage", DType::kBool},
};

enum class Kind {
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kBytes,
  kTuple,
  kList,
  kDict,
  kGlobal,
  kStorage,
  kTensor,
};

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kTuple:
      return "tuple";
    case Kind::kList:
      return "list";
    case Kind::kDict:
      return "dict";
    case Kind::kGlobal:
      return "global";
    case Kind::kStorage:
      return "storage";
    case Kind::kTensor:
      return "tensor";
  }
  return "?";
}

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct Value {
  Kind kind = Kind::kNone;
  int64_t i = 0;  // kBool, kInt
  double f = 0;   // kFloat
  std::string s;  // kString, kBytes
  // kTuple and kList: the elements; kDict: keys and values alternating.
  std::vector<ValuePtr> items;
  Global global = Global::kOrderedDict;  // kGlobal
  DType dtype = DType::kF32;             // kGlobal storage type, kStorage
  size_t storage = 0;                    // kStorage: index into storages_
  std::unique_ptr<HostTensor> tensor;    // kTensor
  // Set once the value is inside another container. A frozen list or dict
  // can no longer change, so no container can come to contain itself.
  bool frozen = false;
  int depth = 1;  // nesting depth, 1 for scalars
};

ValuePtr Make(Kind kind) {
  auto v = std::make_shared<Value>();
  v->kind = kind;
  return v;
}

struct Storage {
  std::string key;
  DType dtype;
  uint64_t numel;
  absl::Span<const uint8_t> bytes;
};

const char* OpcodeName(uint8_t op) {
  switch (op) {
    case '(':
      return "MARK";
    case '.':
      return "STOP";
    case '0':
      return "POP";
    case '1':
      return "POP_MARK";
    case '2':
      return "DUP";
    case 'F':
      return "FLOAT";
    case 'I':
      return "INT";
    case 'J':
      return "BININT";
    case 'K':
      return "BININT1";
    case 'L':
      return "LONG";
    case 'M':
      return "BININT2";
    case 'N':
      return "NONE";
    case 'P':
      return "PERSID";
    case 'Q':
      return "BINPERSID";
    case 'R':
      return "REDUCE";
    case 'S':
      return "STRING";
    case 'T':
      return "BINSTRING";
    case 'U':
      return "SHORT_BINSTRING";
    case 'V':
      return "UNICODE";
    case 'X':
      return "BINUNICODE";
    case 'a':
      return "APPEND";
    case 'b':
      return "BUILD";
    case 'c':
      return "GLOBAL";
    case 'd':
      return "DICT";
    case '}':
      return "EMPTY_DICT";
    case 'e':
      return "APPENDS";
    case 'g':
      return "GET";
    case 'h':
      return "BINGET";
    case 'i':
      return "INST";
    case 'j':
      return "LONG_BINGET";
    case 'l':
      return "LIST";
    case ']':
      return "EMPTY_LIST";
    case 'o':
      return "OBJ";
    case 'p':
      return "PUT";
    case 'q':
      return "BINPUT";
    case 'r':
      return "LONG_BINPUT";
    case 's':
      return "SETITEM";
    case 't':
      return "TUPLE";
    case ')':
      return "EMPTY_TUPLE";
    case 'u':
      return "SETITEMS";
    case 'G':
      return "BINFLOAT";
    case 'B':
      return "BINBYTES";
    case 'C':
      return "SHORT_BINBYTES";
    case 0x80:
      return "PROTO";
    case 0x81:
      return "NEWOBJ";
    case 0x82:
      return "EXT1";
    case 0x83:
      return "EXT2";
    case 0x84:
      return "EXT4";
    case 0x85:
      return "TUPLE1";
    case 0x86:
      return "TUPLE2";
    case 0x87:
      return "TUPLE3";
    case 0x88:
      return "NEWTRUE";
    case 0x89:
      return "NEWFALSE";
    case 0x8a:
      return "LONG1";
    case 0x8b:
      return "LONG4";
    case 0x8c:
      return "SHORT_BINUNICODE";
    case 0x8d:
      return "BINUNICODE8";
    case 0x8e:
      return "BINBYTES8";
    case 0x8f:
      return "EMPTY_SET";
    case 0x90:
      return "ADDITEMS";
    case 0x91:
      return "FROZENSET";
    case 0x92:
      return "NEWOBJ_EX";
    case 0x93:
      return "STACK_GLOBAL";
    case 0x94:
      return "MEMOIZE";
    case 0x95:
      return "FRAME";
    case 0x96:
      return "BYTEARRAY8";
    case 0x97:
      return "NEXT_BUFFER";
    case 0x98:
      return "READONLY_BUFFER";
    default:
      return "unknown";
  }
}

// Checked arithmetic on non-negative 64-bit values.
bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}
bool AddOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_add_overflow(a, b, out);
}

class Unpickler {
 public:
  Unpickler(absl::Span<const uint8_t> pickle, const StorageLookup& lookup,
            const std::string& source, std::shared_ptr<const void> owner,
            uint64_t copy_budget)
      : in_(pickle),
        lookup_(lookup),
        source_(source),
        owner_(std::move(owner)),
        copy_budget_(copy_budget) {}

  absl::StatusOr<ValuePtr> Run();

 private:
  // Every value is created here, so that kMaxValues can be enforced.
  ValuePtr New(Kind kind) {
    ++values_created_;
    return Make(kind);
  }

  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("torch file '", source_, "': ", what, " (data.pkl offset ",
                     op_offset_, ")"));
  }

  // Input.
  absl::Status Need(size_t n) const {
    if (in_.size() - pos_ < n) return Error("pickle is truncated");
    return absl::OkStatus();
  }
  uint64_t Le(size_t n) {
    uint64_t v = 0;
    for (size_t k = n; k-- > 0;) v = (v << 8) | in_[pos_ + k];
    pos_ += n;
    return v;
  }
  absl::StatusOr<std::string> ReadBytes(uint64_t n) {
    if (n > in_.size() - pos_) return Error("string runs past the end");
    std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  absl::StatusOr<std::string> ReadLine() {
    for (size_t k = pos_; k < in_.size() && k - pos_ <= kMaxGlobalPart; ++k) {
      if (in_[k] == '\n') {
        std::string s(reinterpret_cast<const char*>(in_.data() + pos_),
                      k - pos_);
        pos_ = k + 1;
        return s;
      }
    }
    return Error("GLOBAL name is unterminated or too long");
  }

  // Stack. Pops never cross the innermost mark.
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  absl::Status Push(ValuePtr v) {
    if (stack_.size() >= kMaxStack) return Error("pickle stack is too deep");
    stack_.push_back(std::move(v));
    return absl::OkStatus();
  }
  absl::StatusOr<ValuePtr> Pop() {
    if (stack_.size() <= Floor()) return Error("pickle stack underflow");
    ValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  absl::StatusOr<ValuePtr> Top() const {
    if (stack_.size() <= Floor()) return Error("pickle stack underflow");
    return stack_.back();
  }
  absl::StatusOr<std::vector<ValuePtr>> PopMark() {
    if (marks_.empty()) return Error("no MARK on the pickle stack");
    const size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.begin() + mark),
                                std::make_move_iterator(stack_.end()));
    stack_.resize(mark);
    return items;
  }

  absl::Status Memo(uint64_t index) {
    LH_ASSIGN_OR_RETURN(ValuePtr top, Top());
    if (memo_.size() >= kMaxMemo && memo_.find(index) == memo_.end()) {
      return Error("pickle memo is too large");
    }
    memo_[index] = std::move(top);
    return absl::OkStatus();
  }
  absl::Status Get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) {
      return Error(absl::StrCat("memo index ", index, " is not defined"));
    }
    return Push(it->second);
  }

  // Containers.
  absl::Status Adopt(Value& parent, ValuePtr child) {
    if (child.get() == &parent) return Error("container contains itself");
    if (child->depth + 1 > kMaxDepth) return Error("containers nest too deep");
    child->frozen = true;
    parent.depth = std::max(parent.depth, child->depth + 1);
    parent.items.push_back(std::move(child));
    return absl::OkStatus();
  }
  absl::StatusOr<ValuePtr> MakeTuple(std::vector<ValuePtr> items) {
    ValuePtr t = New(Kind::kTuple);
    t->items.reserve(items.size());
    for (ValuePtr& item : items) LH_RETURN_IF_ERROR(Adopt(*t, std::move(item)));
    t->frozen = true;
    return t;
  }
  absl::Status TupleN(size_t n) {
    if (stack_.size() - Floor() < n) return Error("pickle stack underflow");
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.end() - n),
                                std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    LH_ASSIGN_OR_RETURN(ValuePtr t, MakeTuple(std::move(items)));
    return Push(std::move(t));
  }
  absl::StatusOr<Value*> MutableTop(Kind kind, const char* op) {
    LH_ASSIGN_OR_RETURN(ValuePtr top, Top());
    if (top->kind != kind) {
      return Error(absl::StrCat(op, " on a ", KindName(top->kind),
                                ", expected a ", KindName(kind)));
    }
    if (top->frozen) {
      return Error(absl::StrCat(op, " on a ", KindName(kind),
                                " that is already inside another object"));
    }
    return top.get();
  }
  absl::Status SetItems(std::vector<ValuePtr> items) {
    if (items.size() % 2 != 0) return Error("SETITEMS with an odd item count");
    LH_ASSIGN_OR_RETURN(Value * dict, MutableTop(Kind::kDict, "SETITEM"));
    for (ValuePtr& item : items) {
      LH_RETURN_IF_ERROR(Adopt(*dict, std::move(item)));
    }
    return absl::OkStatus();
  }
  absl::Status Appends(std::vector<ValuePtr> items) {
    LH_ASSIGN_OR_RETURN(Value * list, MutableTop(Kind::kList, "APPEND"));
    for (ValuePtr& item : items) {
      LH_RETURN_IF_ERROR(Adopt(*list, std::move(item)));
    }
    return absl::OkStatus();
  }

  absl::Status LoadGlobal();
  absl::Status Reduce();
  absl::Status PersistentLoad();
  absl::StatusOr<ValuePtr> RebuildTensor(const Value& args);
  absl::StatusOr<ValuePtr> RebuildParameter(const Value& args, size_t arity);
  absl::Status Step(uint8_t op, bool* stop);

  absl::Span<const uint8_t> in_;
  const StorageLookup& lookup_;
  const std::string& source_;
  std::shared_ptr<const void> owner_;
  uint64_t copy_budget_;

  size_t pos_ = 0;
  size_t op_offset_ = 0;
  size_t values_created_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  std::vector<Storage> storages_;
  std::map<std::string, size_t> storage_by_key_;
};

absl::Status Unpickler::LoadGlobal() {
  LH_ASSIGN_OR_RETURN(const std::string module, ReadLine());
  LH_ASSIGN_OR_RETURN(const std::string name, ReadLine());
  ValuePtr v = New(Kind::kGlobal);
  if (module == "collections" && name == "OrderedDict") {
    v->global = Global::kOrderedDict;
  } else if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
    v->global = Global::kRebuildTensorV2;
  } else if (module == "torch._utils" && name == "_rebuild_parameter") {
    v->global = Global::kRebuildParameter;
  } else if (module == "torch._utils" &&
             name == "_rebuild_parameter_with_state") {
    v->global = Global::kRebuildParameterWithState;
  } else {
    bool found = false;
    if (module == "torch") {
      for (const StorageClass& sc : kStorageClasses) {
        if (name == sc.name) {
          v->global = Global::kStorageType;
          v->dtype = sc.dtype;
          found = true;
        }
      }
    }
    if (!found) {
      return Error(absl::StrCat("disallowed global '", absl::CHexEscape(module),
                                ".", absl::CHexEscape(name), "'"));
    }
  }
  return Push(std::move(v));
}

absl::Status Unpickler::PersistentLoad() {
  LH_ASSIGN_OR_RETURN(ValuePtr pid, Pop());
  const auto& t = pid->items;
  if (pid->kind != Kind::kTuple || t.size() != 5 ||
      t[0]->kind != Kind::kString || t[0]->s != "storage") {
    return Error(
        "persistent id is not ('storage', type, key, location, numel)");
  }
  if (t[1]->kind != Kind::kGlobal || t[1]->global != Global::kStorageType) {
    return Error("persistent id names no torch.<T>Storage type");
  }
  if (t[2]->kind != Kind::kString || t[3]->kind != Kind::kString ||
      t[4]->kind != Kind::kInt || t[4]->i < 0) {
    return Error("persistent id has a bad key, location or numel");
  }
  const DType dtype = t[1]->dtype;
  const std::string& key = t[2]->s;
  const uint64_t numel = static_cast<uint64_t>(t[4]->i);
  ValuePtr v = New(Kind::kStorage);
  v->dtype = dtype;
  auto it = storage_by_key_.find(key);
  if (it != storage_by_key_.end()) {
    const Storage& s = storages_[it->second];
    if (s.dtype != dtype || s.numel != numel) {
      return Error(absl::StrCat("storage '", absl::CHexEscape(key),
                                "' is used with different types or sizes"));
    }
    v->storage = it->second;
    return Push(std::move(v));
  }
  uint64_t nbytes = 0;
  if (MulOverflows(numel, DTypeSize(dtype), &nbytes)) {
    return Error(
        absl::StrCat("storage '", absl::CHexEscape(key), "' numel overflows"));
  }
  LH_ASSIGN_OR_RETURN(const absl::Span<const uint8_t> bytes, lookup_(key));
  if (bytes.size() != nbytes) {
    return Error(absl::StrCat("storage '", absl::CHexEscape(key), "' has ",
                              bytes.size(), " bytes, expected ", numel, " x ",
                              std::string(DTypeName(dtype)), " = ", nbytes,
                              " bytes"));
  }
  storages_.push_back(Storage{key, dtype, numel, bytes});
  storage_by_key_.emplace(key, storages_.size() - 1);
  v->storage = storages_.size() - 1;
  return Push(std::move(v));
}

absl::StatusOr<std::vector<uint64_t>> IntTuple(const Value& v) {
  if (v.kind != Kind::kTuple) return absl::InvalidArgumentError("not a tuple");
  if (v.items.size() > kMaxDims) {
    return absl::InvalidArgumentError("too many dimensions");
  }
  std::vector<uint64_t> out;
  for (const ValuePtr& item : v.items) {
    if (item->kind != Kind::kInt || item->i < 0) {
      return absl::InvalidArgumentError("element is not a non-negative int");
    }
    out.push_back(static_cast<uint64_t>(item->i));
  }
  return out;
}

absl::StatusOr<ValuePtr> Unpickler::RebuildTensor(const Value& args) {
  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
  //                    backward_hooks[, metadata])
  const auto& a = args.items;
  if (a.size() != 6 && a.size() != 7) {
    return Error(absl::StrCat("_rebuild_tensor_v2 takes 6 or 7 arguments, got ",
                              a.size()));
  }
  if (a[0]->kind != Kind::kStorage) {
    return Error("_rebuild_tensor_v2 argument 0 is not a storage");
  }
  if (a[1]->kind != Kind::kInt || a[1]->i < 0) {
    return Error("_rebuild_tensor_v2 storage offset is not a non-negative int");
  }
  auto size = IntTuple(*a[2]);
  auto stride = IntTuple(*a[3]);
  if (!size.ok() || !stride.ok() || size->size() != stride->size()) {
    return Error(
        "_rebuild_tensor_v2 size/stride are not matching tuples of "
        "non-negative ints");
  }
  const Storage& storage = storages_[a[0]->storage];
  const size_t esize = DTypeSize(storage.dtype);
  const uint64_t offset = static_cast<uint64_t>(a[1]->i);

  uint64_t numel = 1;
  uint64_t last = offset;  // highest element index the view can reach
  bool contiguous = true;
  uint64_t expected_stride = 1;
  bool overflow = false;
  for (size_t d = size->size(); d-- > 0;) {
    const uint64_t n = (*size)[d];
    overflow |= MulOverflows(numel, n, &numel);
    if (n == 0) continue;
    uint64_t reach = 0;
    overflow |= MulOverflows(n - 1, (*stride)[d], &reach);
    overflow |= AddOverflows(last, reach, &last);
    if (n != 1) {
      contiguous &= (*stride)[d] == expected_stride;
      overflow |= MulOverflows(expected_stride, n, &expected_stride);
    }
  }
  uint64_t nbytes = 0;
  overflow |= MulOverflows(numel, esize, &nbytes);
  if (overflow || nbytes > std::numeric_limits<size_t>::max() / 2) {
    return Error("tensor size overflows");
  }
  ValuePtr v = New(Kind::kTensor);
  v->tensor = std::make_unique<HostTensor>();
  HostTensor& t = *v->tensor;
  t.dtype = storage.dtype;
  t.shape.assign(size->begin(), size->end());
  t.nbytes = nbytes;
  if (numel == 0) {
    t.data = storage.bytes.data();
    t.owner = owner_;
    return v;
  }
  if (last >= storage.numel) {
    return Error(absl::StrCat("tensor view (offset ", offset,
                              ") reaches element ", last, " of storage '",
                              absl::CHexEscape(storage.key),
                              "' which has only ", storage.numel, " elements"));
  }
  if (contiguous) {
    t.data = storage.bytes.data() + offset * esize;
    t.owner = owner_;
    return v;
  }
  if (nbytes > copy_budget_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("torch file '", source_,
                     "': copying non-contiguous views needs more "
                     "than the budget of ",
                     copy_budget_, " bytes"));
  }
  copy_budget_ -= nbytes;
  auto buffer = std::make_shared<std::vector<uint8_t>>(nbytes);
  // Odometer over the view's indices; every source index is <= last, which
  // was checked against the storage above.
  const size_t ndim = size->size();
  std::vector<uint64_t> index(ndim, 0);
  uint64_t src = offset;
  const uint8_t* base = storage.bytes.data();
  uint8_t* dst = buffer->data();
  for (uint64_t k = 0; k < numel; ++k) {
    std::memcpy(dst + k * esize, base + src * esize, esize);
    for (size_t d = ndim; d-- > 0;) {
      if (++index[d] < (*size)[d]) {
        src += (*stride)[d];
        break;
      }
      src -= (*stride)[d] * ((*size)[d] - 1);
      index[d] = 0;
    }
  }
  t.data = buffer->data();
  t.owner = std::move(buffer);
  return v;
}

absl::StatusOr<ValuePtr> Unpickler::RebuildParameter(const Value& args,
                                                     size_t arity) {
  // _rebuild_parameter(data, requires_grad, backward_hooks[, state])
  if (args.items.size() != arity || args.items[0]->kind != Kind::kTensor) {
    return Error(absl::StrCat("_rebuild_parameter takes a tensor and ",
                              arity - 1, " more arguments"));
  }
  return args.items[0];
}

absl::Status Unpickler::Reduce() {
  LH_ASSIGN_OR_RETURN(ValuePtr args, Pop());
  LH_ASSIGN_OR_RETURN(ValuePtr func, Pop());
  if (args->kind != Kind::kTuple) return Error("REDUCE arguments not a tuple");
  if (func->kind != Kind::kGlobal) {
    return Error(absl::StrCat("REDUCE calls a ", KindName(func->kind)));
  }
  ValuePtr result;
  switch (func->global) {
    case Global::kOrderedDict:
      if (!args->items.empty()) {
        return Error("OrderedDict(...) with arguments is not supported");
      }
      result = New(Kind::kDict);
      break;
    case Global::kRebuildTensorV2: {
      LH_ASSIGN_OR_RETURN(result, RebuildTensor(*args));
      break;
    }
    case Global::kRebuildParameter: {
      LH_ASSIGN_OR_RETURN(result, RebuildParameter(*args, 3));
      break;
    }
    case Global::kRebuildParameterWithState: {
      LH_ASSIGN_OR_RETURN(result, RebuildParameter(*args, 4));
      break;
    }
    case Global::kStorageType:
      return Error("calling a storage type is not supported");
  }
  return Push(std::move(result));
}

absl::Status Unpickler::Step(uint8_t op, bool* stop) {
  switch (op) {
    case 0x80: {  // PROTO
      LH_RETURN_IF_ERROR(Need(1));
      if (Le(1) > 5) return Error("unknown pickle protocol");
      return absl::OkStatus();
    }
    case 0x95:  // FRAME: framing is a hint for buffered readers.
      LH_RETURN_IF_ERROR(Need(8));
      Le(8);
      return absl::OkStatus();
    case '.': {  // STOP
      *stop = true;
      return absl::OkStatus();
    }
    case '(':
      if (marks_.size() >= kMaxMarks) return Error("too many MARKs");
      marks_.push_back(stack_.size());
      return absl::OkStatus();
    case '0':
      return Pop().status();
    case '1':
      return PopMark().status();
    case '2': {
      LH_ASSIGN_OR_RETURN(ValuePtr top, Top());
      return Push(std::move(top));
    }
    case 'N':
      return Push(New(Kind::kNone));
    case 0x88:
    case 0x89: {
      ValuePtr v = New(Kind::kBool);
      v->i = op == 0x88;
      return Push(std::move(v));
    }
    case 'J':
    case 'K':
    case 'M': {
      const size_t n = op == 'J' ? 4 : op == 'K' ? 1 : 2;
      LH_RETURN_IF_ERROR(Need(n));
      ValuePtr v = New(Kind::kInt);
      const uint64_t raw = Le(n);
      v->i = op == 'J' ? static_cast<int32_t>(raw) : static_cast<int64_t>(raw);
      return Push(std::move(v));
    }
    case 0x8a: {  // LONG1: little-endian two's complement of n bytes.
      LH_RETURN_IF_ERROR(Need(1));
      const size_t n = Le(1);
      if (n > 8) return Error("LONG1 integer wider than 64 bits");
      LH_RETURN_IF_ERROR(Need(n));
      uint64_t raw = Le(n);
      if (n > 0 && n < 8 && (raw >> (8 * n - 1)) & 1) raw |= ~0ull << (8 * n);
      ValuePtr v = New(Kind::kInt);
      v->i = static_cast<int64_t>(raw);
      return Push(std::move(v));
    }
    case 'G': {  // BINFLOAT: big-endian IEEE double.
      LH_RETURN_IF_ERROR(Need(8));
      uint64_t raw = 0;
      for (int k = 0; k < 8; ++k) raw = (raw << 8) | in_[pos_ + k];
      pos_ += 8;
      ValuePtr v = New(Kind::kFloat);
      std::memcpy(&v->f, &raw, sizeof(raw));
      return Push(std::move(v));
    }
    case 'X':
    case 0x8c:
    case 'T':
    case 'U':
    case 'B':
    case 'C': {
      const bool short_len = op == 0x8c || op == 'U' || op == 'C';
      LH_RETURN_IF_ERROR(Need(short_len ? 1 : 4));
      const uint64_t n = Le(short_len ? 1 : 4);
      if (op == 'T' && n > 0x7fffffff) return Error("negative BINSTRING size");
      ValuePtr v = New(op == 'B' || op == 'C' ? Kind::kBytes : Kind::kString);
      LH_ASSIGN_OR_RETURN(v->s, ReadBytes(n));
      return Push(std::move(v));
    }
    case ')':
      return TupleN(0);
    case 0x85:
      return TupleN(1);
    case 0x86:
      return TupleN(2);
    case 0x87:
      return TupleN(3);
    case 't': {
      LH_ASSIGN_OR_RETURN(std::vector<ValuePtr> items, PopMark());
      LH_ASSIGN_OR_RETURN(ValuePtr t, MakeTuple(std::move(items)));
      return Push(std::move(t));
    }
    case ']':
      return Push(New(Kind::kList));
    case '}':
      return Push(New(Kind::kDict));
    case 'a': {
      LH_ASSIGN_OR_RETURN(ValuePtr item, Pop());
      std::vector<ValuePtr> items;
      items.push_back(std::move(item));
      return Appends(std::move(items));
    }
    case 'e': {
      LH_ASSIGN_OR_RETURN(std::vector<ValuePtr> items, PopMark());
      return Appends(std::move(items));
    }
    case 's': {
      LH_ASSIGN_OR_RETURN(ValuePtr value, Pop());
      LH_ASSIGN_OR_RETURN(ValuePtr key, Pop());
      std::vector<ValuePtr> items;
      items.push_back(std::move(key));
      items.push_back(std::move(value));
      return SetItems(std::move(items));
    }
    case 'u': {
      LH_ASSIGN_OR_RETURN(std::vector<ValuePtr> items, PopMark());
      return SetItems(std::move(items));
    }
    case 'h':
    case 'j': {
      const size_t n = op == 'h' ? 1 : 4;
      LH_RETURN_IF_ERROR(Need(n));
      return Get(Le(n));
    }
    case 'q':
    case 'r': {
      const size_t n = op == 'q' ? 1 : 4;
      LH_RETURN_IF_ERROR(Need(n));
      return Memo(Le(n));
    }
    case 0x94:
      return Memo(memo_.size());
    case 'c':
      return LoadGlobal();
    case 'R':
      return Reduce();
    case 'Q':
      return PersistentLoad();
    case 'b': {
      // BUILD sets attributes; torch uses it for OrderedDict._metadata of
      // nn.Module state dicts, which carries no tensors: drop it.
      LH_ASSIGN_OR_RETURN(ValuePtr state, Pop());
      LH_ASSIGN_OR_RETURN(ValuePtr inst, Top());
      if (inst->kind != Kind::kDict) {
        return Error(absl::StrCat("BUILD on a ", KindName(inst->kind),
                                  " is not supported (only OrderedDict)"));
      }
      return absl::OkStatus();
    }
    default:
      return Error(absl::StrCat("disallowed pickle opcode ", OpcodeName(op),
                                " (0x", absl::Hex(op, absl::kZeroPad2), ")"));
  }
}

absl::StatusOr<ValuePtr> Unpickler::Run() {
  while (pos_ < in_.size()) {
    op_offset_ = pos_;
    const uint8_t op = in_[pos_++];
    bool stop = false;
    LH_RETURN_IF_ERROR(Step(op, &stop));
    if (values_created_ > kMaxValues) {
      return Error(
          absl::StrCat("pickle creates more than ", kMaxValues, " objects"));
    }
    if (stop) return Pop();
  }
  op_offset_ = pos_;
  return Error("pickle ends without STOP");
}

// Picks the name -> tensor dict out of the unpickled object.
absl::StatusOr<TensorMap> ToTensorMap(const Value& root,
                                      const std::string& source) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(
        "torch file '", source, "' does not hold a state dict: ", what));
  };
  if (root.kind != Kind::kDict) {
    return bad(absl::StrCat("top-level object is a ", KindName(root.kind),
                            ", expected a dict of name -> tensor"));
  }
  const Value* dict = &root;
  bool has_tensor = false;
  const Value* nested = nullptr;
  int nested_count = 0;
  for (size_t k = 1; k < root.items.size(); k += 2) {
    const Kind kind = root.items[k]->kind;
    has_tensor |= kind == Kind::kTensor;
    if (kind == Kind::kDict) {
      nested = root.items[k].get();
      ++nested_count;
    }
  }
  // {"state_dict": {...}, "epoch": 3}-style wrappers: exactly one nested
  // dict and no tensors beside it.
  if (!has_tensor && nested_count == 1) dict = nested;

  TensorMap out;
  for (size_t k = 0; k + 1 < dict->items.size(); k += 2) {
    const Value& key = *dict->items[k];
    const Value& value = *dict->items[k + 1];
    if (key.kind != Kind::kString) {
      return bad(
          absl::StrCat("a key is a ", KindName(key.kind), ", expected str"));
    }
    if (value.kind != Kind::kTensor) {
      return bad(absl::StrCat("entry '", absl::CHexEscape(key.s), "' is a ",
                              KindName(value.kind), ", expected a tensor"));
    }
    out.insert_or_assign(key.s, *value.tensor);  // later keys win, as in Python
  }
  return out;
}

// The legacy (pre-1.6) format starts with the pickled magic number
// 0x1950a86a20f9469cfc6c as a protocol-2 LONG1.
constexpr uint8_t kLegacyMagic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c,
                                    0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

absl::Status ErrnoStatus(int err, const std::string& what) {
  std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace

absl::StatusOr<TensorMap> UnpickleStateDict(absl::Span<const uint8_t> pickle,
                                            const StorageLookup& lookup,
                                            const std::string& source,
                                            std::shared_ptr<const void> owner,
                                            uint64_t input_size,
                                            const TorchReadOptions& options) {
  uint64_t budget = options.max_copy_bytes;
  if (budget == 0) {
    budget = input_size > (std::numeric_limits<uint64_t>::max() >> 2)
                 ? std::numeric_limits<uint64_t>::max()
                 : 2 * input_size + (1 << 20);
  }
  Unpickler unpickler(pickle, lookup, source, std::move(owner), budget);
  LH_ASSIGN_OR_RETURN(ValuePtr root, unpickler.Run());
  return ToTensorMap(*root, source);
}

absl::StatusOr<TensorMap> ParseTorchZip(const uint8_t* data, size_t size,
                                        const std::string& source,
                                        std::shared_ptr<const void> owner,
                                        const TorchReadOptions& options) {
  if (size >= sizeof(kLegacyMagic) &&
      std::memcmp(data, kLegacyMagic, sizeof(kLegacyMagic)) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "torch file '", source,
        "' is in the legacy torch.save format (PyTorch < 1.6), which is not "
        "supported; re-save it with torch>=1.6"));
  }
  if (size < 4 || std::memcmp(data, "PK\x03\x04", 4) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "torch file '", source,
        "' is not a torch.save zip archive (no zip signature at the start)"));
  }
  ZipReadOptions zip_options;
  zip_options.verify_crc = options.verify_crc;
  LH_ASSIGN_OR_RETURN(const ZipArchive archive,
                      ZipArchive::Parse(data, size, source, zip_options));
  if (archive.Contains("byteorder")) {
    LH_ASSIGN_OR_RETURN(const absl::Span<const uint8_t> order,
                        archive.Read("byteorder"));
    const absl::string_view value(reinterpret_cast<const char*>(order.data()),
                                  order.size());
    if (value != "little") {
      return absl::InvalidArgumentError(absl::StrCat(
          "torch file '", source, "' has byte order '", absl::CHexEscape(value),
          "'; only little-endian is supported"));
    }
  }
  if (!archive.Contains("data.pkl")) {
    return absl::InvalidArgumentError(
        absl::StrCat("torch file '", source, "' has no '", archive.prefix(),
                     "data.pkl': not a torch.save archive"));
  }
  LH_ASSIGN_OR_RETURN(const absl::Span<const uint8_t> pickle,
                      archive.Read("data.pkl"));
  const StorageLookup lookup =
      [&](const std::string& key) -> absl::StatusOr<absl::Span<const uint8_t>> {
    const std::string name = "data/" + key;
    if (!archive.Contains(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "torch file '", source, "': storage '", absl::CHexEscape(key),
          "' has no entry '", archive.prefix(), absl::CHexEscape(name), "'"));
    }
    return archive.Read(name);
  };
  return UnpickleStateDict(pickle, lookup, source, std::move(owner), size,
                           options);
}

absl::StatusOr<TensorMap> ReadTorchFile(const std::string& path,
                                        const TorchReadOptions& options) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return ErrnoStatus(errno, absl::StrCat("cannot open '", path, "'"));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus(err, absl::StrCat("cannot stat '", path, "'"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("torch file '", path, "' is empty"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (map == MAP_FAILED) {
    return ErrnoStatus(err, absl::StrCat("cannot map '", path, "'"));
  }
  std::shared_ptr<const void> owner(
      map, [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
  return ParseTorchZip(static_cast<const uint8_t*>(map), size, path,
                       std::move(owner), options);
}

}  // namespace lorahub::io
