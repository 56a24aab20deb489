// Strict GGUF reading (see gguf.h).
#include "runtime/formats/gguf.h"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>
#include <limits>
#include <regex>

#include "kernels/error.h"

namespace sy {

static_assert(std::endian::native == std::endian::little, "GGUF reading assumes little-endian");

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF"
constexpr uint64_t kDefaultAlignment = 32;

// Reads the header from the front of the mapping, checking every read against its end.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* data, uint64_t size)
      : path_(path), data_(data), size_(size) {}

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    SY_CHECK(n <= GgufFile::kMaxStringBytes, path_, ": ", what, ": a string of ", n,
             " bytes (at most ", GgufFile::kMaxStringBytes, ")");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
    pos_ += n;
    return s;
  }
  // Throws unless `n` more bytes are there.
  void need(uint64_t n, const char* what) const {
    SY_CHECK(n <= size_ - pos_, path_, ": ", what, ": needs ", n, " bytes at offset ", pos_,
             " of a ", size_, "-byte file (truncated?)");
  }
  uint64_t left() const { return size_ - pos_; }
  uint64_t pos() const { return pos_; }

 private:
  const std::string& path_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// Bytes of one element of a scalar type; 0 for strings and arrays, -1 for unknown types.
int scalar_bytes(GgufType t) {
  switch (t) {
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kBool:
      return 1;
    case GgufType::kU16:
    case GgufType::kI16:
      return 2;
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kF32:
      return 4;
    case GgufType::kU64:
    case GgufType::kI64:
    case GgufType::kF64:
      return 8;
    case GgufType::kString:
    case GgufType::kArray:
      return 0;
  }
  return -1;
}

bool is_float(GgufType t) {
  return t == GgufType::kF32 || t == GgufType::kF64;
}

// One scalar of type `t` into v (ints into i and u, floats into f, strings into s).
void read_scalar(Cursor& c, GgufType t, GgufValue& v, const std::string& path,
                 const std::string& key) {
  const char* what = key.c_str();
  switch (t) {
    case GgufType::kU8:
      v.u = c.read<uint8_t>(what);
      break;
    case GgufType::kI8:
      v.i = c.read<int8_t>(what);
      break;
    case GgufType::kU16:
      v.u = c.read<uint16_t>(what);
      break;
    case GgufType::kI16:
      v.i = c.read<int16_t>(what);
      break;
    case GgufType::kU32:
      v.u = c.read<uint32_t>(what);
      break;
    case GgufType::kI32:
      v.i = c.read<int32_t>(what);
      break;
    case GgufType::kU64:
      v.u = c.read<uint64_t>(what);
      break;
    case GgufType::kI64:
      v.i = c.read<int64_t>(what);
      break;
    case GgufType::kF32:
      v.f = c.read<float>(what);
      break;
    case GgufType::kF64:
      v.f = c.read<double>(what);
      break;
    case GgufType::kBool: {
      const uint8_t b = c.read<uint8_t>(what);
      SY_CHECK(b <= 1, path, ": ", key, ": bool value ", int(b), " is neither 0 nor 1");
      v.u = b;
      break;
    }
    case GgufType::kString:
      v.s = c.read_string(what);
      break;
    case GgufType::kArray:
      SY_FAIL(path, ": ", key, ": arrays of arrays are not supported");
  }
  const bool is_signed =
      t == GgufType::kI8 || t == GgufType::kI16 || t == GgufType::kI32 || t == GgufType::kI64;
  if (is_signed) v.u = v.i >= 0 ? static_cast<uint64_t>(v.i) : 0;
  if (!is_signed && !is_float(t) && t != GgufType::kString)
    v.i = v.u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
              ? static_cast<int64_t>(v.u)
              : -1;
}

