// Sentencepiece tokenizer with Hugging Face decode semantics, incremental detokenisation and
// deterministic training (see tokenizer.h).
//
// Encoding is sentencepiece's own Encode(): with a Mistral/Llama `tokenizer.model` it gives the ids
// of Hugging Face's slow LlamaTokenizer (legacy) and of the tokenizer.json shipped with Mixtral
// checkpoints. A checkpoint with only a tokenizer.json encodes with its BPE model instead
// (tokenizer_json.h), as Hugging Face `tokenizers` does. Special tokens written as text ("<s>") are
// not parsed: they encode as plain text.
//
// Decoding reimplements the Hugging Face decoder chain of those checkpoints instead of calling
// sentencepiece's DecodeIds, because the two differ on two points:
//   * decode(skip_special_tokens=True) drops every special id, <unk> included (sentencepiece
//     would print " ⁇ " for <unk>);
//   * a run of byte-fallback pieces (<0x..>) that is not valid UTF-8 becomes one U+FFFD per byte
//     for the whole run (sentencepiece replaces only the offending bytes).
// The chain is: drop special ids, '▁' -> ' ', byte runs -> UTF-8 (or U+FFFD per byte), join,
// then strip one leading ' ' (the dummy prefix added by encoding).
#include "runtime/formats/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <unordered_map>

#include "kernels/error.h"
#include "runtime/formats/gguf.h"
#include "runtime/formats/tokenizer_json.h"

namespace sy {
namespace {

constexpr std::string_view kSpaceSymbol = "\xe2\x96\x81";  // U+2581 '▁': sentencepiece's space
constexpr std::string_view kReplacement = "\xef\xbf\xbd";  // U+FFFD, the replacement character

// How many of the tokens before the first generated one StreamDecoder keeps as decoding context
// (the value vLLM and TGI use).
constexpr size_t kStreamContextTokens = 5;

// Share of the corpus characters that get a piece of their own; the rarest characters are left
// to byte fallback. 1.0 would make every character of the corpus a piece, which for a varied
// corpus does not fit a small vocabulary (259 ids are already taken by <unk>, <s>, </s> and the
// 256 byte pieces).
constexpr const char* kCharacterCoverage = "0.995";

// Seed of sentencepiece's random generator while training (BPE training draws nothing random from
// it today; fixing it keeps that true if it ever does).
constexpr unsigned int kTrainSeed = 1234;

// Length of the UTF-8 sequence starting at s[i] if it is a valid, shortest-form encoding of a
// scalar value (no surrogates, at most U+10FFFF), else 0. The same rule as Rust's
// String::from_utf8, which Hugging Face's byte-fallback decoder uses.
size_t utf8_char_len(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong
    if (c == 0xED) hi = 0x9F;  // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;  // overlong
    if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if (byte(i + k) < 0x80 || byte(i + k) > 0xBF) return 0;
  return n;
}

bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_char_len(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
  return s;
}

// Feeds the lines of an in-memory corpus to the sentencepiece trainer, as reading the corpus from
// a file would (one sentence per line, without the '\n').
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(std::string_view text) : text_(text) { Next(); }
  bool done() const override { return done_; }
  void Next() override {
    if (pos_ >= text_.size()) {
      done_ = true;
      return;
    }
    size_t end = text_.find('\n', pos_);
    if (end == std::string_view::npos) end = text_.size();
    line_.assign(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
  }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  std::string_view text_;
  size_t pos_ = 0;
  std::string line_;
  bool done_ = false;
};

// Protocol buffer wire format, enough to write a sentencepiece ModelProto.
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, int field, int wire) {
  put_varint(out, static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire));
}
void put_int(std::string& out, int field, int64_t v) {
  put_key(out, field, 0);
  put_varint(out, static_cast<uint64_t>(v));
}
void put_bytes(std::string& out, int field, std::string_view bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}
void put_float(std::string& out, int field, float v) {
  put_key(out, field, 5);
  char b[4];
  std::memcpy(b, &v, 4);
  out.append(b, 4);
}

