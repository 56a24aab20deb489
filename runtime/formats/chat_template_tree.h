// The chat-template renderer's tree (chat_template.h): what the parser
// (chat_template_parse.cc) builds and the evaluator (chat_template.cc) walks. Internal to the
// formats room.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/formats/chat_template.h"

namespace sy::jinja {

using OJson = nlohmann::ordered_json;

// ---- the tree -----------------------------------------------------------------------------------

enum class Kind {
  // expressions
  kLiteral,
  kName,
  kAttr,
  kItem,
  kSlice,
  kCall,
  kFilter,
  kTest,
  kNot,
  kNeg,
  kBinary,
  kAnd,
  kOr,
  kCond,
  kList,
  kDict,
  // statements
  kText,
  kOutput,
  kIf,
  kFor,
  kSet,
  kBreak,
  kContinue,
  kBody,
};

struct Node {
  Kind kind;
  int line = 0;
  std::string name;  // name, attribute, operator, filter, test, function or method; text
  OJson literal;
  std::vector<std::unique_ptr<Node>> kids;  // operands, arguments, or the body's statements
  std::vector<std::string> kw;  // keyword names of the last kw.size() arguments (calls, filters)
  bool negated = false;         // `is not`, `not in`
  // if: kids = [cond, body, cond, body, ..., else body?]; for: see parse_for; set: see parse_set
  std::vector<std::string> targets;  // for: the loop names; set: the name (and attribute)
  bool has_else = false;
};

using NodePtr = std::unique_ptr<Node>;

NodePtr node(Kind kind, int line, std::string name = {});

// Throws TemplateError("chat template: " + message).
[[noreturn]] void fail(const std::string& message);

// The template's tree (a kBody), or a TemplateError naming the line of the first problem.
NodePtr parse(const std::string& source);

}  // namespace sy::jinja
