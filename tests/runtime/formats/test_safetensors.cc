// Tests for runtime/safetensors: round trips through write_safetensors / write_checkpoint and
// Checkpoint::read (dtypes, conversions, slices, shards, progress), then one test per malformed
// file, index or request, each expecting one sy::Error that names the file and the tensor, and
// finally truncated and byte-flipped files that must give sy::Error or a valid file, never a crash.
#include "runtime/formats/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace sy {
namespace {

namespace fs = std::filesystem;

// ---- helpers ------------------------------------------------------------------------------------

// Values exactly representable in F32, BF16 and F16, so conversions can be compared exactly.
std::vector<float> test_values(int64_t n, int seed) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>((i * 7 + seed) % 200 - 100) * 0.25f;
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out;
  for (float f : v) out.push_back(f32_to_bf16(f));
  return out;
}

std::vector<uint16_t> to_f16(const std::vector<float>& v) {
  std::vector<uint16_t> out;
  for (float f : v) out.push_back(f32_to_f16(f));
  return out;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A safetensors file from raw header text: [declared length][header][data_bytes bytes of data].
// The data byte at offset i is i % 251, so reads can be checked against their offset.
std::string raw_file(const std::string& header, size_t data_bytes, int64_t declared_length = -1) {
  std::string s =
      le64(declared_length < 0 ? header.size() : static_cast<uint64_t>(declared_length));
  s += header;
  for (size_t i = 0; i < data_bytes; ++i) s += static_cast<char>(i % 251);
  return s;
}

// The message of the sy::Error `f` throws; a test failure when it throws nothing or something else.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected sy::Error, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected sy::Error, nothing was thrown";
  return "";
}

// Expects `f` to throw sy::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  const std::string message = error_of(f);
  for (const std::string& part : parts)
    EXPECT_NE(message.find(part), std::string::npos)
        << "message lacks \"" << part << "\": " << message;
}

// A fresh directory under testing::TempDir(), removed after each test.
class SafetensorsTest : public testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::path(testing::TempDir()) / "sy_safetensors_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Writes `header` (and data) as `<dir>/model.safetensors` and returns the path.
  std::string write_model(const std::string& header, size_t data_bytes,
                          int64_t declared_length = -1) {
    const std::string p = path("model.safetensors");
    write_bytes(p, raw_file(header, data_bytes, declared_length));
    return p;
  }

  // Expects opening the raw file to fail naming the file and each of `parts`.
  void expect_bad_file(const std::string& header, size_t data_bytes,
                       const std::vector<std::string>& parts) {
    const std::string p = write_model(header, data_bytes);
    std::vector<std::string> all = {"model.safetensors"};
    all.insert(all.end(), parts.begin(), parts.end());
    expect_error([&] { SafetensorsFile::open(p); }, all);
    expect_error([&] { Checkpoint::open(dir_); }, all);
  }

  std::string dir_;
};

// Three tensors of the three dtypes, with the F32 values they hold.
struct Fixture {
  std::vector<float> a = test_values(3 * 5, 1);      // F32 [3, 5]
  std::vector<float> b = test_values(4 * 6, 2);      // BF16 [4, 6]
  std::vector<float> c = test_values(2 * 3 * 4, 3);  // F16 [2, 3, 4]
  std::vector<uint16_t> b_bits = to_bf16(b);
  std::vector<uint16_t> c_bits = to_f16(c);
  float scalar = 2.5f;

  std::vector<TensorToWrite> tensors() const {
    return {{"layers.0.a", DType::kF32, {3, 5}, a.data()},
            {"layers.0.b", DType::kBF16, {4, 6}, b_bits.data()},
            {"layers.1.c", DType::kF16, {2, 3, 4}, c_bits.data()},
            {"scalar", DType::kF32, {}, &scalar},
            {"empty", DType::kF32, {0, 3}, nullptr}};
  }
};

