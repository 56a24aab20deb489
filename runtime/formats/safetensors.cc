// Strict, memory-mapped safetensors reading (see safetensors.h; writing is in
// safetensors_writer.cc).
//
// Reading maps the whole file read-only and validates the header before any pointer into the
// mapping is handed out: once SafetensorsFile::open returns, every entry's [begin, end) lies inside
// the data section, end - begin equals dtype size x product(shape), and the product of the shape's
// non-zero dimensions times the dtype size fits in int64. Checkpoint::read relies on that to index
// the mapping with plain int64 arithmetic and no further bounds checks.
#include "runtime/formats/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <system_error>

#include "runtime/formats/safetensors_detail.h"

namespace sy {

// Element loads and stores below memcpy host-order values; safetensors data is little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes little-endian");

namespace safetensors_detail {

std::string errno_text(int err) {
  return std::error_code(err, std::generic_category()).message();
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

bool is_float_dtype(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

// Bytes of a tensor of `shape` with `elem_bytes`-byte elements. False when a dimension is negative
// or when the product of the non-zero dimensions times elem_bytes overflows int64; checking the
// non-zero product (rather than stopping at a zero) means no partial product of an accepted shape
// can overflow either, whatever order a reader multiplies the dimensions in.
bool checked_bytes(const std::vector<int64_t>& shape, size_t elem_bytes, uint64_t* bytes) {
  int64_t product = static_cast<int64_t>(elem_bytes);
  bool has_zero = false;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(product, d, &product)) return false;
  }
  *bytes = has_zero ? 0 : static_cast<uint64_t>(product);
  return true;
}

}  // namespace safetensors_detail

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;
using namespace safetensors_detail;

// The dtypes switchyard reads and writes, under their safetensors header names.
bool parse_dtype(const std::string& name, DType* dtype) {
  if (name == "F32")
    *dtype = DType::kF32;
  else if (name == "BF16")
    *dtype = DType::kBF16;
  else if (name == "F16")
    *dtype = DType::kF16;
  else
    return false;
  return true;
}

// Parses [first, last) as JSON, throwing one sy::Error naming `source` when it is malformed or when
// an object repeats a key (nlohmann silently keeps one of the values, which would let two header
// entries share a name).
json parse_json_strict(const char* first, const char* last, const std::string& source) {
  std::vector<std::set<std::string>> keys;  // the keys seen so far in each open object
  std::string top_key;                      // the current key of the outermost object
  std::string duplicate, duplicate_in;
  json::parser_callback_t check_keys = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (keys.size() == 1) top_key = key;
      if (!keys.back().insert(key).second && duplicate.empty()) {
        duplicate = key;
        duplicate_in = keys.size() == 1 ? "" : top_key;
      }
    }
    return true;
  };
  json j;
  try {
    j = json::parse(first, last, check_keys);
  } catch (const json::exception& e) {
    SY_FAIL(source, ": malformed JSON: ", e.what());
  }
  SY_CHECK(duplicate.empty(), source, ": duplicate key \"", duplicate, "\"",
           duplicate_in.empty() ? "" : " in \"", duplicate_in, duplicate_in.empty() ? "" : "\"");
  return j;
}

// A file descriptor closed on scope exit.