void read_array(Cursor& c, GgufValue& v, const std::string& path, const std::string& key) {
  const uint32_t raw = c.read<uint32_t>(key.c_str());
  v.elem_type = static_cast<GgufType>(raw);
  const int elem = scalar_bytes(v.elem_type);
  SY_CHECK(elem >= 0, path, ": ", key, ": unknown array element type ", raw);
  SY_CHECK(v.elem_type != GgufType::kArray, path, ": ", key,
           ": arrays of arrays are not supported");
  const uint64_t n = c.read<uint64_t>(key.c_str());
  SY_CHECK(n <= GgufFile::kMaxArrayElements, path, ": ", key, ": an array of ", n,
           " elements (at most ", GgufFile::kMaxArrayElements, ")");
  // Each element takes at least its scalar size (a string at least its 8-byte length): the
  // count is checked against the bytes left before anything is reserved.
  const uint64_t min_bytes = elem > 0 ? static_cast<uint64_t>(elem) : 8;
  SY_CHECK(n <= c.left() / min_bytes, path, ": ", key, ": an array of ", n,
           " elements does not fit in the ", c.left(), " bytes left (truncated?)");
  GgufValue e;
  for (uint64_t j = 0; j < n; ++j) {
    read_scalar(c, v.elem_type, e, path, key);
    if (v.elem_type == GgufType::kString) {
      v.strings.push_back(std::move(e.s));
    } else if (is_float(v.elem_type)) {
      v.floats.push_back(e.f);
    } else {
      SY_CHECK(e.i >= 0 || v.elem_type != GgufType::kU64, path, ": ", key, "[", j, "]: ", e.u,
               " is too large");
      v.ints.push_back(e.i);
    }
  }
}

void read_metadata(Cursor& c, uint64_t n, const std::string& path,
                   std::map<std::string, GgufValue>& out) {
  // A key-value pair takes at least 8 + 4 + 1 bytes.
  SY_CHECK(n <= c.left() / 13, path, ": ", n, " metadata pairs do not fit in the file");
  for (uint64_t k = 0; k < n; ++k) {
    std::string key = c.read_string("a metadata key");
    SY_CHECK(!key.empty(), path, ": metadata pair ", k, " has an empty key");
    SY_CHECK(out.count(key) == 0, path, ": metadata key ", key, " given twice");
    GgufValue v;
    const uint32_t raw = c.read<uint32_t>(key.c_str());
    v.type = static_cast<GgufType>(raw);
    SY_CHECK(scalar_bytes(v.type) >= 0, path, ": ", key, ": unknown value type ", raw);
    if (v.type == GgufType::kArray)
      read_array(c, v, path, key);
    else
      read_scalar(c, v.type, v, path, key);
    out.emplace(std::move(key), std::move(v));
  }
}

GgufTensor read_tensor_info(Cursor& c, const std::string& path) {
  GgufTensor t;
  t.name = c.read_string("a tensor name");
  SY_CHECK(!t.name.empty(), path, ": a tensor with an empty name");
  const std::string where = path + ": tensor \"" + t.name + "\": ";
  const uint32_t n_dims = c.read<uint32_t>(t.name.c_str());
  SY_CHECK(n_dims >= 1 && n_dims <= GgufFile::kMaxDims, where, n_dims, " dimensions (1 to ",
           GgufFile::kMaxDims, ")");
  int64_t elements = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    const uint64_t dim = c.read<uint64_t>(t.name.c_str());
    SY_CHECK(dim >= 1 && dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) &&
                 !__builtin_mul_overflow(elements, static_cast<int64_t>(dim), &elements),
             where, "dimension ", d, " of ", dim, " (empty or too large)");
    t.dims.push_back(static_cast<int64_t>(dim));
  }
  const uint32_t type = c.read<uint32_t>(t.name.c_str());
  const cpu::GgmlTypeInfo info = cpu::ggml_type_info(type);
  SY_CHECK(info.name != nullptr, where, "unknown GGML type ", type);
  t.type = static_cast<cpu::GgmlType>(type);
  SY_CHECK(t.dims[0] % info.block_elems == 0, where, "rows of ", t.dims[0], " elements of ",
           info.name, " are not whole blocks of ", info.block_elems);
  uint64_t bytes = 0;
  SY_CHECK(!__builtin_mul_overflow(static_cast<uint64_t>(elements / info.block_elems),
                                   static_cast<uint64_t>(info.block_bytes), &bytes),
           where, "size overflows");
  t.bytes = bytes;
  t.offset = c.read<uint64_t>(t.name.c_str());  // relative to the data section, for now
  return t;
}

