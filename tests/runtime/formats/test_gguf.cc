// Tests for runtime/formats/gguf and kernels/cpu/quant: the fixture written by the `gguf`
// package's GGUFWriter (tests/reference/make_gguf_fixtures.py) read back, metadata of every
// value type, every dequantized type bit-exact against gguf.quants; then one malformed copy per
// rule, each refused with one sy::Error naming the problem, and every truncation refused.
#include "runtime/formats/gguf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/error.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

const std::string kFixture = std::string(SY_FIXTURES_DIR) + "/gguf/quant_blocks.gguf";

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string write_copy(const std::vector<uint8_t>& bytes, const std::string& name) {
  const std::string path = (fs::path(testing::TempDir()) / name).string();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return path;
}

// The position just past a GGUF string's bytes equal to `text` (its u64 length before them).
size_t after_string(const std::vector<uint8_t>& bytes, const std::string& text) {
  for (size_t i = 8; i + text.size() <= bytes.size(); ++i) {
    uint64_t n = 0;
    std::memcpy(&n, bytes.data() + i - 8, 8);
    if (n == text.size() && std::memcmp(bytes.data() + i, text.data(), text.size()) == 0)
      return i + text.size();
  }
  ADD_FAILURE() << "no string " << text;
  return 0;
}

template <typename T>
void put(std::vector<uint8_t>& bytes, size_t at, T v) {
  std::memcpy(bytes.data() + at, &v, sizeof(T));
}