// The serialized sentencepiece ModelProto of a GGUF file's tokenizer.ggml arrays: a BPE model
// with byte fallback and the identity normalizer, as Mistral's tokenizer.model.
std::string gguf_sentencepiece_model(const std::string& path) {
  const GgufModelFiles files = GgufModelFiles::open(path);
  const GgufFile& f = files.meta();
  const std::string& kind = f.string("tokenizer.ggml.model");
  SY_CHECK(kind == "llama", path, ": tokenizer.ggml.model is \"", kind,
           "\"; only \"llama\" (sentencepiece) tokenizers are supported");
  const std::vector<std::string>& tokens = f.strings("tokenizer.ggml.tokens");
  const std::vector<double>& scores = f.numbers("tokenizer.ggml.scores");
  const std::vector<int64_t>& types = f.integers("tokenizer.ggml.token_type");
  SY_CHECK(!tokens.empty() && scores.size() == tokens.size() && types.size() == tokens.size(), path,
           ": tokenizer.ggml.tokens, scores and token_type have ", tokens.size(), ", ",
           scores.size(), " and ", types.size(), " entries (one each per token)");
  bool dummy_prefix = true;
  if (const GgufValue* v = f.find("tokenizer.ggml.add_space_prefix")) {
    SY_CHECK(v->type == GgufType::kBool, path, ": tokenizer.ggml.add_space_prefix must be a bool");
    dummy_prefix = v->i != 0;
  }
  std::string model;
  int64_t unk = -1;
  for (size_t i = 0; i < tokens.size(); ++i) {
    // sentencepiece's piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused,
    // 6 byte; llama.cpp's token types use the same numbers.
    SY_CHECK(types[i] >= 1 && types[i] <= 6, path, ": token ", i, " has token_type ", types[i],
             " (1 to 6)");
    if (types[i] == 2 && unk < 0) unk = static_cast<int64_t>(i);
    std::string piece;
    put_bytes(piece, 1, tokens[i]);
    put_float(piece, 2, static_cast<float>(scores[i]));
    put_int(piece, 3, types[i]);
    put_bytes(model, 1, piece);
  }
  SY_CHECK(unk >= 0, path, ": no token has token_type 2 (unknown)");
  std::string trainer;
  put_int(trainer, 3, 2);   // model_type BPE
  put_int(trainer, 35, 1);  // byte_fallback
  put_int(trainer, 40, unk);
  put_bytes(model, 2, trainer);
  std::string normalizer;
  put_bytes(normalizer, 1, "identity");
  put_int(normalizer, 3, dummy_prefix ? 1 : 0);  // add_dummy_prefix
  put_int(normalizer, 4, 0);                     // remove_extra_whitespaces
  put_int(normalizer, 5, 1);                     // escape_whitespaces
  put_bytes(model, 3, normalizer);
  return model;
}

}  // namespace

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& model_dir, int64_t bos_id,
                                           std::vector<int64_t> eos_ids) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  if (is_gguf_path(model_dir)) {
    const auto status = t->sp_->LoadFromSerializedProto(gguf_sentencepiece_model(model_dir));
    SY_CHECK(status.ok(), "tokenizer: ", model_dir, ": the tokenizer.ggml arrays do not make a ",
             "sentencepiece model: ", status.ToString());
    return finish(std::move(t), model_dir, bos_id, std::move(eos_ids));
  }
  const std::string path = model_dir + "/tokenizer.model";
  const std::string json_path = model_dir + "/tokenizer.json";
  if (!std::filesystem::exists(path) && std::filesystem::is_regular_file(json_path)) {
    t->sp_.reset();
    t->json_ = TokenizerJson::load(json_path);
    return finish(std::move(t), json_path, bos_id, std::move(eos_ids));
  }
  SY_CHECK(std::filesystem::is_regular_file(path), "tokenizer: cannot open ", path,
           " (nor a tokenizer.json)");
  const auto status = t->sp_->Load(path);
  SY_CHECK(status.ok(), "tokenizer: cannot load ", path, ": ", status.ToString());
  return finish(std::move(t), path, bos_id, std::move(eos_ids));
}

