// A Hugging Face fast tokenizer (`tokenizer.json`) of the kind Mistral and Mixtral checkpoints
// ship: a BPE model with byte fallback over '▁'-marked text, in either layout:
//   * legacy: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer;
//   * Metaspace: no normalizer, pre-tokenizer Metaspace(replacement "▁", prepend_scheme always,
//     first or never, split false).
// Encoding follows Hugging Face `tokenizers` (tests/fixtures/tokenizer_json/cases.json): each
// character is its piece, or its UTF-8 bytes' <0xXX> pieces, or <unk>; then the merges of lowest
// rank first, leftmost first among equals. Anything else in the file (another model type, a
// pre-tokenizer that splits, merges naming unknown pieces) is refused when loading, naming it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace sy {

class TokenizerJson {
 public:
  enum class Kind { kNormal, kSpecial, kUnknown, kByte };

  // Throws naming the file and what in it is not supported.
  static std::unique_ptr<TokenizerJson> load(const std::string& path);

  int64_t vocab_size() const { return static_cast<int64_t>(pieces_.size()); }
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  Kind kind(int32_t id) const { return kinds_[static_cast<size_t>(id)]; }
  // The ids of `text`, which holds no special token: `first` when it begins the whole input
  // (Metaspace's prepend_scheme "first" prepends '▁' only there).
  std::vector<int32_t> encode(std::string_view text, bool first) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // the merged piece
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  // load()'s parts; each throws naming `path` and what is wrong.
  void read_vocab(const std::string& path, const nlohmann::json& model,
                  const nlohmann::json& added);
  void read_merges(const std::string& path, const nlohmann::json& merges);
  void read_layout(const std::string& path, const nlohmann::json& normalizer,
                   const nlohmann::json& pre);
  // The normalized, '▁'-marked segment.
  std::string prepare(std::string_view text, bool first) const;
  void bpe(const std::string& word, std::vector<int32_t>& out) const;

  std::vector<std::string> pieces_;  // by id
  std::vector<Kind> kinds_;          // by id
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id, right id) -> rank and result
  int32_t byte_ids_[256];                       // <0xXX> pieces; -1 where absent
  int32_t unk_id_ = -1;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool prepend_always_ = false;         // legacy Prepend, or Metaspace "always"
  bool prepend_first_ = false;          // Metaspace "first"
  bool prepend_unless_marked_ = false;  // Metaspace: not when the text already starts with '▁'
};

}  // namespace sy