std::vector<float> read_f32(const Checkpoint& ckpt, const std::string& name,
                            const std::vector<int64_t>& shape, std::initializer_list<int64_t> out,
                            const Slice& slice = {}) {
  Tensor probe(nullptr, DType::kF32, out);
  std::vector<float> v(static_cast<size_t>(probe.numel()));
  ckpt.read(name, shape, Tensor(v.data(), DType::kF32, out), slice);
  return v;
}

// Every tensor of Fixture read back from `ckpt`, same dtype and converted.
void check_fixture(const Checkpoint& ckpt, const Fixture& f) {
  EXPECT_EQ(ckpt.tensor_names(), (std::vector<std::string>{"empty", "layers.0.a", "layers.0.b",
                                                           "layers.1.c", "scalar"}));
  // Same dtype: bit-exact copies.
  std::vector<float> a(f.a.size());
  ckpt.read("layers.0.a", {3, 5}, Tensor(a.data(), DType::kF32, {3, 5}));
  EXPECT_EQ(a, f.a);
  std::vector<uint16_t> b(f.b.size());
  ckpt.read("layers.0.b", {4, 6}, Tensor(b.data(), DType::kBF16, {4, 6}));
  EXPECT_EQ(b, f.b_bits);
  std::vector<uint16_t> c(f.c.size());
  ckpt.read("layers.1.c", {2, 3, 4}, Tensor(c.data(), DType::kF16, {2, 3, 4}));
  EXPECT_EQ(c, f.c_bits);
  // Conversions to F32.
  EXPECT_EQ(read_f32(ckpt, "layers.0.b", {4, 6}, {4, 6}), f.b);
  EXPECT_EQ(read_f32(ckpt, "layers.1.c", {2, 3, 4}, {2, 3, 4}), f.c);
  // Conversions from F32 and between the 16-bit types.
  std::vector<uint16_t> a16(f.a.size());
  ckpt.read("layers.0.a", {3, 5}, Tensor(a16.data(), DType::kBF16, {3, 5}));
  EXPECT_EQ(a16, to_bf16(f.a));
  ckpt.read("layers.0.a", {3, 5}, Tensor(a16.data(), DType::kF16, {3, 5}));
  EXPECT_EQ(a16, to_f16(f.a));
  ckpt.read("layers.0.b", {4, 6}, Tensor(b.data(), DType::kF16, {4, 6}));
  EXPECT_EQ(b, to_f16(f.b));
  ckpt.read("layers.1.c", {2, 3, 4}, Tensor(c.data(), DType::kBF16, {2, 3, 4}));
  EXPECT_EQ(c, to_bf16(f.c));
  // A 0-d tensor and an empty one.
  float scalar = 0;
  ckpt.read("scalar", {}, Tensor(&scalar, DType::kF32, {}));
  EXPECT_EQ(scalar, f.scalar);
  ckpt.read("empty", {0, 3}, Tensor(nullptr, DType::kF32, {0, 3}));
  EXPECT_EQ(ckpt.entry("layers.1.c").dtype, DType::kF16);
  EXPECT_EQ(ckpt.entry("layers.1.c").shape, (std::vector<int64_t>{2, 3, 4}));
}

// ---- round trips --------------------------------------------------------------------------------

TEST_F(SafetensorsTest, RoundTripSingleFile) {
  Fixture f;
  write_safetensors(path("model.safetensors"), f.tensors());
  Checkpoint ckpt = Checkpoint::open(dir_);
  check_fixture(ckpt, f);
  EXPECT_TRUE(ckpt.has("layers.0.a"));
  EXPECT_FALSE(ckpt.has("layers.0.z"));
}