std::unique_ptr<Tokenizer> Tokenizer::finish(std::unique_ptr<Tokenizer> t, const std::string& path,
                                             int64_t bos_id, std::vector<int64_t> eos_ids) {
  const int32_t n_vocab = static_cast<int32_t>(t->vocab_size());
  SY_CHECK(n_vocab > 0, "tokenizer: ", path, " has an empty vocabulary");
  SY_CHECK(bos_id >= -1 && bos_id < n_vocab, "tokenizer: bos id ", bos_id, " is outside the ",
           n_vocab, "-piece vocabulary of ", path);
  for (int64_t id : eos_ids)
    SY_CHECK(id >= 0 && id < n_vocab, "tokenizer: eos id ", id, " is outside the ", n_vocab,
             "-piece vocabulary of ", path);
  t->bos_id_ = bos_id;
  t->eos_ids_ = std::move(eos_ids);

  t->text_.resize(n_vocab);
  t->byte_.assign(n_vocab, -1);
  t->special_.assign(n_vocab, false);
  for (int32_t id = 0; id < n_vocab; ++id) {
    const std::string piece = t->piece(id);
    const TokenizerJson::Kind kind = t->json_ ? t->json_->kind(id) : TokenizerJson::Kind::kNormal;
    if (t->json_ ? kind == TokenizerJson::Kind::kSpecial || kind == TokenizerJson::Kind::kUnknown
                 : t->sp_->IsControl(id) || t->sp_->IsUnknown(id)) {
      t->special_[id] = true;
    } else if (t->json_ ? kind == TokenizerJson::Kind::kByte : t->sp_->IsByte(id)) {
      // Byte pieces are spelled "<0xAB>".
      SY_CHECK(piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece[5] == '>',
               "tokenizer: ", path, ": byte piece ", id, " is spelled \"", piece, "\"");
      t->byte_[id] = static_cast<int16_t>(std::stoi(piece.substr(3, 2), nullptr, 16));
    } else {
      t->text_[id] = replace_all(piece, kSpaceSymbol, " ");
    }
  }
  if (t->bos_id_ >= 0) t->special_[t->bos_id_] = true;
  for (int64_t id : t->eos_ids_) t->special_[id] = true;

  // With a dummy prefix, encode("a") starts with '▁' and decode strips the space it adds.
  const std::vector<int32_t> probe = t->encode("a", false);
  t->strip_leading_space_ = !probe.empty() && t->piece(probe[0]).starts_with(kSpaceSymbol);
  return t;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  SY_CHECK(is_valid_utf8(text), "tokenizer: text to encode is not valid UTF-8");
  return encode_segment(text, true, add_bos);
}