// Places the tensors in the data section from `data_start`: aligned, inside the file, disjoint.
void place_tensors(std::vector<GgufTensor>& tensors, uint64_t data_start, uint64_t alignment,
                   uint64_t file_bytes, const std::string& path) {
  for (GgufTensor& t : tensors) {
    const std::string where = path + ": tensor \"" + t.name + "\": ";
    SY_CHECK(t.offset % alignment == 0, where, "offset ", t.offset, " is not a multiple of the ",
             alignment, "-byte alignment");
    uint64_t end = 0;
    SY_CHECK(t.offset <= file_bytes - data_start &&
                 !__builtin_add_overflow(data_start + t.offset, t.bytes, &end) && end <= file_bytes,
             where, t.bytes, " bytes at data offset ", t.offset, " end past the ", file_bytes,
             "-byte file (truncated?)");
    t.offset += data_start;
  }
  std::vector<const GgufTensor*> by_offset;
  for (const GgufTensor& t : tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensor& a = *by_offset[i - 1];
    const GgufTensor& b = *by_offset[i];
    SY_CHECK(a.offset + a.bytes <= b.offset || a.bytes == 0 || b.bytes == 0, path, ": tensors \"",
             a.name, "\" and \"", b.name, "\" overlap");
  }
}

}  // namespace

int64_t GgufTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->map_ = std::make_unique<MappedFile>(path);
  Cursor c(path, f->map_->data(), f->map_->size());
  SY_CHECK(f->map_->size() >= 24 && c.read<uint32_t>("the magic") == kMagic, path,
           ": not a GGUF file (no \"GGUF\" magic)");
  f->version_ = c.read<uint32_t>("the version");
  SY_CHECK(f->version_ == 2 || f->version_ == 3, path, ": GGUF version ", f->version_,
           " (this reader takes 2 and 3)");
  const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
  const uint64_t n_metadata = c.read<uint64_t>("the metadata count");
  read_metadata(c, n_metadata, path, f->metadata_);
  uint64_t alignment = kDefaultAlignment;
  if (f->find("general.alignment") != nullptr) {
    alignment = f->uint("general.alignment");
    SY_CHECK(alignment > 0 && alignment <= (1u << 16) && (alignment & (alignment - 1)) == 0, path,
             ": general.alignment ", alignment, " is not a power of two up to 65536");
  }
  // A tensor info takes at least 8 + 1 + 4 + 8 + 4 + 8 bytes.
  SY_CHECK(n_tensors <= c.left() / 33, path, ": ", n_tensors, " tensors do not fit in the file");
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t = read_tensor_info(c, path);
    SY_CHECK(f->index_.emplace(t.name, f->tensors_.size()).second, path, ": tensor \"", t.name,
             "\" given twice");
    f->tensors_.push_back(std::move(t));
  }
  const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  SY_CHECK(f->tensors_.empty() || data_start <= f->map_->size(), path,
           ": the data section starts past the end of the file (truncated?)");
  place_tensors(f->tensors_, data_start, alignment, f->map_->size(), path);
  return f;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufValue& GgufFile::get(const std::string& key) const {
  const GgufValue* v = find(key);
  SY_CHECK(v != nullptr, path_, ": metadata key ", key, " is missing");
  return *v;
}

uint64_t GgufFile::uint(const std::string& key) const {
  const GgufValue& v = get(key);
  const int bytes = scalar_bytes(v.type);
  SY_CHECK(bytes > 0 && !is_float(v.type) && v.type != GgufType::kBool && v.i >= 0, path_, ": ",
           key, " must be a non-negative integer");
  return v.u;
}

double GgufFile::number(const std::string& key) const {
  const GgufValue& v = get(key);
  SY_CHECK(scalar_bytes(v.type) > 0 && v.type != GgufType::kBool, path_, ": ", key,
           " must be a number");
  if (is_float(v.type)) return v.f;
  return v.i >= 0 ? static_cast<double>(v.u) : static_cast<double>(v.i);
}