TEST_F(SafetensorsTest, WrittenFileLayout) {
  Fixture f;
  write_safetensors(path("model.safetensors"), f.tensors());
  const std::string bytes = read_bytes(path("model.safetensors"));
  uint64_t header_bytes = 0;
  for (int i = 0; i < 8; ++i) header_bytes |= static_cast<uint64_t>(uint8_t(bytes[i])) << (8 * i);
  EXPECT_EQ(header_bytes % 8, 0u);
  const uint64_t data_bytes = 15 * 4 + 24 * 2 + 24 * 2 + 4;
  EXPECT_EQ(bytes.size(), 8 + header_bytes + data_bytes);
  auto header = nlohmann::json::parse(bytes.substr(8, header_bytes));
  EXPECT_EQ(header["__metadata__"], (nlohmann::json{{"format", "pt"}}));
  EXPECT_EQ(header["layers.0.b"]["dtype"], "BF16");
  EXPECT_EQ(header["layers.0.b"]["data_offsets"], (nlohmann::json{60, 108}));

  auto file = SafetensorsFile::open(path("model.safetensors"));
  EXPECT_EQ(file->metadata().at("format"), "pt");
  ASSERT_EQ(file->entries().size(), 5u);
  const SafetensorsEntry* c = file->find("layers.1.c");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->end - c->begin, 48u);
  EXPECT_EQ(std::memcmp(file->data(*c), f.c_bits.data(), 48), 0);
  EXPECT_EQ(file->find("nope"), nullptr);
  // Only the file itself: the temporary file was renamed.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(SafetensorsTest, RoundTripShardedCheckpoint) {
  Fixture f;
  write_checkpoint(dir_, f.tensors(), 90);  // shards of 60 | 48 | 48 + 4 + 0 bytes
  EXPECT_FALSE(fs::exists(path("model.safetensors")));
  ASSERT_TRUE(fs::exists(path("model.safetensors.index.json")));
  EXPECT_TRUE(fs::exists(path("model-00001-of-00003.safetensors")));
  EXPECT_TRUE(fs::exists(path("model-00003-of-00003.safetensors")));
  auto index = nlohmann::json::parse(read_bytes(path("model.safetensors.index.json")));
  EXPECT_EQ(index["metadata"]["total_size"], 160);
  EXPECT_EQ(index["weight_map"]["layers.0.a"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.0.b"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.1.c"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["empty"], "model-00003-of-00003.safetensors");
  Checkpoint ckpt = Checkpoint::open(dir_);
  check_fixture(ckpt, f);
}

TEST_F(SafetensorsTest, WriteCheckpointSingleFileReplacesStaleIndex) {
  Fixture f;
  write_checkpoint(dir_, f.tensors(), 90);
  write_checkpoint(dir_, f.tensors(), 1 << 20);
  EXPECT_TRUE(fs::exists(path("model.safetensors")));
  EXPECT_FALSE(fs::exists(path("model.safetensors.index.json")));
  check_fixture(Checkpoint::open(dir_), f);
}

