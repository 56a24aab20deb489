// Chat templates (see chat_template.h): the evaluator over JSON values, with Python's semantics
// where templates rely on them (truthiness, str(), ==, //, %, slices), of the tree that
// chat_template_parse.cc builds.
#include "runtime/formats/chat_template.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <vector>

#include "runtime/formats/chat_template_tree.h"
#include "runtime/formats/gguf.h"

namespace sy {
namespace jinja {

// ---- values -------------------------------------------------------------------------------------

struct Value {
  OJson j;                    // none, bool, number, string, list, dict
  bool undefined = false;     // a missing name, key or attribute
  std::shared_ptr<OJson> ns;  // a namespace(): a dict that `set ns.x` changes in place

  static Value undef() {
    Value v;
    v.undefined = true;
    return v;
  }
  static Value of(OJson j) {
    Value v;
    v.j = std::move(j);
    return v;
  }
  const OJson& json() const { return ns ? *ns : j; }
};

bool truthy(const Value& v) {
  if (v.undefined) return false;
  const OJson& j = v.json();
  if (j.is_null()) return false;
  if (j.is_boolean()) return j.get<bool>();
  if (j.is_number_integer()) return j.get<int64_t>() != 0;
  if (j.is_number()) return j.get<double>() != 0.0;
  if (j.is_string()) return !j.get_ref<const std::string&>().empty();
  return !j.empty();
}

// Python's repr of a float: the shortest digits that read back the same, with ".0" if whole.
std::string float_text(double x) {
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  if (std::isnan(x)) return "nan";
  char buf[40];
  for (int p = 1; p <= 17; ++p) {
    std::snprintf(buf, sizeof buf, "%.*g", p, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s = buf;
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string repr(const OJson& j);

// What {{ }} prints: Python's str().
std::string str(const Value& v) {
  if (v.undefined) return "";
  const OJson& j = v.json();
  if (j.is_string()) return j.get<std::string>();
  return repr(j);
}

std::string quote(const std::string& s) {
  const bool single = s.find('\'') == std::string::npos || s.find('"') != std::string::npos;
  const char q = single ? '\'' : '"';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + q;
}

std::string repr(const OJson& j) {
  if (j.is_null()) return "None";
  if (j.is_boolean()) return j.get<bool>() ? "True" : "False";
  if (j.is_number_integer()) return std::to_string(j.get<int64_t>());
  if (j.is_number()) return float_text(j.get<double>());
  if (j.is_string()) return quote(j.get<std::string>());
  std::string out = j.is_array() ? "[" : "{";
  bool first = true;
  if (j.is_array()) {
    for (const OJson& e : j) {
      out += (first ? "" : ", ") + repr(e);
      first = false;
    }
    return out + "]";
  }
  for (const auto& [k, e] : j.items()) {
    out += (first ? "" : ", ") + quote(k) + ": " + repr(e);
    first = false;
  }
  return out + "}";
}

// json.dumps as Hugging Face's tojson calls it (ensure_ascii=False; ", " and ": ").
std::string to_json(const OJson& j, int indent, int depth) {
  if (!j.is_array() && !j.is_object())
    return j.dump(-1, ' ', false, OJson::error_handler_t::replace);
  if (j.empty()) return j.is_array() ? "[]" : "{}";
  const std::string pad =
      indent > 0 ? "\n" + std::string(static_cast<size_t>(indent * (depth + 1)), ' ') : "";
  const std::string end =
      indent > 0 ? "\n" + std::string(static_cast<size_t>(indent * depth), ' ') : "";
  const std::string sep = indent > 0 ? "," : ", ";
  std::string out = j.is_array() ? "[" : "{";
  bool first = true;
  if (j.is_array()) {
    for (const OJson& e : j) {
      out += (first ? "" : sep) + pad + to_json(e, indent, depth + 1);
      first = false;
    }
    return out + end + "]";
  }
  for (const auto& [k, e] : j.items()) {
    out += (first ? "" : sep) + pad +
           OJson(k).dump(-1, ' ', false, OJson::error_handler_t::replace) + ": " +
           to_json(e, indent, depth + 1);
    first = false;
  }
  return out + end + "}";
}

bool equal(const Value& a, const Value& b) {
  if (a.undefined || b.undefined) return a.undefined && b.undefined;
  return a.json() == b.json();
}

// ---- evaluation ---------------------------------------------------------------------------------

struct LoopControl {
  enum { kNone, kBreak, kContinue } state = kNone;
};

class Renderer {
 public:
  explicit Renderer(const OJson& context) {
    scopes_.emplace_back();
    for (const auto& [k, v] : context.items()) scopes_.back()[k] = Value::of(v);
  }
  std::string out;

  void run(const Node& body, LoopControl& lc) {
    for (const NodePtr& s : body.kids) {
      if (lc.state != LoopControl::kNone) return;
      statement(*s, lc);
      if (out.size() > (64u << 20)) fail("the rendered text exceeds 64 MiB");
    }
  }

 private:
  [[noreturn]] void error(const Node& n, const std::string& what) const {
    fail("line " + std::to_string(n.line) + ": " + what);
  }
  void statement(const Node& s, LoopControl& lc) {
    switch (s.kind) {
      case Kind::kText:
        out += s.name;
        return;
      case Kind::kOutput:
        out += str(eval(*s.kids[0]));
        return;
      case Kind::kIf:
        for (size_t k = 0; k + 1 < s.kids.size(); k += 2)
          if (truthy(eval(*s.kids[k]))) return run(*s.kids[k + 1], lc);
        if (s.has_else) run(*s.kids.back(), lc);
        return;
      case Kind::kFor:
        return for_loop(s, lc);
      case Kind::kSet:
        return assign(s);
      case Kind::kBreak:
        lc.state = LoopControl::kBreak;
        return;
      case Kind::kContinue:
        lc.state = LoopControl::kContinue;
        return;
      default:
        error(s, "not a statement");
    }
  }
  void assign(const Node& s) {
    Value v = eval(*s.kids[0]);
    if (s.targets.size() == 1) {
      scopes_.back()[s.targets[0]] = std::move(v);
      return;
    }
    Value ns = lookup(s.targets[0]);
    if (!ns.ns) error(s, "'" + s.targets[0] + "' is not a namespace");
    (*ns.ns)[s.targets[1]] = v.json();
  }
  std::vector<OJson> items_of(const Node& n, const Value& v) {
    if (v.undefined) error(n, "cannot loop over an undefined value");
    const OJson& j = v.json();
    std::vector<OJson> items;
    if (j.is_array()) {
      items.assign(j.begin(), j.end());
    } else if (j.is_object()) {
      for (const auto& [k, e] : j.items()) items.emplace_back(k);
    } else if (j.is_string()) {
      for (char c : j.get<std::string>()) items.emplace_back(std::string(1, c));
    } else {
      error(n, "cannot loop over " + repr(j));
    }
    return items;
  }
  void bind(const Node& s, const OJson& item) {
    if (s.targets.size() == 1) {
      scopes_.back()[s.targets[0]] = Value::of(item);
      return;
    }
    if (!item.is_array() || item.size() != s.targets.size())
      error(s,
            "cannot unpack " + repr(item) + " into " + std::to_string(s.targets.size()) + " names");
    for (size_t k = 0; k < s.targets.size(); ++k) scopes_.back()[s.targets[k]] = Value::of(item[k]);
  }
  void for_loop(const Node& s, LoopControl& outer) {
    const std::vector<OJson> all = items_of(s, eval(*s.kids[0]));
    scopes_.emplace_back();
    std::vector<OJson> items;
    for (const OJson& item : all) {
      bind(s, item);
      if (truthy(eval(*s.kids[1]))) items.push_back(item);
    }
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      bind(s, items[static_cast<size_t>(k)]);
      scopes_.back()["loop"] = Value::of(OJson{{"index0", k},
                                               {"index", k + 1},
                                               {"revindex", n - k},
                                               {"revindex0", n - k - 1},
                                               {"first", k == 0},
                                               {"last", k == n - 1},
                                               {"length", n}});
      LoopControl lc;
      run(*s.kids[2], lc);
      if (lc.state == LoopControl::kBreak) break;
    }
    if (n == 0 && s.has_else) run(*s.kids[3], outer);
    scopes_.pop_back();
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      const auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value::undef();
  }
  Value eval(const Node& n);
  Value binary(const Node& n);
  Value call(const Node& n);
  Value method(const Node& n, const Value& self, const std::vector<Value>& args);
  Value slice(const Node& n);
  Value filter(const Node& n);
  Value text_filter(const Node& n, const Value& v, const std::vector<Value>& args);
  Value list_filter(const Node& n, const Value& v, const std::vector<Value>& args,
                    std::map<std::string, Value>& kwargs);
  bool test(const Node& n);
  Value item(const Node& n, const Value& obj, const Value& key);

  std::vector<std::map<std::string, Value>> scopes_;
};

Value Renderer::item(const Node& n, const Value& obj, const Value& key) {
  if (obj.undefined) error(n, "cannot index an undefined value");
  const OJson& j = obj.json();
  const OJson& k = key.json();
  if (j.is_object() && k.is_string()) {
    const auto f = j.find(k.get<std::string>());
    return f == j.end() ? Value::undef() : Value::of(*f);
  }
  if ((j.is_array() || j.is_string()) && k.is_number_integer()) {
    const int64_t size = j.is_array()
                             ? static_cast<int64_t>(j.size())
                             : static_cast<int64_t>(j.get_ref<const std::string&>().size());
    int64_t i = k.get<int64_t>();
    if (i < 0) i += size;
    if (i < 0 || i >= size) return Value::undef();
    if (j.is_array()) return Value::of(j[static_cast<size_t>(i)]);
    return Value::of(std::string(1, j.get_ref<const std::string&>()[static_cast<size_t>(i)]));
  }
  return Value::undef();
}

Value Renderer::slice(const Node& n) {
  const Value obj = eval(*n.kids[0]);
  const OJson& j = obj.json();
  if (!j.is_array() && !j.is_string()) error(n, "cannot slice " + repr(j));
  const int64_t size = j.is_array() ? static_cast<int64_t>(j.size())
                                    : static_cast<int64_t>(j.get_ref<const std::string&>().size());
  auto bound = [&](const Node& b, int64_t fallback) {
    const Value v = eval(b);
    if (v.json().is_null()) return fallback;
    if (!v.json().is_number_integer()) error(n, "slice bounds must be integers");
    int64_t x = v.json().get<int64_t>();
    if (x < 0) x += size;
    return std::clamp<int64_t>(x, 0, size);
  };
  const Value step = eval(*n.kids[3]);
  if (!step.json().is_null() && step.json() != 1) error(n, "slice steps are not supported");
  const int64_t lo = bound(*n.kids[1], 0), hi = std::max(lo, bound(*n.kids[2], size));
  if (j.is_string())
    return Value::of(
        j.get<std::string>().substr(static_cast<size_t>(lo), static_cast<size_t>(hi - lo)));
  return Value::of(OJson(j.begin() + lo, j.begin() + hi));
}

Value Renderer::eval(const Node& n) {
  switch (n.kind) {
    case Kind::kLiteral:
      return Value::of(n.literal);
    case Kind::kName:
      return lookup(n.name);
    case Kind::kAttr: {
      const Value obj = eval(*n.kids[0]);
      if (obj.undefined) error(n, "cannot read '" + n.name + "' of an undefined value");
      return item(n, obj, Value::of(n.name));
    }
    case Kind::kItem:
      return item(n, eval(*n.kids[0]), eval(*n.kids[1]));
    case Kind::kSlice:
      return slice(n);
    case Kind::kCall:
      return call(n);
    case Kind::kFilter:
      return filter(n);
    case Kind::kTest:
      return Value::of(test(n) != n.negated);
    case Kind::kNot:
      return Value::of(!truthy(eval(*n.kids[0])));
    case Kind::kNeg: {
      const Value v = eval(*n.kids[0]);
      if (!v.json().is_number()) error(n, "cannot negate " + str(v));
      if (v.json().is_number_integer()) return Value::of(-v.json().get<int64_t>());
      return Value::of(-v.json().get<double>());
    }
    case Kind::kAnd: {
      Value a = eval(*n.kids[0]);
      return truthy(a) ? eval(*n.kids[1]) : a;
    }
    case Kind::kOr: {
      Value a = eval(*n.kids[0]);
      return truthy(a) ? a : eval(*n.kids[1]);
    }
    case Kind::kCond:
      if (truthy(eval(*n.kids[0]))) return eval(*n.kids[1]);
      return n.kids.size() > 2 ? eval(*n.kids[2]) : Value::undef();
    case Kind::kList: {
      OJson list = OJson::array();
      for (const NodePtr& k : n.kids) list.push_back(eval(*k).json());
      return Value::of(std::move(list));
    }
    case Kind::kDict: {
      OJson dict = OJson::object();
      for (size_t k = 0; k + 1 < n.kids.size(); k += 2) {
        const Value key = eval(*n.kids[k]);
        if (!key.json().is_string()) error(n, "dict keys must be strings");
        dict[key.json().get<std::string>()] = eval(*n.kids[k + 1]).json();
      }
      return Value::of(std::move(dict));
    }
    case Kind::kBinary:
      return binary(n);
    default:
      break;
  }
  error(n, "not an expression");
}

Value Renderer::binary(const Node& n) {
  const Value a = eval(*n.kids[0]);
  const Value b = eval(*n.kids[1]);
  const std::string& op = n.name;
  if (op == "==") return Value::of(equal(a, b));
  if (op == "!=") return Value::of(!equal(a, b));
  if (op == "~") return Value::of(str(a) + str(b));
  if (a.undefined || b.undefined) error(n, "'" + op + "' on an undefined value");
  const OJson& x = a.json();
  const OJson& y = b.json();
  if (op == "in") {
    bool found = false;
    if (y.is_string() && x.is_string()) {
      found = y.get_ref<const std::string&>().find(x.get_ref<const std::string&>()) !=
              std::string::npos;
    } else if (y.is_array()) {
      found = std::find(y.begin(), y.end(), x) != y.end();
    } else if (y.is_object() && x.is_string()) {
      found = y.contains(x.get<std::string>());
    } else {
      error(n, "'in' needs a string, list or dict on its right");
    }
    return Value::of(found != n.negated);
  }
  if (op == "<" || op == ">" || op == "<=" || op == ">=") {
    if (!((x.is_number() && y.is_number()) || (x.is_string() && y.is_string())))
      error(n, "cannot compare " + repr(x) + " and " + repr(y));
    const bool lt = x < y, gt = y < x;
    return Value::of(op == "<" ? lt : op == ">" ? gt : op == "<=" ? !gt : !lt);
  }
  if (op == "+" && x.is_string() && y.is_string())
    return Value::of(x.get<std::string>() + y.get<std::string>());
  if (op == "+" && x.is_array() && y.is_array()) {
    OJson z = x;
    z.insert(z.end(), y.begin(), y.end());
    return Value::of(std::move(z));
  }
  if (op == "*" && x.is_string() && y.is_number_integer()) {
    std::string z;
    for (int64_t k = 0; k < std::min<int64_t>(y.get<int64_t>(), 1 << 20); ++k)
      z += x.get<std::string>();
    return Value::of(z);
  }
  if (!x.is_number() || !y.is_number())
    error(n, "unsupported operands for '" + op + "': " + repr(x) + " and " + repr(y));
  const bool ints = x.is_number_integer() && y.is_number_integer();
  if (ints && op != "/") {
    const int64_t i = x.get<int64_t>(), j = y.get<int64_t>();
    if ((op == "%" || op == "//") && j == 0) error(n, "division by zero");
    if (op == "+") return Value::of(i + j);
    if (op == "-") return Value::of(i - j);
    if (op == "*") return Value::of(i * j);
    // Python's floor division and modulo (the sign of the divisor).
    const int64_t q = i / j - ((i % j != 0) && ((i < 0) != (j < 0)) ? 1 : 0);
    return Value::of(op == "//" ? q : i - q * j);
  }
  const double i = x.get<double>(), j = y.get<double>();
  if ((op == "/" || op == "%" || op == "//") && j == 0) error(n, "division by zero");
  if (op == "+") return Value::of(i + j);
  if (op == "-") return Value::of(i - j);
  if (op == "*") return Value::of(i * j);
  if (op == "/") return Value::of(i / j);
  if (op == "//") return Value::of(std::floor(i / j));
  return Value::of(i - std::floor(i / j) * j);
}

Value Renderer::call(const Node& n) {
  const bool is_method = n.name.starts_with(".");
  std::vector<Value> args;
  const size_t first = is_method ? 1 : 0;
  const size_t n_positional = n.kids.size() - first - n.kw.size();
  std::map<std::string, Value> kwargs;
  for (size_t k = first; k < n.kids.size(); ++k) {
    Value v = eval(*n.kids[k]);
    if (k - first < n_positional)
      args.push_back(std::move(v));
    else
      kwargs[n.kw[k - first - n_positional]] = std::move(v);
  }
  if (is_method) return method(n, eval(*n.kids[0]), args);
  if (n.name == "raise_exception")
    throw TemplateError(args.empty() ? "raise_exception" : str(args[0]));
  if (n.name == "namespace" || n.name == "dict") {
    Value v;
    v.ns = std::make_shared<OJson>(OJson::object());
    for (const auto& [k, e] : kwargs) (*v.ns)[k] = e.json();
    if (n.name == "dict") return Value::of(*v.ns);
    return v;
  }
  // range(stop) / range(start, stop[, step])
  int64_t r[3] = {0, 0, 1};
  if (args.empty() || args.size() > 3) error(n, "range takes 1 to 3 arguments");
  for (const Value& a : args)
    if (!a.json().is_number_integer()) error(n, "range takes integers");
  if (args.size() == 1) r[1] = args[0].json().get<int64_t>();
  for (size_t k = 0; args.size() > 1 && k < args.size(); ++k) r[k] = args[k].json().get<int64_t>();
  if (r[2] == 0) error(n, "range step must not be 0");
  OJson list = OJson::array();
  for (int64_t i = r[0]; (r[2] > 0 ? i < r[1] : i > r[1]) && list.size() < (1u << 20); i += r[2])
    list.push_back(i);
  return Value::of(std::move(list));
}

std::string strip(std::string s, const std::string& chars, bool left, bool right) {
  const size_t b = left ? s.find_first_not_of(chars) : 0;
  if (b == std::string::npos) return "";
  const size_t e = right ? s.find_last_not_of(chars) : s.size() - 1;
  return s.substr(b, e - b + 1);
}

Value Renderer::method(const Node& n, const Value& self, const std::vector<Value>& args) {
  const std::string m = n.name.substr(1);
  const OJson& j = self.json();
  auto arg = [&](size_t k) -> const OJson& {
    if (k >= args.size() || !args[k].json().is_string()) error(n, m + " needs a string argument");
    return args[k].json();
  };
  if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    const std::string ws = " \t\n\r\f\v";
    const std::string chars =
        args.empty() || args[0].json().is_null() ? ws : arg(0).get<std::string>();
    if (m == "strip") return Value::of(strip(s, chars, true, true));
    if (m == "lstrip") return Value::of(strip(s, chars, true, false));
    if (m == "rstrip") return Value::of(strip(s, chars, false, true));
    if (m == "startswith") return Value::of(s.starts_with(arg(0).get<std::string>()));
    if (m == "endswith") return Value::of(s.ends_with(arg(0).get<std::string>()));
    if (m == "upper" || m == "lower") {
      std::string t = s;
      for (char& c : t)
        c = static_cast<char>(m == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                           : std::tolower(static_cast<unsigned char>(c)));
      return Value::of(t);
    }
    if (m == "replace") {
      const std::string from = arg(0).get<std::string>(), to = arg(1).get<std::string>();
      if (from.empty()) error(n, "replace of an empty string");
      std::string t = s;
      for (size_t p = t.find(from); p != std::string::npos; p = t.find(from, p + to.size()))
        t.replace(p, from.size(), to);
      return Value::of(t);
    }
    if (m == "split") {
      OJson parts = OJson::array();
      if (args.empty() || args[0].json().is_null()) {
        std::istringstream in(s);
        for (std::string w; in >> w;) parts.push_back(w);
        return Value::of(parts);
      }
      const std::string sep = arg(0).get<std::string>();
      if (sep.empty()) error(n, "split with an empty separator");
      size_t p = 0;
      for (size_t q; (q = s.find(sep, p)) != std::string::npos; p = q + sep.size())
        parts.push_back(s.substr(p, q - p));
      parts.push_back(s.substr(p));
      return Value::of(parts);
    }
  }
  if (j.is_object()) {
    if (m == "items" || m == "keys" || m == "values") {
      OJson out = OJson::array();
      for (const auto& [k, e] : j.items())
        out.push_back(m == "items" ? OJson::array({k, e}) : m == "keys" ? OJson(k) : e);
      return Value::of(std::move(out));
    }
    if (m == "get") {
      const auto f = j.find(arg(0).get<std::string>());
      if (f != j.end()) return Value::of(*f);
      return args.size() > 1 ? args[1] : Value::of(nullptr);
    }
  }
  error(n, "no method '" + m + "' on " +
               (self.undefined ? std::string("an undefined value") : repr(j)));
}

// Filters of strings and numbers (upper, trim, int, ...); undefined when `f` is none of them.
Value Renderer::text_filter(const Node& n, const Value& v, const std::vector<Value>& args) {
  const std::string& f = n.name;
  const OJson& j = v.json();
  if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    if (f == "trim") return Value::of(strip(s, " \t\n\r\f\v", true, true));
    if (f == "upper" || f == "lower" || f == "capitalize" || f == "title") {
      std::string t = s;
      bool start = true;
      for (char& c : t) {
        const auto u = static_cast<unsigned char>(c);
        const bool up = f == "upper" || ((f == "capitalize" || f == "title") && start);
        c = static_cast<char>(up ? std::toupper(u) : std::tolower(u));
        start = f == "title" ? !std::isalpha(u) : false;
      }
      return Value::of(t);
    }
    if (f == "replace") return method(*node(Kind::kCall, n.line, ".replace"), v, args);
    if (f == "int") return Value::of(static_cast<int64_t>(std::strtoll(s.c_str(), nullptr, 10)));
    if (f == "float") return Value::of(std::strtod(s.c_str(), nullptr));
  }
  if (j.is_number()) {
    if (f == "int")
      return Value::of(j.is_number_integer() ? j.get<int64_t>()
                                             : static_cast<int64_t>(j.get<double>()));
    if (f == "float") return Value::of(j.get<double>());
    if (f == "abs")
      return j.is_number_integer() ? Value::of(std::llabs(j.get<int64_t>()))
                                   : Value::of(std::fabs(j.get<double>()));
  }
  return Value::undef();
}

// selectattr / rejectattr's test of one item's attribute `a`.
bool attr_test(const Node& n, const Value& a, const std::vector<Value>& args) {
  if (args.size() == 1) return truthy(a);
  const std::string t = str(args[1]);
  if (t == "equalto" || t == "eq" || t == "==") return args.size() > 2 && equal(a, args[2]);
  if (t == "ne" || t == "!=") return args.size() > 2 && !equal(a, args[2]);
  if (t == "defined") return !a.undefined;
  if (t == "undefined") return a.undefined;
  if (t == "none") return !a.undefined && a.json().is_null();
  fail("line " + std::to_string(n.line) + ": " + n.name + ": unsupported test '" + t + "'");
}

// Filters of lists, dicts (their keys) and strings (their characters); undefined when `f` is
// none of them.
Value Renderer::list_filter(const Node& n, const Value& v, const std::vector<Value>& args,
                            std::map<std::string, Value>& kwargs) {
  const std::string& f = n.name;
  std::vector<OJson> xs = items_of(n, v);
  if (f == "list") return Value::of(OJson(xs));
  if (f == "first") return xs.empty() ? Value::undef() : Value::of(xs.front());
  if (f == "last") return xs.empty() ? Value::undef() : Value::of(xs.back());
  if (f == "reverse") {
    std::reverse(xs.begin(), xs.end());
    return Value::of(OJson(xs));
  }
  if (f == "join") {
    std::string s;
    const std::string sep = args.empty() ? "" : str(args[0]);
    for (size_t k = 0; k < xs.size(); ++k) s += (k ? sep : "") + str(Value::of(xs[k]));
    return Value::of(s);
  }
  OJson out = OJson::array();
  if (f == "unique") {
    for (const OJson& x : xs)
      if (std::find(out.begin(), out.end(), x) == out.end()) out.push_back(x);
    return Value::of(out);
  }
  if (f == "map") {
    if (!kwargs.count("attribute")) error(n, "map needs attribute=");
    for (const OJson& x : xs) out.push_back(item(n, Value::of(x), kwargs["attribute"]).json());
    return Value::of(out);
  }
  if (f == "selectattr" || f == "rejectattr") {
    if (args.empty() || !args[0].json().is_string()) error(n, f + " needs an attribute name");
    for (const OJson& x : xs)
      if (attr_test(n, item(n, Value::of(x), args[0]), args) == (f == "selectattr"))
        out.push_back(x);
    return Value::of(out);
  }
  return Value::undef();
}

Value Renderer::filter(const Node& n) {
  const Value v = eval(*n.kids[0]);
  std::vector<Value> args;
  std::map<std::string, Value> kwargs;
  const size_t n_positional = n.kids.size() - 1 - n.kw.size();
  for (size_t k = 1; k < n.kids.size(); ++k) {
    Value a = eval(*n.kids[k]);
    if (k - 1 < n_positional)
      args.push_back(std::move(a));
    else
      kwargs[n.kw[k - 1 - n_positional]] = std::move(a);
  }
  const std::string& f = n.name;
  if (f == "default" || f == "d") {
    const bool boolean =
        args.size() > 1 ? truthy(args[1]) : kwargs.count("boolean") && truthy(kwargs["boolean"]);
    if (v.undefined || (boolean && !truthy(v))) return args.empty() ? Value::of("") : args[0];
    return v;
  }
  if (v.undefined) error(n, "filter '" + f + "' on an undefined value");
  const OJson& j = v.json();
  if (f == "safe" || f == "e" || f == "escape") return v;  // no autoescape in chat templates
  if (f == "string") return Value::of(str(v));
  if (f == "tojson") {
    const int indent = kwargs.count("indent")
                           ? static_cast<int>(kwargs["indent"].json().get<int64_t>())
                       : args.empty() ? 0
                                      : static_cast<int>(args[0].json().get<int64_t>());
    return Value::of(to_json(j, std::clamp(indent, 0, 16), 0));
  }
  if (f == "length" || f == "count") {
    if (j.is_string())
      return Value::of(static_cast<int64_t>(j.get_ref<const std::string&>().size()));
    if (j.is_array() || j.is_object()) return Value::of(static_cast<int64_t>(j.size()));
    error(n, "length of " + repr(j));
  }
  if (f == "items" && j.is_object()) return method(*node(Kind::kCall, n.line, ".items"), v, {});
  if (Value t = text_filter(n, v, args); !t.undefined) return t;
  if (j.is_array() || j.is_object() || j.is_string())
    if (Value l = list_filter(n, v, args, kwargs); !l.undefined || f == "first" || f == "last")
      return l;
  error(n, "filter '" + f + "' on " + repr(j));
}

bool Renderer::test(const Node& n) {
  const Value v = eval(*n.kids[0]);
  const std::string& t = n.name;
  if (t == "defined") return !v.undefined;
  if (t == "undefined") return v.undefined;
  const OJson& j = v.json();
  if (t == "none") return !v.undefined && j.is_null();
  if (t == "string") return !v.undefined && j.is_string();
  if (t == "number") return !v.undefined && j.is_number();
  if (t == "integer") return !v.undefined && j.is_number_integer();
  if (t == "float") return !v.undefined && j.is_number_float();
  if (t == "boolean") return !v.undefined && j.is_boolean();
  if (t == "true") return !v.undefined && j.is_boolean() && j.get<bool>();
  if (t == "false") return !v.undefined && j.is_boolean() && !j.get<bool>();
  if (t == "mapping") return !v.undefined && j.is_object();
  if (t == "iterable") return !v.undefined && (j.is_array() || j.is_object() || j.is_string());
  if (t == "sequence") return !v.undefined && (j.is_array() || j.is_string() || j.is_object());
  if (t == "even" || t == "odd") {
    if (!j.is_number_integer()) error(n, "'" + t + "' of " + str(v));
    return (j.get<int64_t>() % 2 == 0) == (t == "even");
  }
  if (n.kids.size() < 2) error(n, "test '" + t + "' needs an argument");
  const Value other = eval(*n.kids[1]);
  if (t == "equalto" || t == "eq") return equal(v, other);
  if (t == "ne") return !equal(v, other);
  // in
  const OJson& y = other.json();
  if (y.is_array()) return std::find(y.begin(), y.end(), j) != y.end();
  if (y.is_string() && j.is_string())
    return y.get<std::string>().find(j.get<std::string>()) != std::string::npos;
  if (y.is_object() && j.is_string()) return y.contains(j.get<std::string>());
  error(n, "'in' test on " + repr(y));
}

}  // namespace jinja

// ---- ChatTemplate -------------------------------------------------------------------------------

ChatTemplate::ChatTemplate(const std::string& source) : root_(jinja::parse(source)) {}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const nlohmann::json& context) const {
  jinja::Renderer r(jinja::OJson::parse(context.dump()));
  jinja::LoopControl lc;
  r.run(*root_, lc);
  return std::move(r.out);
}

const std::string& ChatTemplate::mixtral_instruct() {
  static const std::string text = R"jinja({%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %})jinja";
  return text;
}

std::string ChatTemplate::find(const std::string& model_dir) {
  if (is_gguf_path(model_dir)) {
    const std::unique_ptr<GgufFile> file = GgufFile::open(model_dir);
    return file->find("tokenizer.chat_template") ? file->string("tokenizer.chat_template") : "";
  }
  const std::filesystem::path path = std::filesystem::path(model_dir) / "tokenizer_config.json";
  std::ifstream in(path);
  if (!in) return "";
  const nlohmann::json config = nlohmann::json::parse(in, nullptr, false);
  SY_CHECK(!config.is_discarded() && config.is_object(), path.string(), " is not a JSON object");
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  SY_CHECK(it->is_array(), path.string(), ": chat_template must be a string or a list");
  for (const auto& entry : *it)
    if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
        entry["template"].is_string())
      return entry["template"].get<std::string>();
  SY_FAIL(path.string(), ": chat_template lists no template named \"default\"");
}

}  // namespace sy
