#include "core/hub/model_snapshot.h"

#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/hub/hub_validation.h"
#include "core/io/safetensors.h"

namespace lorahub::hub {

absl::StatusOr<HubModelRef> ParseHubModelRef(absl::string_view spec) {
  if (spec.empty() || spec[0] == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("--model '", spec, "': an absolute path that is not a model directory"));
  }
  if (absl::StrContains(spec, "..")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model '", spec, "': '..' is not allowed in a hub repo id"));
  }
  HubModelRef ref;
  const size_t at = spec.find('@');
  ref.repo_id = std::string(spec.substr(0, at));
  if (at != absl::string_view::npos) {
    ref.revision = std::string(spec.substr(at + 1));
    if (ref.revision.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--model '", spec, "': empty revision after '@'"));
    }
    if (absl::Status s = ValidateRevision(ref.revision); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--model '", spec, "': ", s.message()));
    }
  }
  if (ref.repo_id.find('/') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model '", spec, "': not a directory and not ORG/NAME[@REVISION]"));
  }
  if (absl::Status s = ValidateRepoId(ref.repo_id); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--model '", spec, "': ", s.message()));
  }
  return ref;
}

namespace {

class Fetcher {
 public:
  Fetcher(HubClient& hub, const HubModelRef& ref,
          const std::function<void(const std::string&, uint64_t, uint64_t)>& progress)
      : hub_(hub), ref_(ref), progress_(progress) {}

  // Downloads one file; the first success pins the commit.
  absl::StatusOr<CachedFile> Get(const std::string& file) {
    ProgressCallback cb;
    if (progress_) {
      cb = [this, file](uint64_t done, uint64_t total) {
        progress_(file, done, total);
        return true;
      };
    }
    const std::string rev = snapshot_.commit.empty() ? ref_.revision : snapshot_.commit;
    absl::StatusOr<CachedFile> f = hub_.Download(ref_.repo_id, rev, file, cb);
    if (!f.ok()) {
      return absl::Status(f.status().code(), absl::StrCat(ref_.repo_id, "/", file, ": ",
                                                          f.status().message()));
    }
    if (snapshot_.commit.empty()) {
      snapshot_.commit = f->commit;
      const size_t slash = f->path.rfind('/');
      snapshot_.dir = f->path.substr(0, slash);
    }
    snapshot_.files.push_back(file);
    return f;
  }

  ModelSnapshot& snapshot() { return snapshot_; }

 private:
  HubClient& hub_;
  const HubModelRef& ref_;
  const std::function<void(const std::string&, uint64_t, uint64_t)>& progress_;
  ModelSnapshot snapshot_;
};

absl::StatusOr<std::string> ReadText(const std::string& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat("cannot open ", path));
  std::string text(max_bytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": larger than ", max_bytes, " bytes"));
  }
  return text;
}

}  // namespace

absl::StatusOr<ModelSnapshot> DownloadModelSnapshot(
    HubClient& hub, const HubModelRef& ref,
    const std::function<void(const std::string&, uint64_t, uint64_t)>& progress) {
  if (absl::Status s = ValidateRepoId(ref.repo_id); !s.ok()) return s;
  if (!ref.revision.empty()) {
    if (absl::Status s = ValidateRevision(ref.revision); !s.ok()) return s;
  }
  // Offline, a file that is not cached fails with FailedPrecondition: for
  // the alternatives and the optional files that means "not there" too.
  const bool offline = hub.options().offline.value_or(false);
  auto missing = [offline](const absl::Status& s) {
    return absl::IsNotFound(s) || (offline && absl::IsFailedPrecondition(s));
  };
  Fetcher fetch(hub, ref, progress);
  for (const char* required : {"config.json", "spiece.model"}) {
    if (absl::StatusOr<CachedFile> f = fetch.Get(required); !f.ok()) return f.status();
  }
  absl::StatusOr<CachedFile> weights = fetch.Get("model.safetensors");
  if (missing(weights.status())) {
    absl::StatusOr<CachedFile> index = fetch.Get("model.safetensors.index.json");
    if (index.ok()) {
      absl::StatusOr<std::string> text = ReadText(index->path, 64 << 20);
      if (!text.ok()) return text.status();
      absl::StatusOr<io::SafetensorsIndex> parsed = io::ParseSafetensorsIndex(
          *text, absl::StrCat(ref.repo_id, "/model.safetensors.index.json"));
      if (!parsed.ok()) return parsed.status();
      std::set<std::string> shards;
      for (const auto& [tensor, shard] : parsed->weight_map) shards.insert(shard);
      for (const std::string& shard : shards) {
        if (absl::Status s = ValidateFilename(shard); !s.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(
              ref.repo_id, "/model.safetensors.index.json: shard '", shard, "': ",
              s.message()));
        }
        if (absl::StatusOr<CachedFile> f = fetch.Get(shard); !f.ok()) return f.status();
      }
      weights = *index;
    } else if (absl::IsNotFound(index.status())) {
      weights = fetch.Get("pytorch_model.bin");
      if (missing(weights.status())) {
        return absl::NotFoundError(absl::StrCat(
            ref.repo_id, ": no model.safetensors, model.safetensors.index.json or "
                         "pytorch_model.bin at revision '",
            ref.revision.empty() ? "main" : ref.revision, "'",
            offline ? " in the cache (offline)" : ""));
      }
    } else {
      return index.status();
    }
  }
  if (!weights.ok()) return weights.status();
  for (const char* optional : {"generation_config.json", "tokenizer_config.json"}) {
    absl::StatusOr<CachedFile> f = fetch.Get(optional);
    if (!f.ok() && !missing(f.status())) return f.status();
  }
  return std::move(fetch.snapshot());
}

}  // namespace lorahub::hub