// One header entry, validated against the data section of `data_bytes` bytes.
SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& value,
                             uint64_t data_bytes) {
  // Every message starts "<file>: tensor "<name>": ".
  auto where = [&] { return path + ": tensor \"" + name + "\": "; };
  SY_CHECK(value.is_object(), where(), "entry must be a JSON object, got ", value.dump());
  SafetensorsEntry e;
  e.name = name;

  auto dtype = value.find("dtype");
  SY_CHECK(dtype != value.end() && dtype->is_string(), where(), "\"dtype\" must be a string");
  const auto& dtype_text = dtype->get_ref<const std::string&>();
  SY_CHECK(parse_dtype(dtype_text, &e.dtype), where(), "unsupported dtype \"", dtype_text,
           "\" (supported: F32, BF16, F16)");

  auto shape = value.find("shape");
  SY_CHECK(shape != value.end() && shape->is_array(), where(),
           "\"shape\" must be an array of integers");
  for (const json& d : *shape) {
    SY_CHECK(d.is_number_integer(), where(), "shape dimension ", d.dump(), " is not an integer");
    if (d.is_number_unsigned()) {
      uint64_t u = d.get<uint64_t>();
      SY_CHECK(u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where(),
               "shape dimension ", u, " is too large");
      e.shape.push_back(static_cast<int64_t>(u));
    } else {
      int64_t s = d.get<int64_t>();
      SY_CHECK(s >= 0, where(), "negative shape dimension ", s);
      e.shape.push_back(s);
    }
  }

  auto offsets = value.find("data_offsets");
  const bool offsets_ok = offsets != value.end() && offsets->is_array() && offsets->size() == 2 &&
                          (*offsets)[0].is_number_unsigned() && (*offsets)[1].is_number_unsigned();
  SY_CHECK(offsets_ok, where(), "\"data_offsets\" must be two non-negative integers [begin, end]");
  e.begin = (*offsets)[0].get<uint64_t>();
  e.end = (*offsets)[1].get<uint64_t>();
  SY_CHECK(e.begin <= e.end, where(), "data_offsets [", e.begin, ", ", e.end, "] are reversed");
  SY_CHECK(e.end <= data_bytes, where(), "data_offsets [", e.begin, ", ", e.end,
           "] run past the end of the data section (", data_bytes, " bytes)");

  uint64_t bytes = 0;
  SY_CHECK(checked_bytes(e.shape, dtype_size(e.dtype), &bytes), where(), "shape ",
           shape_str(e.shape), " of ", dtype_text, " overflows a 64-bit byte count");
  SY_CHECK(e.end - e.begin == bytes, where(), "data_offsets [", e.begin, ", ", e.end, "] hold ",
           e.end - e.begin, " bytes but ", dtype_text, " ", shape_str(e.shape), " needs ", bytes);
  return e;
}

// The "__metadata__" object: string keys to string values.
std::map<std::string, std::string> parse_metadata(const std::string& path, const json& value) {
  SY_CHECK(value.is_object(), path, ": \"__metadata__\" must be a JSON object");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, v] : value.items()) {
    SY_CHECK(v.is_string(), path, ": \"__metadata__\" value of \"", key, "\" must be a string");
    metadata[key] = v.get<std::string>();
  }
  return metadata;
}

// Validates the header of the `file_bytes`-byte mapping `map` and fills `entries` (sorted by
// begin offset), `metadata` and `data_start` (offset of the data section in the file).
void parse_header(const std::string& path, const uint8_t* map, uint64_t file_bytes,
                  std::vector<SafetensorsEntry>* entries,
                  std::map<std::string, std::string>* metadata, uint64_t* data_start) {
  uint64_t header_bytes = 0;
  for (int i = 0; i < 8; ++i) header_bytes |= static_cast<uint64_t>(map[i]) << (8 * i);
  SY_CHECK(header_bytes <= kMaxSafetensorsHeaderBytes, path, ": header length ", header_bytes,
           " exceeds the limit of ", kMaxSafetensorsHeaderBytes, " bytes");
  SY_CHECK(header_bytes <= file_bytes - 8, path, ": header length ", header_bytes,
           " runs past the end of the ", file_bytes, "-byte file (truncated?)");
  *data_start = 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - *data_start;

  const char* text = reinterpret_cast<const char*>(map + 8);
  json header = parse_json_strict(text, text + header_bytes, path + " (header)");
  SY_CHECK(header.is_object(), path, ": header must be a JSON object, got ", header.type_name());

  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      *metadata = parse_metadata(path, value);
      continue;
    }
    entries->push_back(parse_entry(path, name, value, data_bytes));
  }

  // No two tensors may share a byte. Empty tensors own no bytes and may sit anywhere.
  std::sort(entries->begin(), entries->end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const SafetensorsEntry* last = nullptr;  // the non-empty entry reaching furthest so far
  for (const SafetensorsEntry& e : *entries) {
    if (e.begin == e.end) continue;
    SY_CHECK(last == nullptr || e.begin >= last->end, path, ": tensor \"", e.name,
             "\" data_offsets [", e.begin, ", ", e.end, "] overlap tensor \"",
             last ? last->name : "", "\" [", last ? last->begin : 0, ", ", last ? last->end : 0,
             "]");
    last = &e;
  }
}