const std::string& GgufFile::string(const std::string& key) const {
  const GgufValue& v = get(key);
  SY_CHECK(v.type == GgufType::kString, path_, ": ", key, " must be a string");
  return v.s;
}

const std::vector<std::string>& GgufFile::strings(const std::string& key) const {
  const GgufValue& v = get(key);
  SY_CHECK(v.type == GgufType::kArray && v.elem_type == GgufType::kString, path_, ": ", key,
           " must be an array of strings");
  return v.strings;
}

const std::vector<double>& GgufFile::numbers(const std::string& key) const {
  const GgufValue& v = get(key);
  SY_CHECK(v.type == GgufType::kArray && is_float(v.elem_type), path_, ": ", key,
           " must be an array of floats");
  return v.floats;
}

const std::vector<int64_t>& GgufFile::integers(const std::string& key) const {
  const GgufValue& v = get(key);
  SY_CHECK(v.type == GgufType::kArray && scalar_bytes(v.elem_type) > 0 && !is_float(v.elem_type),
           path_, ": ", key, " must be an array of integers");
  return v.ints;
}

bool is_gguf_path(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0;
}

namespace {

// "PREFIX-00002-of-00003.gguf" -> {"PREFIX", 3}; {"", 0} for a name not of that form.
std::pair<std::string, uint64_t> split_name(const std::string& path) {
  static const std::regex pattern(R"((.*)-([0-9]{5})-of-([0-9]{5})\.gguf)");
  std::smatch m;
  if (!std::regex_match(path, m, pattern)) return {"", 0};
  return {m[1].str(), std::stoull(m[3].str())};
}

std::string split_path(const std::string& prefix, uint64_t i, uint64_t n) {
  char tail[64];
  std::snprintf(tail, sizeof(tail), "-%05llu-of-%05llu.gguf", static_cast<unsigned long long>(i),
                static_cast<unsigned long long>(n));
  return prefix + tail;
}

}  // namespace

GgufModelFiles GgufModelFiles::open(const std::string& path) {
  GgufModelFiles set;
  std::unique_ptr<GgufFile> given = GgufFile::open(path);
  const uint64_t count = given->find("split.count") != nullptr ? given->uint("split.count") : 1;
  if (count <= 1) {
    set.files_.push_back(std::move(given));
  } else {
    const auto [prefix, named_count] = split_name(path);
    SY_CHECK(named_count == count, path, ": split.count is ", count,
             " but the name is not PREFIX-NNNNN-of-", split_path("", 0, count).substr(10));
    SY_CHECK(count <= 1000, path, ": split.count ", count, " (at most 1000)");
    for (uint64_t i = 0; i < count; ++i) {
      const std::string p = split_path(prefix, i + 1, count);
      std::unique_ptr<GgufFile> f = p == path ? std::move(given) : GgufFile::open(p);
      SY_CHECK(f->uint("split.count") == count && f->uint("split.no") == i, p,
               ": split.no / split.count do not say split ", i, " of ", count);
      set.files_.push_back(std::move(f));
    }
  }
  uint64_t n_tensors = 0;
  for (const auto& f : set.files_) {
    for (const GgufTensor& t : f->tensors()) {
      SY_CHECK(set.tensors_.emplace(t.name, std::make_pair(f.get(), &t)).second, f->path(),
               ": tensor \"", t.name, "\" is also in another split");
      ++n_tensors;
    }
  }
  if (count > 1 && set.meta().find("split.tensors.count") != nullptr)
    SY_CHECK(set.meta().uint("split.tensors.count") == n_tensors, set.meta().path(),
             ": split.tensors.count is ", set.meta().uint("split.tensors.count"), " but the ",
             count, " splits hold ", n_tensors, " tensors");
  return set;
}

const GgufTensor* GgufModelFiles::find_tensor(const std::string& name,
                                              const GgufFile** file) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return nullptr;
  if (file != nullptr) *file = it->second.first;
  return it->second.second;
}

uint64_t GgufModelFiles::total_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_) n += f->file_bytes();
  return n;
}

}  // namespace sy
