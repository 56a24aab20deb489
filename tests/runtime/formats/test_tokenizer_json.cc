// Checkpoints that ship only tokenizer.json: the fixture vocabulary in both Mistral/Mixtral
// layouts (legacy Prepend + Replace normalizer; Metaspace with prepend_scheme "first") gives the
// ids and text of Hugging Face `tokenizers` on every recorded case
// (tests/reference/make_tokenizer_json_fixtures.py), special tokens written in the text
// included; the sentencepiece tokenizer gives the legacy ids too. Unsupported layouts are
// refused naming what is wrong.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/error.h"
#include "runtime/formats/tokenizer.h"

namespace sy {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kFixtures = SY_FIXTURES_DIR;

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// A directory holding `tokenizer_json` as its only tokenizer file.
std::string json_only_dir(const std::string& name, const std::string& tokenizer_json) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("sy_tokenizer_json_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << tokenizer_json;
  return dir.string();
}

const json& cases() {
  static const json j = json::parse(read(kFixtures + "/tokenizer_json/cases.json"));
  return j;
}

void expect_cases(const Tokenizer& t, const std::string& layout) {
  const json& list = cases()["cases"][layout];
  ASSERT_GE(list.size(), 35u);
  for (const json& c : list) {
    const std::string text = c["text"];
    EXPECT_EQ(t.encode_with_special_tokens(text), c["ids"].get<std::vector<int32_t>>())
        << layout << ": " << json(text).dump();
    EXPECT_EQ(t.decode(c["ids"].get<std::vector<int32_t>>()), c["decoded"].get<std::string>())
        << layout << ": " << json(text).dump();
  }
}

TEST(TokenizerJson, LegacyLayoutMatchesTokenizers) {
  const auto t =
      Tokenizer::load(json_only_dir("legacy", read(kFixtures + "/tokenizer.json")), 1, {2});
  EXPECT_EQ(t->vocab_size(), 384);
  expect_cases(*t, "legacy");
  EXPECT_EQ(t->encode("Hello world", true).front(), 1);
}

TEST(TokenizerJson, MetaspaceLayoutMatchesTokenizers) {
  const auto t = Tokenizer::load(kFixtures + "/tokenizer_json/metaspace", 1, {2});
  expect_cases(*t, "metaspace");
}

TEST(TokenizerJson, SentencepieceGivesTheLegacyIds) {
  expect_cases(*Tokenizer::load(kFixtures, 1, {2}), "legacy");
}

TEST(TokenizerJson, LongTextsEncodeInBoundedWork) {
  // One BPE word of 200k characters (no pre-tokenizer splits it): the heap-driven merges take
  // n log n, not n^2.
  const auto t = Tokenizer::load(kFixtures + "/tokenizer_json/metaspace", 1, {2});
  std::string text;
  for (int i = 0; i < 20000; ++i) text += "the yard ";
  const std::vector<int32_t> ids = t->encode(text, false);
  EXPECT_EQ(t->decode(ids), text);
  EXPECT_LT(ids.size(), text.size());
}

std::string refusal(const std::string& name, json tokenizer) {
  try {
    Tokenizer::load(json_only_dir(name, tokenizer.dump()), 1, {2});
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}

TEST(TokenizerJson, RefusesWhatItDoesNotRun) {
  const json base = json::parse(read(kFixtures + "/tokenizer_json/metaspace/tokenizer.json"));
  json wordpiece = base;
  wordpiece["model"]["type"] = "WordPiece";
  EXPECT_NE(refusal("wordpiece", wordpiece).find("model.type must be BPE"), std::string::npos);
  json split = base;
  split["pre_tokenizer"]["split"] = true;
  EXPECT_NE(refusal("split", split).find("pre_tokenizer"), std::string::npos);
  json bytelevel = base;
  bytelevel["pre_tokenizer"] = {{"type", "ByteLevel"}};
  EXPECT_NE(refusal("bytelevel", bytelevel).find("is not supported"), std::string::npos);
  json bad_merge = base;
  bad_merge["model"]["merges"].push_back(json::array({"zzz", "q"}));
  EXPECT_NE(refusal("merge", bad_merge).find("names a piece not in the vocabulary"),
            std::string::npos);
  json gap = base;
  gap["model"]["vocab"]["extra"] = 1000;
  EXPECT_NE(refusal("gap", gap).find("no piece has id"), std::string::npos);
  EXPECT_NE(refusal("notjson", "not json").find("is not a JSON object"), std::string::npos);
}

}  // namespace
}  // namespace sy
