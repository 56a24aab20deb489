// A regular file mapped read-only into memory, for the checkpoint readers (safetensors, GGUF):
// the mapping lives as long as the object.
#pragma once

#include <cstdint>
#include <string>

namespace sy {

class MappedFile {
 public:
  // Throws naming `path` when it cannot be opened, is not a regular file, or cannot be mapped.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(map_); }
  uint64_t size() const { return size_; }

 private:
  void* map_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace sy