TEST_F(SafetensorsTest, SlicesAlongEachDimension) {
  std::vector<float> m(5 * 7);  // [5, 7], m[r][c] = 10 r + c
  for (int r = 0; r < 5; ++r)
    for (int c = 0; c < 7; ++c) m[r * 7 + c] = static_cast<float>(10 * r + c);
  std::vector<float> t(4 * 3 * 2);  // [4, 3, 2], t[i][j][k] = 100 i + 10 j + k
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k) t[(i * 3 + j) * 2 + k] = static_cast<float>(100 * i + 10 * j + k);
  std::vector<uint16_t> m16 = to_bf16(m);
  write_checkpoint(dir_,
                   {{"m", DType::kF32, {5, 7}, m.data()},
                    {"m16", DType::kBF16, {5, 7}, m16.data()},
                    {"t", DType::kF32, {4, 3, 2}, t.data()}},
                   1 << 20);
  Checkpoint ckpt = Checkpoint::open(dir_);

  // Rows 1..3 of a 2-D tensor: one contiguous run.
  EXPECT_EQ(read_f32(ckpt, "m", {5, 7}, {3, 7}, {0, 1, 4}),
            std::vector<float>(m.begin() + 7, m.begin() + 28));
  // Columns 2..4 of each row, from F32 and converted from BF16.
  std::vector<float> cols;
  for (int r = 0; r < 5; ++r)
    for (int c = 2; c < 5; ++c) cols.push_back(static_cast<float>(10 * r + c));
  EXPECT_EQ(read_f32(ckpt, "m", {5, 7}, {5, 3}, {1, 2, 5}), cols);
  EXPECT_EQ(read_f32(ckpt, "m16", {5, 7}, {5, 3}, {1, 2, 5}), cols);
  // The last column, an empty slice, the whole dimension.
  EXPECT_EQ(read_f32(ckpt, "m", {5, 7}, {5, 1}, {1, 6, 7}),
            (std::vector<float>{6, 16, 26, 36, 46}));
  EXPECT_EQ(read_f32(ckpt, "m", {5, 7}, {5, 0}, {1, 3, 3}), std::vector<float>{});
  EXPECT_EQ(read_f32(ckpt, "m", {5, 7}, {5, 7}, {1, 0, 7}), m);
  // 3-D: experts 1..2 along dim 0, then dims 1 and 2.
  EXPECT_EQ(read_f32(ckpt, "t", {4, 3, 2}, {2, 3, 2}, {0, 1, 3}),
            std::vector<float>(t.begin() + 6, t.begin() + 18));
  EXPECT_EQ(read_f32(ckpt, "t", {4, 3, 2}, {4, 1, 2}, {1, 2, 3}),
            (std::vector<float>{20, 21, 120, 121, 220, 221, 320, 321}));
  EXPECT_EQ(read_f32(ckpt, "t", {4, 3, 2}, {4, 3, 1}, {2, 1, 2}),
            (std::vector<float>{1, 11, 21, 101, 111, 121, 201, 211, 221, 301, 311, 321}));
  // A BF16 slice into BF16 is a plain copy.
  std::vector<uint16_t> rows(2 * 7);
  ckpt.read("m16", {5, 7}, Tensor(rows.data(), DType::kBF16, {2, 7}), {0, 3, 5});
  EXPECT_EQ(rows, std::vector<uint16_t>(m16.begin() + 21, m16.end()));
}

TEST_F(SafetensorsTest, ProgressCountsBytesAndTensors) {
  Fixture f;
  write_safetensors(path("model.safetensors"), f.tensors());
  Checkpoint ckpt = Checkpoint::open(dir_);
  std::vector<LoadProgress> seen;
  ckpt.set_progress([&](const LoadProgress& p) { seen.push_back(p); }, 1000);
  read_f32(ckpt, "layers.0.a", {3, 5}, {3, 5});
  read_f32(ckpt, "layers.0.b", {4, 6}, {2, 6}, {0, 1, 3});  // 12 BF16 elements
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].bytes_read, 60u);
  EXPECT_EQ(seen[1].bytes_read, 60u + 24u);
  EXPECT_EQ(seen[1].tensors_read, 2);
  EXPECT_EQ(seen[1].bytes_total, 1000u);
  EXPECT_GE(seen[1].seconds, seen[0].seconds);
  EXPECT_GE(seen[0].seconds, 0.0);
  EXPECT_EQ(ckpt.progress().bytes_read, 84u);
}

TEST_F(SafetensorsTest, TensorAtTheVeryEndOfTheFile) {
  // A gap of 8 bytes, then x's 8 bytes end exactly at the end of the file.
  const std::string header = R"({"x":{"dtype":"F16","shape":[2,2],"data_offsets":[8,16]}})";
  write_model(header, 16);
  Checkpoint ckpt = Checkpoint::open(dir_);
  std::vector<uint16_t> x(4);
  ckpt.read("x", {2, 2}, Tensor(x.data(), DType::kF16, {2, 2}));
  EXPECT_EQ(x, (std::vector<uint16_t>{0x0908, 0x0b0a, 0x0d0c, 0x0f0e}));
  ckpt.read("x", {2, 2}, Tensor(x.data(), DType::kF16, {1, 2}), {0, 1, 2});
  EXPECT_EQ(x[0], 0x0d0c);
  // An empty data section with an empty tensor at offset 0.
  write_model(R"({"e":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}})", 0);
  EXPECT_EQ(SafetensorsFile::open(path("model.safetensors"))->entries().size(), 1u);
}

