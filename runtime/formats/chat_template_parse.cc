// The chat-template parser (chat_template_tree.h): a lexer that applies Jinja's whitespace
// rules as Hugging Face configures them (trim_blocks, lstrip_blocks, '-'), an expression
// tokenizer, and a recursive-descent parser with Jinja's precedence. What the renderer cannot
// run is refused here, so that a template fails at start-up, not at the first request.
#include <algorithm>
#include <cctype>
#include <set>

#include "runtime/formats/chat_template_tree.h"

namespace sy::jinja {

void fail(const std::string& message) {
  throw TemplateError("chat template: " + message);
}

NodePtr node(Kind kind, int line, std::string name) {
  auto n = std::make_unique<Node>();
  n->kind = kind;
  n->line = line;
  n->name = std::move(name);
  return n;
}

// ---- lexing -------------------------------------------------------------------------------------

struct Tag {
  enum Type { kText, kExpr, kStmt } type;
  std::string body;
  int line;
};

// A text or a tag as written, with its whitespace controls.
struct Raw {
  Tag tag;
  bool block = false;  // {% %} or {# #}
  bool comment = false;
  bool strip_before = false, strip_after = false, keep_before = false;
};

// Whitespace: '-' strips all of it, a block tag's lstrip_blocks the spaces before it on its
// line, its trim_blocks one newline after it. Tags sit at odd indices, between texts. The
// before-rules go first, on the texts as written, so that a newline trim_blocks takes still
// marks the start of the next line.
void apply_whitespace(std::vector<Raw>& raw) {
  auto is_ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  for (size_t t = 1; t + 1 < raw.size(); t += 2) {
    const Raw& r = raw[t];
    std::string& before = raw[t - 1].tag.body;
    if (r.strip_before) {
      while (!before.empty() && is_ws(before.back())) before.pop_back();
    } else if (r.block && !r.keep_before) {
      size_t e = before.size();
      while (e > 0 && (before[e - 1] == ' ' || before[e - 1] == '\t')) --e;
      if (e == 0 ? t == 1 : before[e - 1] == '\n') before.resize(e);
    }
  }
  for (size_t t = 1; t + 1 < raw.size(); t += 2) {
    const Raw& r = raw[t];
    std::string& after = raw[t + 1].tag.body;
    if (r.strip_after) {
      size_t s = 0;
      while (s < after.size() && is_ws(after[s])) ++s;
      after.erase(0, s);
    } else if (r.block) {
      if (after.starts_with("\r\n"))
        after.erase(0, 2);
      else if (after.starts_with("\n"))
        after.erase(0, 1);
    }
  }
}

// Splits the source into texts and tags, then applies the whitespace rules.
std::vector<Tag> lex(const std::string& src) {
  std::vector<Raw> raw;
  size_t i = 0;
  int line = 1;
  auto count_lines = [&](size_t from, size_t to) {
    line += static_cast<int>(std::count(src.begin() + static_cast<std::ptrdiff_t>(from),
                                        src.begin() + static_cast<std::ptrdiff_t>(to), '\n'));
  };
  std::string text;
  int text_line = 1;
  while (i < src.size()) {
    const size_t open = src.find('{', i);
    const bool tag_here = open != std::string::npos && open + 1 < src.size() &&
                          (src[open + 1] == '{' || src[open + 1] == '%' || src[open + 1] == '#');
    if (!tag_here) {
      const size_t to = open == std::string::npos ? src.size() : open + 1;
      text += src.substr(i, to - i);
      count_lines(i, to);
      i = to;
      continue;
    }
    text += src.substr(i, open - i);
    count_lines(i, open);
    raw.push_back({{Tag::kText, text, text_line}});
    text.clear();
    const char k = src[open + 1];
    Raw r{{k == '{' ? Tag::kExpr : Tag::kStmt, "", line}};
    r.block = k != '{';
    r.comment = k == '#';
    size_t p = open + 2;
    if (p < src.size() && src[p] == '-') {
      r.strip_before = true;
      ++p;
    } else if (p < src.size() && src[p] == '+') {
      r.keep_before = true;
      ++p;
    }
    const std::string close = k == '{' ? "}}" : k == '%' ? "%}" : "#}";
    size_t q = p;
    char quote_char = 0;
    while (q + 1 < src.size()) {
      const char c = src[q];
      if (r.comment) {
        if (src.compare(q, 2, close) == 0) break;
      } else if (quote_char) {
        if (c == '\\')
          ++q;
        else if (c == quote_char)
          quote_char = 0;
      } else if (c == '\'' || c == '"') {
        quote_char = c;
      } else if (src.compare(q, 2, close) == 0) {
        break;
      }
      ++q;
    }
    if (q + 1 >= src.size()) fail("line " + std::to_string(line) + ": unclosed tag");
    size_t body_end = q;
    if (body_end > p && src[body_end - 1] == '-') {
      r.strip_after = true;
      --body_end;
    }
    r.tag.body = src.substr(p, body_end - p);
    count_lines(open, q + 2);
    i = q + 2;
    text_line = line;
    raw.push_back(std::move(r));
  }
  raw.push_back({{Tag::kText, text, text_line}});

  apply_whitespace(raw);
  std::vector<Tag> out;
  for (Raw& r : raw)
    if (!r.comment && !(r.tag.type == Tag::kText && r.tag.body.empty()))
      out.push_back(std::move(r.tag));
  return out;
}

// ---- expression tokens --------------------------------------------------------------------------

struct Tok {
  enum Type { kName, kString, kInt, kFloat, kOp, kEnd } type;
  std::string text;
  OJson value;
};

std::vector<Tok> tokenize(const std::string& s, int line) {
  std::vector<Tok> out;
  size_t i = 0;
  auto where = [&] { return "line " + std::to_string(line) + ": "; };
  while (i < s.size()) {
    const char c = s[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Tok::kName, s.substr(i, j - i), {}});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      const bool is_float =
          j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]));
      if (is_float) {
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        out.push_back({Tok::kFloat, s.substr(i, j - i), OJson(std::stod(s.substr(i, j - i)))});
      } else {
        if (j - i > 18) fail(where() + "integer literal too long");
        out.push_back({Tok::kInt, s.substr(i, j - i), OJson(std::stoll(s.substr(i, j - i)))});
      }
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] != '\\' || j + 1 >= s.size()) {
          v += s[j];
          continue;
        }
        const char e = s[++j];
        v += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      }
      if (j >= s.size()) fail(where() + "unterminated string");
      out.push_back({Tok::kString, v, OJson(v)});
      i = j + 1;
    } else {
      static const char* ops[] = {"//", "**", "==", "!=", "<=", ">=", "(", ")", "[",
                                  "]",  "{",  "}",  ".",  ",",  ":",  "|", "+", "-",
                                  "*",  "/",  "%",  "~",  "<",  ">",  "="};
      bool found = false;
      for (const char* op : ops) {
        const size_t n = std::char_traits<char>::length(op);
        if (s.compare(i, n, op) == 0) {
          out.push_back({Tok::kOp, op, {}});
          i += n;
          found = true;
          break;
        }
      }
      if (!found) fail(where() + "unexpected character '" + std::string(1, c) + "'");
    }
  }
  out.push_back({Tok::kEnd, "", {}});
  return out;
}