std::string open_error(const std::vector<uint8_t>& bytes, const std::string& name) {
  try {
    GgufFile::open(write_copy(bytes, name));
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}

TEST(Gguf, ReadsWhatTheGgufWriterWrote) {
  auto f = GgufFile::open(kFixture);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->tensors().size(), 14u);
  EXPECT_EQ(f->string("general.architecture"), "llama");
  EXPECT_EQ(f->uint("test.u32"), 7u);
  EXPECT_EQ(f->number("test.i32"), -3.0);
  EXPECT_EQ(f->number("test.f32"), 0.5);
  EXPECT_EQ(f->uint("test.u64"), 1ull << 40);
  EXPECT_EQ(f->find("test.bool")->u, 1u);
  EXPECT_EQ(f->strings("test.strings"), (std::vector<std::string>{"a", "bc", ""}));
  EXPECT_EQ(f->numbers("test.floats"), (std::vector<double>{0.25, -1.5}));
  EXPECT_EQ(f->integers("test.ints"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_THROW(f->uint("test.string"), Error);
  EXPECT_THROW(f->uint("test.i32"), Error);  // negative
  EXPECT_THROW(f->string("no.such.key"), Error);
  const GgufTensor* t = f->find_tensor("Q4_K.raw");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->type, cpu::GgmlType::kQ4_K);
  EXPECT_EQ(t->dims, (std::vector<int64_t>{256, 4}));
  EXPECT_EQ(t->bytes, 4u * 144u);
  EXPECT_EQ(t->offset % 32, 0u);
}

TEST(Gguf, DequantizationIsBitExactAgainstGgufQuants) {
  auto f = GgufFile::open(kFixture);
  for (const char* type : {"F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"}) {
    const GgufTensor* raw = f->find_tensor(std::string(type) + ".raw");
    const GgufTensor* want = f->find_tensor(std::string(type) + ".want");
    ASSERT_TRUE(raw != nullptr && want != nullptr) << type;
    ASSERT_EQ(want->type, cpu::GgmlType::kF32);
    const int64_t n = raw->elements();
    std::vector<float> got(static_cast<size_t>(n), -7.f);
    cpu::dequantize_row(raw->type, f->data(*raw), got.data(), n);
    EXPECT_EQ(std::memcmp(got.data(), f->data(*want), static_cast<size_t>(n) * 4), 0) << type;
    int64_t nonzero = 0;  // the fixture's blocks are not all zero
    for (float v : got) nonzero += v != 0.f;
    EXPECT_GT(nonzero, n / 2) << type;
  }
  std::vector<float> out(32);
  EXPECT_THROW(cpu::dequantize_row(cpu::GgmlType::kQ3_K, nullptr, out.data(), 256), Error);
  EXPECT_THROW(cpu::dequantize_row(cpu::GgmlType::kQ8_0, nullptr, out.data(), 31), Error);
}

TEST(Gguf, MalformedFilesNameTheProblem) {
  const std::vector<uint8_t> good = read_bytes(kFixture);
  ASSERT_GT(good.size(), 1000u);
  struct Case {
    const char* what;
    std::function<void(std::vector<uint8_t>&)> mutate;
    const char* message;
  };
  const size_t strings = after_string(good, "test.strings");
  const size_t f16 = after_string(good, "F16.raw");  // n_dims, 2 dims, type, offset follow
  const size_t want = after_string(good, "F16.want");
  const size_t q8 = after_string(good, "Q8_0.raw");
  const std::vector<Case> cases = {
      {"magic", [](auto& b) { b[0] = 'X'; }, "no \"GGUF\" magic"},
      {"version", [](auto& b) { put<uint32_t>(b, 4, 1); }, "GGUF version 1"},
      {"tensor count", [](auto& b) { put<uint64_t>(b, 8, 1ull << 40); }, "tensors do not fit"},
      {"metadata count", [](auto& b) { put<uint64_t>(b, 16, 1ull << 40); }, "pairs do not fit"},
      {"array count", [&](auto& b) { put<uint64_t>(b, strings + 8, 1ull << 40); },
       "test.strings: an array of 1099511627776 elements"},
      {"array fits", [&](auto& b) { put<uint64_t>(b, strings + 8, 1ull << 20); },
       "does not fit in the"},
      {"array type", [&](auto& b) { put<uint32_t>(b, strings + 4, 77); },
       "unknown array element type 77"},
      {"value type", [&](auto& b) { put<uint32_t>(b, strings, 99); }, "unknown value type 99"},
      {"dims", [&](auto& b) { put<uint32_t>(b, f16, 9); }, "\"F16.raw\": 9 dimensions"},
      {"empty dim", [&](auto& b) { put<uint64_t>(b, f16 + 4, 0); }, "dimension 0 of 0"},
      {"ggml type", [&](auto& b) { put<uint32_t>(b, f16 + 20, 99); }, "unknown GGML type 99"},
      {"blocks", [&](auto& b) { put<uint64_t>(b, q8 + 4, 100); },
       "rows of 100 elements of Q8_0 are not whole blocks of 32"},
      {"alignment", [&](auto& b) { put<uint64_t>(b, f16 + 24, 1); }, "not a multiple of the"},
      {"past the end", [&](auto& b) { put<uint64_t>(b, f16 + 24, 1ull << 40); }, "end past the"},
      {"overlap", [&](auto& b) { put<uint64_t>(b, want + 24, 0); }, "overlap"},
      {"duplicate key",
       [&](auto& b) { std::memcpy(b.data() + after_string(b, "test.i32") - 3, "u32", 3); },
       "test.u32 given twice"},
      {"duplicate tensor",
       [&](auto& b) { std::memcpy(b.data() + after_string(b, "Q4_0.want") - 9, "Q8", 2); },
       "tensor \"Q8_0.want\" given twice"},
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> bad = good;
    c.mutate(bad);
    const std::string message = open_error(bad, "bad.gguf");
    EXPECT_FALSE(message.empty()) << c.what << ": accepted";
    EXPECT_NE(message.find(c.message), std::string::npos) << c.what << ": " << message;
    EXPECT_NE(message.find("bad.gguf"), std::string::npos) << c.what << ": " << message;
  }
}

// Every cut of the header and some of the data: an error, never a crash or a read past the end.
TEST(Gguf, EveryTruncationIsRefused) {
  const std::vector<uint8_t> good = read_bytes(kFixture);
  for (size_t n = 0; n < good.size(); n += n < 1200 ? 1 : 997) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(open_error(cut, "cut.gguf").empty()) << n << " bytes accepted";
  }
}

}  // namespace
}  // namespace sy