// ---- malformed files ----------------------------------------------------------------------------

TEST_F(SafetensorsTest, FileShorterThanEightBytes) {
  for (size_t n : {0, 1, 7}) {
    write_bytes(path("model.safetensors"), std::string(n, '\x01'));
    expect_error([&] { SafetensorsFile::open(path("model.safetensors")); },
                 {"model.safetensors", "shorter than the 8-byte header length"});
  }
}

TEST_F(SafetensorsTest, HeaderLongerThanFile) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  write_model(header, 4, static_cast<int64_t>(header.size() + 5));
  expect_error([&] { Checkpoint::open(dir_); }, {"model.safetensors", "past the end"});
}

TEST_F(SafetensorsTest, HeaderLengthTooLarge) {
  for (uint64_t n : {kMaxSafetensorsHeaderBytes + 1, uint64_t{1} << 63, ~uint64_t{0}}) {
    write_bytes(path("model.safetensors"), le64(n) + "{}");
    expect_error([&] { SafetensorsFile::open(path("model.safetensors")); },
                 {"model.safetensors", "exceeds the limit"});
  }
}

TEST_F(SafetensorsTest, OffsetPastTheEndOfTheFile) {
  expect_bad_file(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 15,
                  {"\"x\"", "past the end of the data section"});
  expect_bad_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[100,104]}})", 8, {"\"x\""});
  expect_bad_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,0]}})", 8,
                  {"\"x\"", "reversed"});
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  expect_bad_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                  12, {"\"a\"", "\"b\"", "overlap"});
  expect_bad_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}})",
                  8, {"\"a\"", "\"b\"", "overlap"});
}

TEST_F(SafetensorsTest, UnsupportedDtype) {
  for (const char* dtype : {"I8", "F64", "I32", "bf16"}) {
    expect_bad_file(
        std::string(R"({"w":{"dtype":")") + dtype + R"(","shape":[1],"data_offsets":[0,8]}})", 8,
        {"\"w\"", std::string("unsupported dtype \"") + dtype + "\""});
  }
}

TEST_F(SafetensorsTest, SizeInconsistentWithDtypeAndShape) {
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8,
                  {"\"w\"", "hold 8 bytes", "needs 12"});
  expect_bad_file(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,4]}})", 8,
                  {"\"w\"", "needs 8"});
}

TEST_F(SafetensorsTest, ShapeWhoseProductOverflows) {
  // 2^32 * 2^32 * 4 bytes wraps to 0 in 64-bit arithmetic, matching data_offsets [0, 0].
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})",
                  0, {"\"w\"", "overflows"});
  expect_bad_file(R"({"w":{"dtype":"F16","shape":[0,4611686018427387904,4],"data_offsets":[0,0]}})",
                  0, {"\"w\"", "overflows"});
  expect_bad_file(R"({"w":{"dtype":"F16","shape":[9223372036854775808],"data_offsets":[0,0]}})", 0,
                  {"\"w\"", "too large"});
}

TEST_F(SafetensorsTest, NegativeOrNonIntegerDimension) {
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}})", 8,
                  {"\"w\"", "negative shape dimension -1"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8,
                  {"\"w\"", "not an integer"});
}

