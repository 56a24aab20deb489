// Crash-safe safetensors writing (see safetensors.h): the header is built in memory, header and
// tensor data stream into `<path>.tmp.<pid>` in the destination directory, which is fsynced and
// renamed over `<path>`, so a crash leaves either the old file or the complete new one, never a
// half-written file under the real name.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "runtime/formats/safetensors.h"
#include "runtime/formats/safetensors_detail.h"

namespace sy {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;
using namespace safetensors_detail;

// Writes `path` through a temporary file in the same directory: data goes to `<path>.tmp.<pid>`,
// commit() fsyncs and renames it over `path`. Without commit() the temporary file is removed.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path)
      : path_(path), tmp_path_(path + ".tmp." + std::to_string(::getpid())) {
    fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    SY_CHECK(fd_ >= 0, "cannot create ", tmp_path_, ": ", errno_text(errno));
  }
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_path_.c_str());
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      SY_CHECK(w > 0, "cannot write ", tmp_path_, ": ", errno_text(errno));
      p += w;
      n -= static_cast<size_t>(w);
    }
  }

  void commit() {
    SY_CHECK(::fsync(fd_) == 0, "cannot sync ", tmp_path_, ": ", errno_text(errno));
    int rc = ::close(fd_);
    fd_ = -1;
    SY_CHECK(rc == 0, "cannot close ", tmp_path_, ": ", errno_text(errno));
    SY_CHECK(::rename(tmp_path_.c_str(), path_.c_str()) == 0, "cannot rename ", tmp_path_, " to ",
             path_, ": ", errno_text(errno));
    committed_ = true;
  }

 private:
  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

// Bytes of `t`'s data; throws naming `path` and the tensor when the tensor cannot be written.
uint64_t tensor_bytes(const std::string& path, const TensorToWrite& t) {
  SY_CHECK(is_float_dtype(t.dtype), path, ": tensor \"", t.name, "\": cannot write dtype ",
           dtype_name(t.dtype), " (supported: F32, BF16, F16)");
  uint64_t bytes = 0;
  SY_CHECK(checked_bytes(t.shape, dtype_size(t.dtype), &bytes), path, ": tensor \"", t.name,
           "\": invalid shape ", shape_str(t.shape));
  SY_CHECK(t.data != nullptr || bytes == 0, path, ": tensor \"", t.name, "\": null data");
  return bytes;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps "__metadata__" first and the tensors in the order given.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& meta = header["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
  }
  std::set<std::string> names;
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    SY_CHECK(!t.name.empty() && t.name != "__metadata__", path, ": invalid tensor name \"", t.name,
             "\"");
    SY_CHECK(names.insert(t.name).second, path, ": tensor \"", t.name, "\" given twice");
    const uint64_t bytes = tensor_bytes(path, t);
    uint64_t end = 0;
    SY_CHECK(!__builtin_add_overflow(offset, bytes, &end), path, ": data section overflows");
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", nlohmann::ordered_json::array({offset, end})}};
    sizes.push_back(bytes);
    offset = end;
  }

  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    SY_FAIL(path, ": cannot encode the header: ", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(text.size() >> (8 * i));

  AtomicFile out(path);
  out.write(length, sizeof(length));
  out.write(text.data(), text.size());
  for (size_t i = 0; i < tensors.size(); ++i) out.write(tensors[i].data, sizes[i]);
  out.commit();
}

void write_checkpoint(const std::string& model_dir, const std::vector<TensorToWrite>& tensors,
                      uint64_t max_shard_bytes) {
  const fs::path dir(model_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  SY_CHECK(!ec, "cannot create model directory ", model_dir, ": ", ec.message());

  // Greedy, in order, like transformers' shard_checkpoint: a tensor starts a new shard when adding
  // it would take a non-empty shard past max_shard_bytes; a larger tensor gets a shard of its own.
  std::vector<std::vector<TensorToWrite>> shards(1);
  std::set<std::string> names;
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (const TensorToWrite& t : tensors) {
    SY_CHECK(names.insert(t.name).second, model_dir, ": tensor \"", t.name, "\" given twice");
    const uint64_t bytes = tensor_bytes(model_dir, t);
    if (!shards.back().empty() &&
        (shard_bytes > max_shard_bytes || bytes > max_shard_bytes - shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(t);
    shard_bytes += bytes;
    SY_CHECK(!__builtin_add_overflow(total_bytes, bytes, &total_bytes), model_dir,
             ": total tensor bytes overflow");
  }

  const std::string index_path = (dir / kIndexFileName).string();
  if (shards.size() == 1) {
    write_safetensors((dir / kSingleFileName).string(), tensors);
    // A stale index would take precedence over the new file in Checkpoint::open.
    fs::remove(index_path, ec);
    SY_CHECK(!ec, "cannot remove stale ", index_path, ": ", ec.message());
    return;
  }

  json weight_map = json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char shard_name[64];
    std::snprintf(shard_name, sizeof(shard_name), "model-%05zu-of-%05zu.safetensors", i + 1,
                  shards.size());
    write_safetensors((dir / shard_name).string(), shards[i]);
    for (const TensorToWrite& t : shards[i]) weight_map[t.name] = shard_name;
  }
  json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  const std::string text = index.dump(2) + "\n";
  AtomicFile out(index_path);
  out.write(text.data(), text.size());
  out.commit();
}

}  // namespace sy
