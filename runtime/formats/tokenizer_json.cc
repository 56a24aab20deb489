// tokenizer.json's BPE model (see tokenizer_json.h).
#include "runtime/formats/tokenizer_json.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <queue>
#include <tuple>

#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace sy {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kMark = "\xE2\x96\x81";  // '▁'
constexpr size_t kMaxFileBytes = size_t{256} << 20;
constexpr size_t kMaxPieces = size_t{1} << 22;

std::string replace_spaces(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  for (char c : text) {
    if (c == ' ')
      out += kMark;
    else
      out += c;
  }
  return out;
}

size_t utf8_length(unsigned char c) {
  return c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
}

bool is_mark_replace(const Json& n) {
  return n.value("type", "") == "Replace" && n.contains("pattern") &&
         n["pattern"].value("String", "") == " " && n.value("content", "") == kMark;
}

bool is_mark_prepend(const Json& n) {
  return n.value("type", "") == "Prepend" && n.value("prepend", "") == kMark;
}

}  // namespace

std::unique_ptr<TokenizerJson> TokenizerJson::load(const std::string& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  SY_CHECK(!ec, "tokenizer: cannot open ", path);
  SY_CHECK(size <= kMaxFileBytes, "tokenizer: ", path, " is larger than 256 MiB");
  std::ifstream in(path);
  const Json j = Json::parse(in, nullptr, false);
  SY_CHECK(!j.is_discarded() && j.is_object(), "tokenizer: ", path, " is not a JSON object");
  auto t = std::unique_ptr<TokenizerJson>(new TokenizerJson());
  const Json& model = j.value("model", Json());
  SY_CHECK(model.is_object() && model.value("type", "") == "BPE", "tokenizer: ", path,
           ": model.type must be BPE (the Mistral/Mixtral layout)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"})
    SY_CHECK(!model.contains(key) || model[key].is_null() || model[key] == "", "tokenizer: ", path,
             ": model.", key, " is not supported");
  SY_CHECK(!model.value("ignore_merges", false), "tokenizer: ", path,
           ": model.ignore_merges is not supported");
  t->byte_fallback_ = model.value("byte_fallback", false);
  t->fuse_unk_ = model.value("fuse_unk", false);

  t->read_vocab(path, model, j.value("added_tokens", Json::array()));
  t->read_merges(path, model.value("merges", Json::array()));
  t->read_layout(path, j.value("normalizer", Json()), j.value("pre_tokenizer", Json()));
  return t;
}

// The vocabulary, then the added tokens (which may extend it), the byte pieces and <unk>.
void TokenizerJson::read_vocab(const std::string& path, const Json& model, const Json& added) {
  const Json& vocab = model.value("vocab", Json());
  SY_CHECK(vocab.is_object() && !vocab.empty() && vocab.size() <= kMaxPieces, "tokenizer: ", path,
           ": model.vocab must be an object of at most 2^22 pieces");
  std::vector<std::pair<std::string, int64_t>> entries;
  for (const auto& [piece, id] : vocab.items()) {
    SY_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 &&
                 id.get<int64_t>() < static_cast<int64_t>(kMaxPieces),
             "tokenizer: ", path, ": the id of piece \"", piece, "\" is not a valid id");
    entries.emplace_back(piece, id.get<int64_t>());
  }
  SY_CHECK(added.is_array() && added.size() <= kMaxPieces, "tokenizer: ", path,
           ": added_tokens must be an array");
  for (const Json& a : added) {
    SY_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() &&
                 a["id"].get<int64_t>() >= 0 &&
                 a["id"].get<int64_t>() < static_cast<int64_t>(kMaxPieces) &&
                 a.contains("content") && a["content"].is_string(),
             "tokenizer: ", path, ": an added token lacks a valid id or content");
    entries.emplace_back(a["content"].get<std::string>(), a["id"].get<int64_t>());
  }
  int64_t n = 0;
  for (const auto& [piece, id] : entries) n = std::max(n, id + 1);
  pieces_.assign(static_cast<size_t>(n), std::string());
  kinds_.assign(static_cast<size_t>(n), Kind::kNormal);
  std::vector<bool> seen(static_cast<size_t>(n), false);
  for (const auto& [piece, id] : entries) {
    SY_CHECK(!seen[static_cast<size_t>(id)] || pieces_[static_cast<size_t>(id)] == piece,
             "tokenizer: ", path, ": id ", id, " names two pieces");
    seen[static_cast<size_t>(id)] = true;
    pieces_[static_cast<size_t>(id)] = piece;
    ids_.emplace(piece, static_cast<int32_t>(id));
  }
  for (size_t id = 0; id < seen.size(); ++id)
    SY_CHECK(seen[id], "tokenizer: ", path, ": no piece has id ", id);
  for (const Json& a : added)
    if (a.value("special", false)) kinds_[a["id"].get<size_t>()] = Kind::kSpecial;
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    const auto it = ids_.find(name);
    if (it == ids_.end()) continue;
    byte_ids_[b] = it->second;
    if (byte_fallback_) kinds_[static_cast<size_t>(it->second)] = Kind::kByte;
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    const auto it = ids_.find(model["unk_token"].get<std::string>());
    SY_CHECK(it != ids_.end(), "tokenizer: ", path, ": unk_token is not in the vocabulary");
    unk_id_ = it->second;
    kinds_[static_cast<size_t>(unk_id_)] = Kind::kUnknown;
  }
}