TEST_F(SafetensorsTest, EntryFieldsOfTheWrongType) {
  expect_bad_file(R"({"w":[1,2]})", 0, {"\"w\"", "JSON object"});
  expect_bad_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4, {"\"w\"", "\"dtype\""});
  expect_bad_file(R"({"w":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})", 4,
                  {"\"w\"", "\"dtype\""});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", 4,
                  {"\"w\"", "\"shape\""});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[1]}})", 4, {"\"w\"", "\"data_offsets\""});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8,
                  {"\"w\"", "\"data_offsets\""});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 8,
                  {"\"w\"", "\"data_offsets\""});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}})", 8,
                  {"\"w\"", "\"data_offsets\""});
  expect_bad_file(R"({"__metadata__":{"format":1}})", 0, {"__metadata__", "format"});
  expect_bad_file(R"({"__metadata__":[]})", 0, {"__metadata__"});
}

TEST_F(SafetensorsTest, BadJson) {
  expect_bad_file(R"({"w":{"dtype":"F32",)", 0, {"malformed JSON"});
  expect_bad_file("", 0, {"malformed JSON"});
  expect_bad_file("{} trailing", 0, {"malformed JSON"});
  expect_bad_file("{\"w\xff\":{}}", 0, {"malformed JSON"});  // invalid UTF-8
  expect_bad_file(R"([1,2,3])", 0, {"header must be a JSON object"});
}

TEST_F(SafetensorsTest, DuplicateTensorNames) {
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                  R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                  8, {"duplicate key \"w\""});
  expect_bad_file(R"({"w":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}})", 4,
                  {"duplicate key \"dtype\" in \"w\""});
}

// ---- bad requests -------------------------------------------------------------------------------

TEST_F(SafetensorsTest, WrongShapeRequested) {
  Fixture f;
  write_safetensors(path("model.safetensors"), f.tensors());
  Checkpoint ckpt = Checkpoint::open(dir_);
  std::vector<float> buf(64);
  expect_error(
      [&] {
        ckpt.read("layers.0.a", {3, 4}, Tensor(buf.data(), DType::kF32, {3, 4}));
      },
      {"tensor layers.0.a in ", "model.safetensors", ": expected shape [3, 4], got [3, 5]"});
  expect_error([&] { ckpt.read("layers.0.a", {15}, Tensor(buf.data(), DType::kF32, {15})); },
               {"layers.0.a", "expected shape [15], got [3, 5]"});
  // The output must match the (sliced) shape, be F32/BF16/F16 and live on the CPU.
  expect_error(
      [&] {
        ckpt.read("layers.0.a", {3, 5}, Tensor(buf.data(), DType::kF32, {5, 3}));
      },
      {"layers.0.a", "model.safetensors", "output shape [5, 3]", "[3, 5]"});
  expect_error(
      [&] {
        ckpt.read("layers.0.a", {3, 5}, Tensor(buf.data(), DType::kF32, {3, 5}), {1, 0, 2});
      },
      {"layers.0.a", "output shape [3, 5]", "sliced shape [3, 2]"});
  expect_error(
      [&] {
        ckpt.read("layers.0.a", {3, 5}, Tensor(buf.data(), DType::kI32, {3, 5}));
      },
      {"layers.0.a", "model.safetensors", "I32"});
  expect_error(
      [&] {
        ckpt.read("layers.0.a", {3, 5}, Tensor(buf.data(), DType::kF32, {3, 5}, Device::kCuda));
      },
      {"layers.0.a", "CPU"});
  EXPECT_EQ(ckpt.progress().tensors_read, 0);
}

TEST_F(SafetensorsTest, InvalidSlice) {
  Fixture f;
  write_safetensors(path("model.safetensors"), f.tensors());
  Checkpoint ckpt = Checkpoint::open(dir_);
  std::vector<float> buf(64);
  Tensor out(buf.data(), DType::kF32, {3, 5});
  for (Slice s : {Slice{2, 0, 1}, Slice{-2, 0, 1}, Slice{0, 2, 1}, Slice{0, -1, 1}, Slice{1, 0, 6},
                  Slice{0, 3, 4}}) {
    expect_error(
        [&] {
          ckpt.read("layers.0.a", {3, 5}, out, s);
        },
        {"layers.0.a", "model.safetensors", "invalid slice"});
  }
  float scalar;
  expect_error(
      [&] {
        ckpt.read("scalar", {}, Tensor(&scalar, DType::kF32, {}), {0, 0, 1});
      },
      {"scalar", "invalid slice"});
}

