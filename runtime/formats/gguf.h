// GGUF files (llama.cpp's checkpoints): strict, memory-mapped reading.
//
// Layout (little-endian): "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata count;
// the metadata, each a string key, a u32 value type and the value (arrays: a u32 element type, a
// u64 count, the elements; strings: a u64 length, the bytes); the tensor infos, each a string
// name, a u32 dimension count, u64 dimensions (innermost first), a u32 GGML type and a u64
// offset; then, at the next multiple of general.alignment (32 by default), the data section.
//
// Reading is strict: every length and count is checked against the bytes left before anything is
// allocated from it, keys and tensor names are unique, values have their declared types, every
// tensor's type is known, its rows hold whole blocks, its offset is aligned, and its data lies
// inside the file and overlaps no other. Any violation throws sy::Error naming the file and the
// key or tensor; nothing is read past the end of the mapping.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/quant.h"
#include "runtime/formats/mapped_file.h"

namespace sy {

// GGUF's metadata value types.
enum class GgufType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

// One metadata value: a scalar (integers in `i` or `u`, floats in `f`, strings in `s`) or an
// array of one scalar type (its elements in `ints`, `floats` or `strings`).
struct GgufValue {
  GgufType type = GgufType::kU8;
  GgufType elem_type = GgufType::kU8;  // arrays
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string s;
  std::vector<int64_t> ints;  // integer and bool arrays (u64 elements above INT64_MAX refused)
  std::vector<double> floats;
  std::vector<std::string> strings;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> dims;  // innermost first, as GGUF stores them
  cpu::GgmlType type = cpu::GgmlType::kF32;
  uint64_t offset = 0;  // from the start of the file
  uint64_t bytes = 0;
  int64_t elements() const;
};

class GgufFile {
 public:
  static std::unique_ptr<GgufFile> open(const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(const std::string& name) const;  // null when absent
  const uint8_t* data(const GgufTensor& t) const { return map_->data() + t.offset; }
  uint64_t file_bytes() const { return map_->size(); }

  const GgufValue* find(const std::string& key) const;  // null when absent
  // The value of `key`, which must be present and of a matching type: any integer type that
  // fits (uint), any float type (number), a string, or an array of strings, of numbers, or of
  // integers. Throw naming the file and the key otherwise.
  uint64_t uint(const std::string& key) const;
  double number(const std::string& key) const;
  const std::string& string(const std::string& key) const;
  const std::vector<std::string>& strings(const std::string& key) const;
  const std::vector<double>& numbers(const std::string& key) const;
  const std::vector<int64_t>& integers(const std::string& key) const;

  // Refusal limits: a string of more bytes, or an array of more elements.
  static constexpr uint64_t kMaxStringBytes = 1ull << 20;
  static constexpr uint64_t kMaxArrayElements = 1ull << 24;
  static constexpr uint32_t kMaxDims = 4;

 private:
  GgufFile() = default;
  const GgufValue& get(const std::string& key) const;

  std::string path_;
  std::unique_ptr<MappedFile> map_;
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> index_;  // tensor name -> position in tensors_
};

// Whether `path` names a GGUF file (ends in ".gguf").
bool is_gguf_path(const std::string& path);

// A GGUF checkpoint: one file, or the splits of llama.cpp's gguf-split
// (PREFIX-00001-of-0000N.gguf .. PREFIX-0000N-of-0000N.gguf, each with split.no, split.count,
// and split.tensors.count in the first). Any split's path opens the whole set; the metadata is
// the first split's. Tensor names are unique across the set.
class GgufModelFiles {
 public:
  static GgufModelFiles open(const std::string& path);

  const GgufFile& meta() const { return *files_.front(); }
  size_t n_files() const { return files_.size(); }
  // The tensor `name` and the file holding it; null when absent.
  const GgufTensor* find_tensor(const std::string& name, const GgufFile** file) const;
  uint64_t total_bytes() const;  // of every file in the set

 private:
  std::vector<std::unique_ptr<GgufFile>> files_;
  std::map<std::string, std::pair<const GgufFile*, const GgufTensor*>> tensors_;
};

}  // namespace sy