// Element conversion for Checkpoint::read: one contiguous run of n elements from src to dst.
template <DType S>
inline float load_elem(const uint8_t* p) {
  if constexpr (S == DType::kF32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, p, 2);
    if constexpr (S == DType::kBF16)
      return bf16_to_f32(h);
    else
      return f16_to_f32(h);
  }
}

template <DType D>
inline void store_elem(uint8_t* p, float f) {
  if constexpr (D == DType::kF32) {
    std::memcpy(p, &f, 4);
  } else {
    uint16_t h = D == DType::kBF16 ? f32_to_bf16(f) : f32_to_f16(f);
    std::memcpy(p, &h, 2);
  }
}

constexpr size_t elem_bytes(DType d) {
  return d == DType::kF32 ? 4 : 2;
}

template <DType S, DType D>
void convert_run(const uint8_t* src, uint8_t* dst, int64_t n) {
  if constexpr (S == D) {
    std::memcpy(dst, src, static_cast<size_t>(n) * elem_bytes(S));
  } else {
    for (int64_t i = 0; i < n; ++i)
      store_elem<D>(dst + i * elem_bytes(D), load_elem<S>(src + i * elem_bytes(S)));
  }
}

using ConvertFn = void (*)(const uint8_t*, uint8_t*, int64_t);

template <DType S>
ConvertFn convert_to(DType dst) {
  switch (dst) {
    case DType::kF32:
      return convert_run<S, DType::kF32>;
    case DType::kBF16:
      return convert_run<S, DType::kBF16>;
    case DType::kF16:
      return convert_run<S, DType::kF16>;
    default:
      return nullptr;
  }
}

ConvertFn convert_fn(DType src, DType dst) {
  switch (src) {
    case DType::kF32:
      return convert_to<DType::kF32>(dst);
    case DType::kBF16:
      return convert_to<DType::kBF16>(dst);
    case DType::kF16:
      return convert_to<DType::kF16>(dst);
    default:
      return nullptr;
  }
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A shard file name from an index: a plain file name in the model directory.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find("..") == std::string::npos &&
         name.find('\0') == std::string::npos;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SY_CHECK(in, "cannot open ", path);
  in.seekg(0, std::ios::end);
  std::streamoff size = in.tellg();
  SY_CHECK(size >= 0, "cannot read ", path);
  SY_CHECK(static_cast<uint64_t>(size) <= kMaxSafetensorsHeaderBytes, path, " is ", size,
           " bytes, more than the limit of ", kMaxSafetensorsHeaderBytes);
  std::string text(static_cast<size_t>(size), '\0');
  in.seekg(0);
  in.read(text.data(), size);
  SY_CHECK(in.gcount() == size, "cannot read ", path);
  return text;
}

}  // namespace

