// Hugging Face safetensors checkpoints: strict, memory-mapped reading and writing.
//
// File layout: [u64 little-endian header length N][N bytes of JSON header][data section].
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} with offsets
// relative to the start of the data section, plus an optional "__metadata__" object.
//
// Reading is strict: the header length is bounded, the JSON must be well formed, every offset
// lies inside the file, end - begin equals dtype size x product(shape) (overflow-checked), and no
// two tensors overlap. Any violation throws sy::Error naming the file and the tensor.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "runtime/formats/mapped_file.h"

namespace sy {

// Header lengths above this are refused (the format's reference reader uses 100 MB).
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offset of the first element, relative to the data section
  uint64_t end = 0;    // one past the last byte, relative to the data section
};

// One memory-mapped .safetensors file. The mapping lives as long as the object.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;  // nullptr when absent
  // Pointer to the first byte of `entry`'s data inside the mapping.
  const uint8_t* data(const SafetensorsEntry& entry) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_bytes() const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::unique_ptr<MappedFile> map_;
  const uint8_t* data_section_ = nullptr;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;  // name -> position in entries_
  std::map<std::string, std::string> metadata_;
};

// A range [begin, end) of one dimension of a tensor; dim = -1 means the whole tensor.
struct Slice {
  int dim = -1;
  int64_t begin = 0;
  int64_t end = 0;
};

// Progress of a checkpoint load, reported to a callback (see Checkpoint::set_progress).
struct LoadProgress {
  uint64_t bytes_read = 0;   // bytes of tensor data copied so far
  uint64_t bytes_total = 0;  // bytes of tensor data this rank will read (0 when unknown)
  int64_t tensors_read = 0;  // tensors (or slices) copied so far
  double seconds = 0;        // since the first read
};

// A model directory: either one `model.safetensors`, or shards listed by
// `model.safetensors.index.json` ("weight_map": tensor name -> shard file name).
class Checkpoint {
 public:
  static Checkpoint open(const std::string& model_dir);

  bool has(const std::string& name) const;
  // The entry for `name`; throws naming the tensor and the directory when it is missing.
  const SafetensorsEntry& entry(const std::string& name) const;
  // Copies tensor `name`, restricted to `slice`, converted to out.dtype (F32, BF16 or F16), into
  // the contiguous host tensor `out`. The tensor's full shape must equal `shape` and out's shape
  // must equal the sliced shape; a mismatch throws naming the tensor, expected and actual shapes.
  void read(const std::string& name, const std::vector<int64_t>& shape, const Tensor& out,
            const Slice& slice = {}) const;

  // Called after each read with the running totals; set `bytes_total` for a percentage.
  void set_progress(std::function<void(const LoadProgress&)> callback, uint64_t bytes_total);
  const LoadProgress& progress() const { return progress_; }
  std::vector<std::string> tensor_names() const;
  uint64_t file_bytes() const;  // of every file of the checkpoint

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, const SafetensorsEntry*>>
      tensors_;  // name -> file, entry
  std::function<void(const LoadProgress&)> callback_;
  mutable LoadProgress progress_;
  mutable double start_time_ = -1;
};

// One tensor to write: `data` holds product(shape) elements of `dtype`.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes one safetensors file (tensors in the given order, header padded to 8 bytes).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes `model.safetensors` when everything fits in `max_shard_bytes`, else shards named
// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, like save_pretrained.
void write_checkpoint(const std::string& model_dir, const std::vector<TensorToWrite>& tensors,
                      uint64_t max_shard_bytes);

}  // namespace sy