// ---- parsing ------------------------------------------------------------------------------------

const std::set<std::string> kFilters = {
    "length",     "count",      "trim", "upper",  "lower",   "tojson",     "string",
    "list",       "first",      "last", "join",   "default", "d",          "items",
    "selectattr", "rejectattr", "map",  "int",    "float",   "capitalize", "title",
    "replace",    "abs",        "safe", "unique", "reverse", "e",          "escape"};
const std::set<std::string> kTests = {"defined", "undefined", "none",    "string",   "number",
                                      "integer", "float",     "mapping", "iterable", "sequence",
                                      "boolean", "true",      "false",   "even",     "odd",
                                      "equalto", "eq",        "ne",      "in"};
const std::set<std::string> kFunctions = {"raise_exception", "namespace", "range", "dict"};
const std::set<std::string> kMethods = {"strip",      "lstrip",  "rstrip", "startswith", "endswith",
                                        "split",      "replace", "upper",  "lower",      "title",
                                        "capitalize", "items",   "keys",   "values",     "get"};

class Parser {
 public:
  Parser(std::vector<Tok> toks, int line) : t_(std::move(toks)), line_(line) {}

  NodePtr expression() { return conditional(); }
  bool at_end() const { return t_[p_].type == Tok::kEnd; }
  const Tok& peek() const { return t_[p_]; }
  bool is_name(const char* n) const { return t_[p_].type == Tok::kName && t_[p_].text == n; }
  bool is_op(const char* o) const { return t_[p_].type == Tok::kOp && t_[p_].text == o; }
  void expect_op(const char* o) {
    if (!is_op(o)) error(std::string("expected '") + o + "'");
    ++p_;
  }
  std::string name() {
    if (t_[p_].type != Tok::kName) error("expected a name");
    return t_[p_++].text;
  }
  void expect_end() {
    if (!at_end()) error("unexpected '" + t_[p_].text + "'");
  }
  [[noreturn]] void error(const std::string& what) const {
    fail("line " + std::to_string(line_) + ": " + what);
  }

