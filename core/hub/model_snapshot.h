// A base model's snapshot from the hub: `lorahub serve --model ORG/NAME[@REV]`
// downloads what LoadT5 and the tokenizer need into the hub cache (HF layout,
// so transformers and huggingface_hub reuse it) and loads the model from
// snapshots/<commit>/.
//
// Files, in order (each through HubClient::Download; the first file's commit
// pins the others, so every file comes from one commit):
//   config.json, spiece.model                       required;
//   model.safetensors, else model.safetensors.index.json and every shard it
//   names, else pytorch_model.bin                   (transformers' order);
//   generation_config.json, tokenizer_config.json   optional (NotFound is
//                                                   fine).
// Errors are HubClient's (NotFound names the repo, revision or file; offline,
// FailedPrecondition for a required file that is not cached);
// InvalidArgument for a bad reference or a shard index naming an unsafe path.
//
// Thread-safety: pure apart from the HubClient (thread-safe) and the cache.
// Blocks for the downloads.
#ifndef LORAHUB_CORE_HUB_MODEL_SNAPSHOT_H_
#define LORAHUB_CORE_HUB_MODEL_SNAPSHOT_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/hub/hub_client.h"

namespace lorahub::hub {

// "org/name" or "org/name@revision".
struct HubModelRef {
  std::string repo_id;
  std::string revision;  // "" means main
};

// Parses and validates "org/name[@revision]" (ValidateRepoId,
// ValidateRevision). InvalidArgument naming the spec for an absolute path, a
// ".." anywhere, an empty revision after '@' or an invalid id.
absl::StatusOr<HubModelRef> ParseHubModelRef(absl::string_view spec);

struct ModelSnapshot {
  std::string dir;     // snapshots/<commit> of the repo in the cache
  std::string commit;  // the commit every file came from
  std::vector<std::string> files;  // downloaded or found, in order
};

// Fetches the model files of `ref` (see the file comment). `progress`, when
// set, is called per file as bytes arrive.
absl::StatusOr<ModelSnapshot> DownloadModelSnapshot(
    HubClient& hub, const HubModelRef& ref,
    const std::function<void(const std::string& file, uint64_t done, uint64_t total)>&
        progress = nullptr);

}  // namespace lorahub::hub

#endif  // LORAHUB_CORE_HUB_MODEL_SNAPSHOT_H_