std::vector<int32_t> Tokenizer::encode_segment(std::string_view text, bool first,
                                               bool add_bos) const {
  std::vector<int32_t> out;
  if (add_bos && bos_id_ >= 0) out.push_back(static_cast<int32_t>(bos_id_));
  if (json_) {
    const std::vector<int32_t> ids = json_->encode(text, first);
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
  }
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  SY_CHECK(status.ok(), "tokenizer: encode failed: ", status.ToString());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::vector<int32_t> Tokenizer::encode_with_special_tokens(std::string_view text) const {
  SY_CHECK(is_valid_utf8(text), "tokenizer: text to encode is not valid UTF-8");
  std::vector<std::pair<std::string, int32_t>> specials;
  for (int32_t id = 0; id < static_cast<int32_t>(special_.size()); ++id)
    if (special_[id] && !piece(id).empty()) specials.emplace_back(piece(id), id);
  std::vector<int32_t> out;
  bool begun = false;  // a special token came first
  while (!text.empty()) {
    // The earliest special piece, the longest one where several start at the same place.
    size_t at = std::string_view::npos, length = 0;
    int32_t id = -1;
    for (const auto& [piece, pid] : specials) {
      const size_t p = text.find(piece);
      if (p == std::string_view::npos) continue;
      if (p < at || (p == at && piece.size() > length)) {
        at = p;
        length = piece.size();
        id = pid;
      }
    }
    const std::string_view segment = text.substr(0, at);
    if (!segment.empty()) {
      // `first`: the segment begins the text (tokenizer.json's Metaspace "first" prefix).
      const std::vector<int32_t> ids = encode_segment(segment, out.empty() && !begun, false);
      out.insert(out.end(), ids.begin(), ids.end());
    }
    if (id < 0) break;
    out.push_back(id);
    text.remove_prefix(at + length);
    begun = true;
  }
  return out;
}

std::string Tokenizer::decode_raw(const int32_t* ids, size_t n_ids) const {
  std::string out;
  std::string bytes;  // the current run of byte-fallback pieces
  const auto flush_bytes = [&] {
    if (bytes.empty()) return;
    if (is_valid_utf8(bytes)) {
      out += bytes;
    } else {
      for (size_t k = 0; k < bytes.size(); ++k) out += kReplacement;
    }
    bytes.clear();
  };
  const int64_t n_vocab = static_cast<int64_t>(text_.size());
  for (size_t i = 0; i < n_ids; ++i) {
    const int32_t id = ids[i];
    SY_CHECK(id >= 0 && id < n_vocab, "tokenizer: id ", id, " is outside the vocabulary of ",
             n_vocab, " pieces");
    if (special_[id]) continue;
    if (byte_[id] >= 0) {
      bytes.push_back(static_cast<char>(byte_[id]));
      continue;
    }
    flush_bytes();
    out += text_[id];
  }
  flush_bytes();
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text = decode_raw(ids.data(), ids.size());
  if (strip_leading_space_ && !text.empty() && text[0] == ' ') text.erase(0, 1);
  return text;
}

bool is_utf8(std::string_view text) {
  return is_valid_utf8(text);
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const std::string p = piece(id);  // checks the id
  if (byte_[static_cast<size_t>(id)] >= 0)
    return std::string(1, static_cast<char>(byte_[static_cast<size_t>(id)]));
  return special_[static_cast<size_t>(id)] ? p : text_[static_cast<size_t>(id)];
}

std::string Tokenizer::piece(int32_t id) const {
  SY_CHECK(id >= 0 && id < vocab_size(), "tokenizer: id ", id, " is outside the vocabulary of ",
           vocab_size(), " pieces");
  return json_ ? json_->piece(id) : sp_->IdToPiece(id);
}

int64_t Tokenizer::vocab_size() const {
  return json_ ? json_->vocab_size() : sp_->GetPieceSize();
}

bool Tokenizer::is_continuation_or_special(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(text_.size())) return false;
  return special_[id] || (byte_[id] >= 0 && (byte_[id] & 0xC0) == 0x80);
}

bool Tokenizer::is_eos(int64_t id) const {
  return std::find(eos_ids_.begin(), eos_ids_.end(), id) != eos_ids_.end();
}

// ---- StreamDecoder ------------------------------------------------------------------------------
//
// The prefix/read-offset scheme of vLLM and TGI, on the raw decoder output (no leading-space
// strip): text = raw(ids[prefix:]) is compared with raw(ids[prefix:read]), the part already
// emitted, and the difference is emitted once it does not end in U+FFFD (a byte-fallback
// character still missing bytes). Decoding raw keeps the space of a word's '▁'; the one space
// that decode() strips is stripped here only while nothing has been produced yet (the prompt
// decodes to nothing).

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt_ids)
    : tokenizer_(tokenizer), ids_(prompt_ids) {
  read_offset_ = ids_.size();
  prefix_offset_ = read_offset_ > kStreamContextTokens ? read_offset_ - kStreamContextTokens : 0;
  // The context must not start inside a byte-fallback character: a run of byte pieces that
  // begins with a continuation byte decodes to U+FFFD.
  while (prefix_offset_ > 0 && tokenizer_.is_continuation_or_special(ids_[prefix_offset_]))
    --prefix_offset_;
  strip_pending_ =
      tokenizer_.strip_leading_space_ && tokenizer_.decode_raw(ids_.data(), ids_.size()).empty();
}