 private:
  NodePtr make(Kind k, std::string n = {}) { return node(k, line_, std::move(n)); }
  NodePtr binary(Kind k, std::string op, NodePtr a, NodePtr b) {
    NodePtr n = make(k, std::move(op));
    n->kids.push_back(std::move(a));
    n->kids.push_back(std::move(b));
    return n;
  }
  NodePtr conditional() {
    NodePtr a = or_expr();
    if (!is_name("if")) return a;
    ++p_;
    NodePtr cond = or_expr();
    NodePtr n = make(Kind::kCond);
    n->kids.push_back(std::move(cond));
    n->kids.push_back(std::move(a));
    if (is_name("else")) {
      ++p_;
      n->kids.push_back(conditional());
    }
    return n;
  }
  NodePtr or_expr() {
    NodePtr a = and_expr();
    while (is_name("or")) {
      ++p_;
      a = binary(Kind::kOr, "or", std::move(a), and_expr());
    }
    return a;
  }
  NodePtr and_expr() {
    NodePtr a = not_expr();
    while (is_name("and")) {
      ++p_;
      a = binary(Kind::kAnd, "and", std::move(a), not_expr());
    }
    return a;
  }
  NodePtr not_expr() {
    if (!is_name("not")) return compare();
    ++p_;
    NodePtr n = make(Kind::kNot);
    n->kids.push_back(not_expr());
    return n;
  }
  NodePtr compare() {
    NodePtr a = math1();
    for (;;) {
      static const char* ops[] = {"==", "!=", "<", ">", "<=", ">="};
      std::string op;
      for (const char* o : ops)
        if (is_op(o)) op = o;
      bool negated = false;
      if (op.empty() && is_name("in")) op = "in";
      if (op.empty() && is_name("not") && t_[p_ + 1].type == Tok::kName &&
          t_[p_ + 1].text == "in") {
        op = "in";
        negated = true;
        ++p_;
      }
      if (op.empty()) return a;
      ++p_;
      a = binary(Kind::kBinary, op, std::move(a), math1());
      a->negated = negated;
    }
  }
  NodePtr math1() {
    NodePtr a = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[p_++].text;
      a = binary(Kind::kBinary, op, std::move(a), concat());
    }
    return a;
  }
  NodePtr concat() {
    NodePtr a = math2();
    while (is_op("~")) {
      ++p_;
      a = binary(Kind::kBinary, "~", std::move(a), math2());
    }
    return a;
  }
  NodePtr math2() {
    NodePtr a = unary();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[p_++].text;
      a = binary(Kind::kBinary, op, std::move(a), unary());
    }
    return a;
  }
  NodePtr unary() {
    if (is_op("-")) {
      ++p_;
      NodePtr n = make(Kind::kNeg);
      n->kids.push_back(unary());
      return n;
    }
    if (is_op("+")) ++p_;
    return filters(postfix(primary()));
  }
  // Arguments up to ')': positional, then name=value.
  void arguments(Node& n) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().type == Tok::kName && t_[p_ + 1].type == Tok::kOp && t_[p_ + 1].text == "=") {
        n.kw.push_back(name());
        ++p_;
      } else if (!n.kw.empty()) {
        error("positional argument after a keyword argument");
      }
      n.kids.push_back(expression());
      if (!is_op(")")) expect_op(",");
    }
    ++p_;
  }
  NodePtr postfix(NodePtr a) {
    for (;;) {
      if (is_op(".")) {
        ++p_;
        NodePtr n = make(Kind::kAttr, name());
        n->kids.push_back(std::move(a));
        a = std::move(n);
      } else if (is_op("[")) {
        ++p_;
        a = subscript(std::move(a));
      } else if (is_op("(")) {
        a = call(std::move(a));
      } else {
        return a;
      }
    }
  }
  NodePtr call(NodePtr callee) {
    NodePtr n = make(Kind::kCall);
    if (callee->kind == Kind::kName) {
      if (!kFunctions.count(callee->name)) error("unknown function '" + callee->name + "'");
      n->name = callee->name;
    } else if (callee->kind == Kind::kAttr) {
      if (!kMethods.count(callee->name)) error("unknown method '" + callee->name + "'");
      n->name = "." + callee->name;
      n->kids.push_back(std::move(callee->kids[0]));
    } else {
      error("only functions and methods can be called");
    }
    arguments(*n);
    return n;
  }
  NodePtr subscript(NodePtr a) {
    NodePtr parts[3];
    int n_colons = 0;
    for (;;) {
      if (is_op("]")) break;
      if (is_op(":")) {
        if (++n_colons > 2) error("bad slice");
        ++p_;
        continue;
      }
      if (parts[n_colons]) error("bad subscript");
      parts[n_colons] = expression();
    }
    ++p_;
    if (n_colons == 0) {
      if (!parts[0]) error("empty subscript");
      NodePtr n = make(Kind::kItem);
      n->kids.push_back(std::move(a));
      n->kids.push_back(std::move(parts[0]));
      return n;
    }
    NodePtr n = make(Kind::kSlice);
    n->kids.push_back(std::move(a));
    for (NodePtr& part : parts) n->kids.push_back(part ? std::move(part) : make(Kind::kLiteral));
    return n;
  }
  NodePtr filters(NodePtr a) {
    for (;;) {
      if (is_op("|")) {
        ++p_;
        NodePtr n = make(Kind::kFilter, name());
        if (!kFilters.count(n->name)) error("unknown filter '" + n->name + "'");
        n->kids.push_back(std::move(a));
        if (is_op("(")) arguments(*n);
        a = std::move(n);
      } else if (is_name("is")) {
        ++p_;
        NodePtr n = make(Kind::kTest);
        if (is_name("not")) {
          n->negated = true;
          ++p_;
        }
        n->name = peek().type == Tok::kOp && peek().text == "==" ? (++p_, "eq") : name();
        if (!kTests.count(n->name)) error("unknown test '" + n->name + "'");
        n->kids.push_back(std::move(a));
        if (is_op("(")) {
          arguments(*n);
        } else if (!at_end() && (peek().type == Tok::kString || peek().type == Tok::kInt ||
                                 peek().type == Tok::kFloat)) {
          n->kids.push_back(primary());  // `is equalto 3`
        }
        a = std::move(n);
      } else {
        return a;
      }
    }
  }
  NodePtr primary() {
    const Tok& t = t_[p_];
    if (t.type == Tok::kString || t.type == Tok::kInt || t.type == Tok::kFloat) {
      NodePtr n = make(Kind::kLiteral);
      n->literal = t.value;
      ++p_;
      // Adjacent string literals join, as in Python.
      while (n->literal.is_string() && t_[p_].type == Tok::kString)
        n->literal = n->literal.get<std::string>() + t_[p_++].text;
      return n;
    }
    if (t.type == Tok::kName) {
      ++p_;
      NodePtr n = make(Kind::kLiteral);
      if (t.text == "true" || t.text == "True")
        n->literal = true;
      else if (t.text == "false" || t.text == "False")
        n->literal = false;
      else if (t.text == "none" || t.text == "None")
        n->literal = nullptr;
      else
        n = make(Kind::kName, t.text);
      return n;
    }
    if (is_op("(")) {
      ++p_;
      NodePtr n = expression();
      expect_op(")");
      return n;
    }
    if (is_op("[")) {
      ++p_;
      NodePtr n = make(Kind::kList);
      while (!is_op("]")) {
        n->kids.push_back(expression());
        if (!is_op("]")) expect_op(",");
      }
      ++p_;
      return n;
    }
    if (is_op("{")) {
      ++p_;
      NodePtr n = make(Kind::kDict);
      while (!is_op("}")) {
        n->kids.push_back(expression());
        expect_op(":");
        n->kids.push_back(expression());
        if (!is_op("}")) expect_op(",");
      }
      ++p_;
      return n;
    }
    error(t.type == Tok::kEnd ? "unexpected end of expression" : "unexpected '" + t.text + "'");
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
  int line_;
};

