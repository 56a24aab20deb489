// Chat templates: the Jinja text of a checkpoint's tokenizer_config.json `chat_template`,
// rendered as Hugging Face's apply_chat_template does (jinja2 with trim_blocks, lstrip_blocks
// and the loop controls; raise_exception; the messages, add_generation_prompt and the special
// tokens' text in the context).
//
// The Jinja subset of the chat templates in use: text, {{ }}, {% %}, {# #}, whitespace control
// (-), if/elif/else, for (with an if filter, else, loop.index/index0/first/last/length/revindex,
// break, continue), set (names, namespace attributes), literals (strings, numbers, booleans,
// none, lists, dicts), attribute and item access, slices, the operators of Jinja (arithmetic,
// ~, comparisons, in, and/or/not, the conditional expression), the tests defined, undefined,
// none, string, number, mapping, iterable, true, false, even, odd, and the filters and methods
// those templates call (length, trim, upper, lower, tojson, string, list, first, last, join,
// default, items, strip, startswith, endswith, split, replace, selectattr, rejectattr, map).
// Anything else is an error when the template is parsed, so that a template the renderer
// cannot run is refused at start-up, not at the first request.
#pragma once

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace sy {

// A template that cannot be parsed, or whose rendering failed: raise_exception's message, or
// what went wrong and where.
class TemplateError : public Error {
 public:
  explicit TemplateError(const std::string& message) : Error(message) {}
};

namespace jinja {
struct Node;
}

class ChatTemplate {
 public:
  // Parses `source`; throws TemplateError naming the line of the first problem.
  explicit ChatTemplate(const std::string& source);
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Renders with `context` (a JSON object: messages, add_generation_prompt, bos_token, ...).
  // Throws TemplateError.
  std::string render(const nlohmann::json& context) const;

  // The chat_template of `model_dir/tokenizer_config.json` (a string, or the entry named
  // "default" of a list of {name, template}), or a GGUF file's tokenizer.chat_template; empty
  // when there is none.
  static std::string find(const std::string& model_dir);
  // Mixtral-8x7B-Instruct-v0.1's template in its later form (an optional system message folded
  // into the first user turn), which make-tiny-model writes.
  static const std::string& mixtral_instruct();

 private:
  std::unique_ptr<jinja::Node> root_;
};

}  // namespace sy
