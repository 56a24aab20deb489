// Sentencepiece tokenizer (`tokenizer.model`) with Mistral/Llama semantics, and incremental
// detokenisation for streaming.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace sy {

class Tokenizer {
 public:
  // Loads `model_dir/tokenizer.model`. bos/eos come from the model config (-1: none).
  static std::unique_ptr<Tokenizer> load(const std::string& model_dir, int64_t bos_id,
                                         std::vector<int64_t> eos_ids);
  ~Tokenizer();

  // Text -> ids exactly as Hugging Face's LlamaTokenizer (sentencepiece with its dummy prefix
  // and byte fallback); BOS first when `add_bos`.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  // Ids -> text as Hugging Face's decode(skip_special_tokens=True).
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;
  int64_t vocab_size() const;
  int64_t bos_id() const { return bos_id_; }
  const std::vector<int64_t>& eos_ids() const { return eos_ids_; }
  bool is_eos(int64_t id) const;

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int64_t bos_id_ = -1;
  std::vector<int64_t> eos_ids_;
};

// Turns a stream of generated ids into text deltas. Concatenating every delta (and flush())
// gives decode(prompt + generated) minus decode(prompt); a delta never ends inside a UTF-8
// character, and the leading space of a word after the prompt is kept.
class StreamDecoder {
 public:
  StreamDecoder(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt_ids);
  std::string push(int32_t id);  // text completed by this id (may be empty)
  std::string flush();           // whatever is still held back

 private:
  const Tokenizer& tokenizer_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // ids_[prefix_offset_, read_offset_) is context already emitted
  size_t read_offset_ = 0;
};

// Trains a BPE sentencepiece model with byte fallback on `corpus` (deterministic: one thread,
// fixed seed) and writes it to `model_path`. Used by make-tiny-model.
void train_tokenizer(const std::string& corpus, int vocab_size, const std::string& model_path);

}  // namespace sy