TEST_F(SafetensorsTest, MissingTensor) {
  Fixture f;
  write_checkpoint(dir_, f.tensors(), 90);
  Checkpoint ckpt = Checkpoint::open(dir_);
  float x;
  expect_error([&] { ckpt.read("lm_head.weight", {1}, Tensor(&x, DType::kF32, {1})); },
               {"lm_head.weight", dir_});
  expect_error([&] { ckpt.entry("lm_head.weight"); }, {"lm_head.weight", dir_});
}

TEST_F(SafetensorsTest, NoCheckpointInDirectory) {
  expect_error([&] { Checkpoint::open(dir_); },
               {"model.safetensors", "model.safetensors.index.json", dir_});
  expect_error([&] { Checkpoint::open(path("does-not-exist")); }, {"does-not-exist"});
}

// ---- malformed indexes --------------------------------------------------------------------------

class SafetensorsIndexTest : public SafetensorsTest {
 protected:
  // A valid three-shard checkpoint whose index the test then overwrites.
  void SetUp() override {
    SafetensorsTest::SetUp();
    write_checkpoint(dir_, fixture_.tensors(), 90);
  }
  void write_index(const std::string& text) {
    write_bytes(path("model.safetensors.index.json"), text);
  }
  Fixture fixture_;
};

TEST_F(SafetensorsIndexTest, IndexNamingAMissingShard) {
  write_index(R"({"weight_map":{"layers.0.a":"model-00009-of-00009.safetensors"}})");
  expect_error([&] { Checkpoint::open(dir_); },
               {"model.safetensors.index.json", "layers.0.a", "model-00009-of-00009.safetensors",
                "does not exist"});
}

TEST_F(SafetensorsIndexTest, IndexWithATensorNotInItsShard) {
  write_index(R"({"weight_map":{"layers.0.a":"model-00001-of-00003.safetensors",)"
              R"("layers.0.b":"model-00001-of-00003.safetensors"}})");
  expect_error([&] { Checkpoint::open(dir_); },
               {"model.safetensors.index.json", "layers.0.b", "model-00001-of-00003.safetensors",
                "no such tensor"});
}

TEST_F(SafetensorsIndexTest, IndexShardNamesMustBePlainFileNames) {
  for (const char* shard : {"../model-00001-of-00003.safetensors",
                            "sub/model-00001-of-00003.safetensors", "/etc/passwd", "..", ""}) {
    write_index(std::string(R"({"weight_map":{"layers.0.a":")") + shard + "\"}}");
    expect_error([&] { Checkpoint::open(dir_); },
                 {"model.safetensors.index.json", "layers.0.a", "not a plain file name"});
  }
}

TEST_F(SafetensorsIndexTest, BadIndexJson) {
  write_index(R"({"weight_map":{"layers.0.a":)");
  expect_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "malformed JSON"});
  write_index(R"([])");
  expect_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "JSON object"});
  write_index(R"({"metadata":{}})");
  expect_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "weight_map"});
  write_index(R"({"weight_map":{"layers.0.a":1}})");
  expect_error([&] { Checkpoint::open(dir_); },
               {"model.safetensors.index.json", "layers.0.a", "must be a string"});
  write_index(R"({"weight_map":{"layers.0.a":"model-00001-of-00003.safetensors",)"
              R"("layers.0.a":"model-00002-of-00003.safetensors"}})");
  expect_error([&] { Checkpoint::open(dir_); },
               {"model.safetensors.index.json", "duplicate key \"layers.0.a\""});
}