// ---- SafetensorsFile ----------------------------------------------------------------------------

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  // Owned from the start, so the destructor unmaps when validation throws.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  file->map_ = std::make_unique<MappedFile>(path);
  const uint64_t file_bytes = file->map_->size();
  SY_CHECK(file_bytes >= 8, path, ": file is ", file_bytes,
           " bytes, shorter than the 8-byte header length (truncated?)");

  const uint8_t* bytes = file->map_->data();
  uint64_t data_start = 0;
  parse_header(path, bytes, file_bytes, &file->entries_, &file->metadata_, &data_start);
  file->data_section_ = bytes + data_start;
  for (size_t i = 0; i < file->entries_.size(); ++i) file->index_[file->entries_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() = default;

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

const uint8_t* SafetensorsFile::data(const SafetensorsEntry& entry) const {
  const uint64_t data_bytes = map_->size() - static_cast<uint64_t>(data_section_ - map_->data());
  SY_CHECK(entry.begin <= entry.end && entry.end <= data_bytes, path_, ": tensor \"", entry.name,
           "\": data_offsets [", entry.begin, ", ", entry.end, "] outside the data section");
  return data_section_ + entry.begin;
}

// ---- Checkpoint ---------------------------------------------------------------------------------

Checkpoint Checkpoint::open(const std::string& model_dir) {
  Checkpoint ckpt;
  ckpt.dir_ = model_dir;
  const fs::path dir(model_dir);
  const std::string index_path = (dir / kIndexFileName).string();
  const std::string single_path = (dir / kSingleFileName).string();

  std::error_code ec;
  if (fs::exists(index_path, ec)) {
    const std::string text = read_text_file(index_path);
    json index = parse_json_strict(text.data(), text.data() + text.size(), index_path);
    SY_CHECK(index.is_object(), index_path, ": expected a JSON object");
    auto map = index.find("weight_map");
    SY_CHECK(map != index.end() && map->is_object(), index_path,
             ": \"weight_map\" must be a JSON object");
    if (auto meta = index.find("metadata"); meta != index.end())
      SY_CHECK(meta->is_object() || meta->is_null(), index_path,
               ": \"metadata\" must be an object");

    std::map<std::string, size_t> shard_file;  // shard name -> position in files_
    for (const auto& [name, shard_json] : map->items()) {
      SY_CHECK(shard_json.is_string(), index_path, ": tensor \"", name,
               "\": shard must be a string, got ", shard_json.dump());
      const auto& shard = shard_json.get_ref<const std::string&>();
      SY_CHECK(is_plain_file_name(shard), index_path, ": tensor \"", name, "\": shard name \"",
               shard, "\" is not a plain file name");
      auto it = shard_file.find(shard);
      if (it == shard_file.end()) {
        const std::string shard_path = (dir / shard).string();
        SY_CHECK(fs::is_regular_file(shard_path, ec), index_path, ": tensor \"", name,
                 "\": shard \"", shard, "\" does not exist in ", model_dir);
        it = shard_file.emplace(shard, ckpt.files_.size()).first;
        ckpt.files_.push_back(SafetensorsFile::open(shard_path));
      }
      const SafetensorsFile& file = *ckpt.files_[it->second];
      const SafetensorsEntry* entry = file.find(name);
      SY_CHECK(entry != nullptr, index_path, ": tensor \"", name, "\" is mapped to shard \"", shard,
               "\" but ", file.path(), " has no such tensor");
      ckpt.tensors_[name] = {it->second, entry};
    }
  } else if (fs::exists(single_path, ec)) {
    ckpt.files_.push_back(SafetensorsFile::open(single_path));
    for (const SafetensorsEntry& e : ckpt.files_[0]->entries()) ckpt.tensors_[e.name] = {0, &e};
  } else {
    SY_FAIL("no ", kSingleFileName, " or ", kIndexFileName, " in model directory ", model_dir);
  }
  return ckpt;
}

bool Checkpoint::has(const std::string& name) const {
  return tensors_.count(name) != 0;
}

const SafetensorsEntry& Checkpoint::entry(const std::string& name) const {
  auto it = tensors_.find(name);
  SY_CHECK(it != tensors_.end(), "tensor ", name, " not found in checkpoint ", dir_);
  return *it->second.second;
}

// Concurrent reads from one Checkpoint are not supported: progress_ is updated without a lock.
void Checkpoint::read(const std::string& name, const std::vector<int64_t>& shape, const Tensor& out,
                      const Slice& slice) const {
  auto it = tensors_.find(name);
  SY_CHECK(it != tensors_.end(), "tensor ", name, " not found in checkpoint ", dir_);
  const SafetensorsFile& file = *files_[it->second.first];
  const SafetensorsEntry& e = *it->second.second;
  const std::string& path = file.path();
  SY_CHECK(e.shape == shape, "tensor ", name, " in ", path, ": expected shape ", shape_str(shape),
           ", got ", shape_str(e.shape));

  // The tensor as [outer, extent, inner] with rows [first, first + count) of `extent` kept:
  // `outer` runs of count * inner contiguous elements.
  const int ndim = static_cast<int>(e.shape.size());
  std::vector<int64_t> sliced = e.shape;
  int64_t outer = 1, extent = 1, inner = 1, first = 0, count = 1;
  if (slice.dim == -1) {
    for (int64_t d : e.shape) inner *= d;
  } else {
    const bool slice_ok = slice.dim >= 0 && slice.dim < ndim && slice.begin >= 0 &&
                          slice.begin <= slice.end && slice.end <= e.shape[slice.dim];
    SY_CHECK(slice_ok, "tensor ", name, " in ", path, ": invalid slice [", slice.begin, ", ",
             slice.end, ") of dimension ", slice.dim, " of shape ", shape_str(e.shape));
    for (int i = 0; i < slice.dim; ++i) outer *= e.shape[i];
    for (int i = slice.dim + 1; i < ndim; ++i) inner *= e.shape[i];
    extent = e.shape[slice.dim];
    first = slice.begin;
    count = slice.end - slice.begin;
    sliced[slice.dim] = count;
  }
  if (first == 0 && count == extent) {  // nothing cut away: one run
    inner *= outer * extent;
    outer = extent = count = 1;
  }

  SY_CHECK(out.device == Device::kCpu, "tensor ", name, " in ", path,
           ": output must be a CPU tensor");
  SY_CHECK(is_float_dtype(out.dtype), "tensor ", name, " in ", path, ": cannot convert ",
           dtype_name(e.dtype), " to ", dtype_name(out.dtype), " (supported: F32, BF16, F16)");
  bool same_shape = out.ndim >= 0 && out.ndim <= 4 && out.ndim == static_cast<int>(sliced.size());
  for (int i = 0; same_shape && i < out.ndim; ++i) same_shape = out.shape[i] == sliced[i];
  SY_CHECK(same_shape, "tensor ", name, " in ", path, ": output shape ", out.shape_str(),
           " does not match the ", slice.dim == -1 ? "tensor" : "sliced", " shape ",
           shape_str(sliced));
  const int64_t run = count * inner;
  SY_CHECK(out.data != nullptr || run * outer == 0, "tensor ", name, " in ", path,
           ": output has no data");

  if (start_time_ < 0) start_time_ = now_seconds();
  if (run > 0) {
    const ConvertFn convert = convert_fn(e.dtype, out.dtype);
    const uint8_t* src = file.data(e);
    auto* dst = static_cast<uint8_t*>(out.data);
    const int64_t src_size = static_cast<int64_t>(dtype_size(e.dtype));
    const int64_t dst_size = static_cast<int64_t>(dtype_size(out.dtype));
    for (int64_t o = 0; o < outer; ++o)
      convert(src + ((o * extent + first) * inner) * src_size, dst + o * run * dst_size, run);
  }

  progress_.bytes_read += static_cast<uint64_t>(outer * run) * dtype_size(e.dtype);
  progress_.tensors_read += 1;
  progress_.seconds = now_seconds() - start_time_;
  if (callback_) callback_(progress_);
}

void Checkpoint::set_progress(std::function<void(const LoadProgress&)> callback,
                              uint64_t bytes_total) {
  callback_ = std::move(callback);
  progress_.bytes_total = bytes_total;
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, where] : tensors_) names.push_back(name);
  return names;
}

uint64_t SafetensorsFile::file_bytes() const {
  return map_->size();
}

uint64_t Checkpoint::file_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_) n += f->file_bytes();
  return n;
}

}  // namespace sy