// Statements: the tags in order, nested by their end tags.
class TemplateParser {
 public:
  explicit TemplateParser(std::vector<Tag> tags) : tags_(std::move(tags)) {}

  NodePtr parse() {
    NodePtr body = block({});
    if (i_ < tags_.size())
      fail("line " + std::to_string(tags_[i_].line) + ": unexpected '" + keyword_ + "'");
    return body;
  }

 private:
  // Statements until one of `ends` (left as keyword_, not consumed further).
  NodePtr block(const std::set<std::string>& ends) {
    NodePtr body = node(Kind::kBody, i_ < tags_.size() ? tags_[i_].line : 0);
    while (i_ < tags_.size()) {
      const Tag& tag = tags_[i_];
      if (tag.type == Tag::kText) {
        body->kids.push_back(node(Kind::kText, tag.line, tag.body));
        ++i_;
        continue;
      }
      Parser p(tokenize(tag.body, tag.line), tag.line);
      if (tag.type == Tag::kExpr) {
        NodePtr out = node(Kind::kOutput, tag.line);
        out->kids.push_back(p.expression());
        p.expect_end();
        body->kids.push_back(std::move(out));
        ++i_;
        continue;
      }
      if (p.at_end()) p.error("empty tag");
      keyword_ = p.peek().text;
      if (ends.count(keyword_)) return body;
      ++i_;
      p.name();
      body->kids.push_back(statement(p, tag.line));
    }
    if (!ends.empty()) fail("unexpected end of template: a block is not closed");
    return body;
  }
  NodePtr statement(Parser& p, int line) {
    const std::string kw = keyword_;
    if (kw == "if") return parse_if(p, line);
    if (kw == "for") return parse_for(p, line);
    if (kw == "set") return parse_set(p, line);
    if (kw == "break" || kw == "continue") {
      p.expect_end();
      return node(kw == "break" ? Kind::kBreak : Kind::kContinue, line);
    }
    if (kw == "endif" || kw == "endfor" || kw == "elif" || kw == "else")
      p.error("unexpected '" + kw + "'");
    p.error("unsupported tag '" + kw + "'");
  }
  // Consumes the tag that ended a block; returns its parser positioned after the keyword.
  Parser end_tag() {
    const Tag& tag = tags_[i_++];
    Parser p(tokenize(tag.body, tag.line), tag.line);
    p.name();
    return p;
  }
  NodePtr parse_if(Parser& p, int line) {
    NodePtr n = node(Kind::kIf, line);
    n->kids.push_back(p.expression());
    p.expect_end();
    for (;;) {
      n->kids.push_back(block({"elif", "else", "endif"}));
      const std::string kw = keyword_;
      Parser q = end_tag();
      if (kw == "endif") {
        q.expect_end();
        return n;
      }
      if (kw == "else") {
        q.expect_end();
        n->has_else = true;
        n->kids.push_back(block({"endif"}));
        end_tag().expect_end();
        return n;
      }
      n->kids.push_back(q.expression());
      q.expect_end();
    }
  }
  // kids: [iterable, filter (or a literal true), body, else body?]
  NodePtr parse_for(Parser& p, int line) {
    NodePtr n = node(Kind::kFor, line);
    n->targets.push_back(p.name());
    while (p.is_op(",")) {
      p.expect_op(",");
      n->targets.push_back(p.name());
    }
    if (!p.is_name("in")) p.error("expected 'in'");
    p.name();
    // The iterable stops before a filter's `if` (no conditional expression here).
    NodePtr iterable = p.expression();
    if (iterable->kind == Kind::kCond && iterable->kids.size() == 2) {
      n->kids.push_back(std::move(iterable->kids[1]));
      n->kids.push_back(std::move(iterable->kids[0]));
    } else {
      n->kids.push_back(std::move(iterable));
      NodePtr always = node(Kind::kLiteral, line);
      always->literal = true;
      n->kids.push_back(std::move(always));
    }
    if (p.is_name("recursive")) p.error("recursive loops are not supported");
    p.expect_end();
    n->kids.push_back(block({"else", "endfor"}));
    if (keyword_ == "else") {
      end_tag().expect_end();
      n->has_else = true;
      n->kids.push_back(block({"endfor"}));
    }
    end_tag().expect_end();
    return n;
  }
  NodePtr parse_set(Parser& p, int line) {
    NodePtr n = node(Kind::kSet, line);
    n->targets.push_back(p.name());
    if (p.is_op(".")) {
      p.expect_op(".");
      n->targets.push_back(p.name());
    }
    if (!p.is_op("=")) p.error("block set ({% set x %}...{% endset %}) is not supported");
    p.expect_op("=");
    n->kids.push_back(p.expression());
    p.expect_end();
    return n;
  }

  std::vector<Tag> tags_;
  size_t i_ = 0;
  std::string keyword_;
};

NodePtr parse(const std::string& source) {
  if (source.size() > (1u << 20)) fail("longer than 1 MiB");
  return TemplateParser(lex(source)).parse();
}

}  // namespace sy::jinja