TEST_F(SafetensorsIndexTest, IndexSubsetLoadsOnlyItsTensors) {
  write_index(R"({"metadata":{"total_size":60},)"
              R"("weight_map":{"layers.0.a":"model-00001-of-00003.safetensors"}})");
  Checkpoint ckpt = Checkpoint::open(dir_);
  EXPECT_EQ(ckpt.tensor_names(), std::vector<std::string>{"layers.0.a"});
  EXPECT_EQ(read_f32(ckpt, "layers.0.a", {3, 5}, {3, 5}), fixture_.a);
}

// ---- bad writes ---------------------------------------------------------------------------------

TEST_F(SafetensorsTest, WriteRejectsBadTensors) {
  float x[4] = {1, 2, 3, 4};
  int32_t ids[2] = {1, 2};
  const std::string p = path("model.safetensors");
  expect_error(
      [&] {
        write_safetensors(p, {{"a", DType::kF32, {2}, x}, {"a", DType::kF32, {2}, x + 2}});
      },
      {"model.safetensors", "\"a\"", "twice"});
  expect_error(
      [&] {
        write_safetensors(p, {{"ids", DType::kI32, {2}, ids}});
      },
      {"model.safetensors", "\"ids\"", "I32"});
  expect_error(
      [&] {
        write_safetensors(p, {{"neg", DType::kF32, {-1, 2}, x}});
      },
      {"model.safetensors", "\"neg\"", "invalid shape"});
  expect_error(
      [&] {
        write_safetensors(p, {{"null", DType::kF32, {2}, nullptr}});
      },
      {"model.safetensors", "\"null\""});
  expect_error(
      [&] {
        write_checkpoint(dir_, {{"a", DType::kF32, {2}, x}, {"a", DType::kF32, {2}, x}}, 4);
      },
      {"\"a\"", "twice"});
  // Nothing, not even a temporary file, was left behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 0);
}

// ---- robustness ---------------------------------------------------------------------------------

volatile unsigned g_sink = 0;  // keeps the byte sum below from being optimised away

// Opens `p` and touches every byte of every entry; true when the file was accepted. Anything but
// sy::Error escaping is a test failure.
bool open_and_touch(const std::string& p) {
  try {
    auto file = SafetensorsFile::open(p);
    unsigned sum = 0;
    for (const SafetensorsEntry& e : file->entries()) {
      const uint8_t* data = file->data(e);
      for (uint64_t i = 0; i < e.end - e.begin; ++i) sum += data[i];
    }
    g_sink = sum;
    return true;
  } catch (const Error&) {
    return false;
  }
}

TEST_F(SafetensorsTest, EveryTruncationIsRejected) {
  Fixture f;
  write_safetensors(path("full.safetensors"), f.tensors());
  const std::string bytes = read_bytes(path("full.safetensors"));
  for (size_t n = 0; n < bytes.size(); ++n) {
    write_bytes(path("cut.safetensors"), bytes.substr(0, n));
    EXPECT_FALSE(open_and_touch(path("cut.safetensors"))) << "accepted at " << n << " bytes";
  }
  EXPECT_TRUE(open_and_touch(path("full.safetensors")));
}

TEST_F(SafetensorsTest, FlippedHeaderBytesNeverCrash) {
  Fixture f;
  write_safetensors(path("full.safetensors"), f.tensors());
  const std::string bytes = read_bytes(path("full.safetensors"));
  std::mt19937 rng(1234);
  std::uniform_int_distribution<size_t> where(0, bytes.size() - 161);  // length and header
  const std::string digits = "0123456789-[]{},\"e.";
  int n_accepted = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string mutated = bytes;
    for (int k = 0; k < 1 + iter % 3; ++k) {
      size_t at = where(rng);
      mutated[at] = at < 8 ? static_cast<char>(rng()) : digits[rng() % digits.size()];
    }
    write_bytes(path("mutated.safetensors"), mutated);
    n_accepted += open_and_touch(path("mutated.safetensors"));
  }
  EXPECT_LT(n_accepted, 2000);  // most mutations must be caught; none may crash
}

}  // namespace
}  // namespace sy