// Merges: "a b" strings or [a, b] pairs, in rank order.
void TokenizerJson::read_merges(const std::string& path, const Json& merges) {
  SY_CHECK(merges.is_array() && merges.size() <= kMaxPieces, "tokenizer: ", path,
           ": model.merges must be an array");
  for (size_t r = 0; r < merges.size(); ++r) {
    const Json& m = merges[r];
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      SY_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
               "tokenizer: ", path, ": merge ", r, " \"", s, "\" is not two pieces");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      SY_CHECK(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(),
               "tokenizer: ", path, ": merge ", r, " is not a pair of pieces");
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    }
    const auto ia = ids_.find(a), ib = ids_.find(b), iab = ids_.find(a + b);
    SY_CHECK(ia != ids_.end() && ib != ids_.end() && iab != ids_.end(), "tokenizer: ", path,
             ": merge ", r, " (\"", a, "\", \"", b, "\") names a piece not in the vocabulary");
    merges_.emplace(pair_key(ia->second, ib->second),
                    Merge{static_cast<int32_t>(r), iab->second});  // the first rank wins
  }
}

// The two layouts' '▁' handling: the legacy normalizer, or Metaspace.
void TokenizerJson::read_layout(const std::string& path, const Json& normalizer, const Json& pre) {
  bool replaces = false;
  if (!normalizer.is_null()) {
    const Json list = normalizer.value("type", "") == "Sequence"
                          ? normalizer.value("normalizers", Json::array())
                          : Json::array({normalizer});
    for (size_t k = 0; k < list.size(); ++k) {
      if (is_mark_prepend(list[k]) && k == 0) {
        prepend_always_ = true;
      } else if (is_mark_replace(list[k])) {
        replaces = true;
      } else {
        SY_FAIL("tokenizer: ", path, ": normalizer ", list[k].dump(),
                " is not supported (only Prepend(\"\u2581\") then Replace(\" \", \"\u2581\"))");
      }
    }
  }
  if (!pre.is_null()) {
    SY_CHECK(pre.value("type", "") == "Metaspace" && pre.value("replacement", "") == kMark &&
                 !pre.value("split", false),
             "tokenizer: ", path, ": pre_tokenizer ", pre.dump(),
             " is not supported (only Metaspace with replacement \u2581 and split false)");
    SY_CHECK(!replaces, "tokenizer: ", path, ": both a Replace normalizer and Metaspace");
    replaces = true;
    prepend_unless_marked_ = true;
    const std::string scheme =
        pre.value("prepend_scheme", pre.value("add_prefix_space", true) ? "always" : "never");
    SY_CHECK(scheme == "always" || scheme == "first" || scheme == "never", "tokenizer: ", path,
             ": Metaspace prepend_scheme '", scheme, "' is not supported");
    prepend_always_ = scheme == "always";
    prepend_first_ = scheme == "first";
  }
  SY_CHECK(replaces, "tokenizer: ", path,
           ": spaces are not marked with \u2581 (no Replace normalizer nor Metaspace)");
}