std::string StreamDecoder::push(int32_t id) {
  SY_CHECK(id >= 0 && id < tokenizer_.vocab_size(), "stream decoder: id ", id,
           " is outside the vocabulary of ", tokenizer_.vocab_size(), " pieces");
  ids_.push_back(id);
  return advance(false);
}

std::string StreamDecoder::flush() {
  return advance(true);
}

std::string StreamDecoder::advance(bool final) {
  const std::string prefix =
      tokenizer_.decode_raw(ids_.data() + prefix_offset_, read_offset_ - prefix_offset_);
  const std::string text =
      tokenizer_.decode_raw(ids_.data() + prefix_offset_, ids_.size() - prefix_offset_);
  if (text.size() <= prefix.size()) return {};
  if (!final && ends_with(text, kReplacement)) return {};
  // `text` normally extends `prefix`. When a later byte made an earlier, already emitted byte run
  // invalid it does not; start at a character boundary so the delta stays valid UTF-8.
  size_t start = prefix.size();
  while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) ++start;
  std::string delta = text.substr(start);
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  if (strip_pending_ && !delta.empty()) {
    strip_pending_ = false;
    if (delta[0] == ' ') delta.erase(0, 1);
  }
  return delta;
}

// ---- training -----------------------------------------------------------------------------------

void train_tokenizer(const std::string& corpus, int vocab_size, const std::string& model_path) {
  SY_CHECK(vocab_size > 0, "train_tokenizer: vocab_size must be positive, got ", vocab_size);
  SY_CHECK(!corpus.empty(), "train_tokenizer: the corpus is empty");
  // Llama/Mistral conventions: <unk>=0, <s>=1, </s>=2, no pad; a dummy '▁' prefix; no
  // normalisation; byte fallback for characters without a piece. One thread makes the result
  // independent of scheduling, so the same corpus always gives the same bytes.
  const std::unordered_map<std::string, std::string> options = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", kCharacterCoverage},
      {"num_threads", "1"},
      {"split_digits", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"unk_piece", "<unk>"},
      {"bos_piece", "<s>"},
      {"eos_piece", "</s>"},
      {"add_dummy_prefix", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"minloglevel", "1"},  // no per-step progress lines on stderr
  };
  sentencepiece::SetRandomGeneratorSeed(kTrainSeed);
  LineIterator lines(corpus);
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(options, &lines, &model);
  if (!status.ok()) {
    // The usual cause, a vocabulary smaller than the fixed pieces (3 specials, 256 bytes) and
    // the corpus's characters: sentencepiece ends its message with "<size> vs <needed>.".
    const std::string message(status.message());
    const size_t vs = message.rfind(" vs ");
    if (message.find("smaller than required_chars") != std::string::npos && vs != std::string::npos)
      SY_FAIL("train_tokenizer: a vocabulary of ", vocab_size,
              " is too small for this corpus: its characters and the fixed pieces need at least ",
              std::atoi(message.c_str() + vs + 4));
    SY_FAIL("train_tokenizer: training for ", model_path, " failed: ", status.ToString());
  }
  std::ofstream out(model_path, std::ios::binary | std::ios::trunc);
  SY_CHECK(out.good(), "train_tokenizer: cannot write ", model_path);
  out.write(model.data(), static_cast<std::streamsize>(model.size()));
  out.close();
  SY_CHECK(out.good(), "train_tokenizer: writing ", model_path, " failed");
}

}  // namespace sy