std::string TokenizerJson::prepare(std::string_view text, bool first) const {
  if (text.empty()) return {};
  if (!prepend_unless_marked_)  // legacy: Prepend, then Replace
    return replace_spaces(prepend_always_ ? std::string(" ") + std::string(text)
                                          : std::string(text));
  std::string s = replace_spaces(text);
  const bool prepend = prepend_always_ || (prepend_first_ && first);
  if (prepend && !std::string_view(s).starts_with(kMark)) s = std::string(kMark) + s;
  return s;
}

std::vector<int32_t> TokenizerJson::encode(std::string_view text, bool first) const {
  std::vector<int32_t> out;
  const std::string word = prepare(text, first);
  if (!word.empty()) bpe(word, out);
  return out;
}

void TokenizerJson::bpe(const std::string& word, std::vector<int32_t>& out) const {
  // The symbols: each character's piece, its bytes' pieces, or <unk> (runs fused).
  std::vector<int32_t> ids;
  bool last_unk = false;
  for (size_t i = 0; i < word.size();) {
    const size_t len = std::min(utf8_length(static_cast<unsigned char>(word[i])), word.size() - i);
    const auto it = ids_.find(word.substr(i, len));
    bool bytes = byte_fallback_;
    for (size_t k = 0; bytes && k < len; ++k)
      bytes = byte_ids_[static_cast<unsigned char>(word[i + k])] >= 0;
    if (it != ids_.end()) {
      ids.push_back(it->second);
      last_unk = false;
    } else if (bytes) {
      for (size_t k = 0; k < len; ++k)
        ids.push_back(byte_ids_[static_cast<unsigned char>(word[i + k])]);
      last_unk = false;
    } else {
      SY_CHECK(unk_id_ >= 0,
               "tokenizer: a character is not in the vocabulary and there is no <unk>");
      if (!(fuse_unk_ && last_unk)) ids.push_back(unk_id_);
      last_unk = true;
    }
    i += len;
  }
  // Merges, lowest rank first and leftmost first among equals, over a linked list.
  const int32_t n = static_cast<int32_t>(ids.size());
  std::vector<int32_t> prev(static_cast<size_t>(n)), next(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    prev[static_cast<size_t>(i)] = i - 1;
    next[static_cast<size_t>(i)] = i + 1 < n ? i + 1 : -1;
  }
  using Candidate =
      std::tuple<int32_t, int32_t, int32_t, int32_t>;  // rank, left, left id, right id
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto consider = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = next[static_cast<size_t>(left)];
    if (right < 0) return;
    const auto it =
        merges_.find(pair_key(ids[static_cast<size_t>(left)], ids[static_cast<size_t>(right)]));
    if (it != merges_.end())
      heap.emplace(it->second.rank, left, ids[static_cast<size_t>(left)],
                   ids[static_cast<size_t>(right)]);
  };
  for (int32_t i = 0; i < n; ++i) consider(i);
  while (!heap.empty()) {
    const auto [rank, left, left_id, right_id] = heap.top();
    heap.pop();
    const int32_t right = next[static_cast<size_t>(left)];
    // Stale: the left symbol was merged away or changed, or its neighbour did.
    if (ids[static_cast<size_t>(left)] != left_id || right < 0 ||
        ids[static_cast<size_t>(right)] != right_id)
      continue;
    ids[static_cast<size_t>(left)] = merges_.at(pair_key(left_id, right_id)).id;
    ids[static_cast<size_t>(right)] = -1;
    next[static_cast<size_t>(left)] = next[static_cast<size_t>(right)];
    if (next[static_cast<size_t>(right)] >= 0)
      prev[static_cast<size_t>(next[static_cast<size_t>(right)])] = left;
    consider(prev[static_cast<size_t>(left)]);
    consider(left);
  }
  for (int32_t i = 0; i >= 0 && n > 0; i = next[static_cast<size_t>(i)])
    out.push_back(ids[static_cast<size_t>(i)]);
}

}  // namespace sy
