// Chat templates: every golden render recorded with jinja2 as Hugging Face configures it
// (tests/reference/make_chat_template_fixtures.py) — the two Mixtral-Instruct templates, Zephyr's
// (trim_blocks' newlines), and one that exercises the supported Jinja — rendered the same, byte
// for byte, raise_exception's messages included; templates the renderer cannot run fail when
// parsed, naming the line.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "runtime/formats/chat_template.h"

namespace sy {
namespace {

const std::string kDir = std::string(SY_FIXTURES_DIR) + "/chat_templates";

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(ChatTemplate, MatchesJinja2OnEveryGoldenCase) {
  const nlohmann::json golden = nlohmann::json::parse(read(kDir + "/golden.json"));
  ASSERT_GE(golden["cases"].size(), 50u);
  int n_rendered = 0, n_raised = 0;
  for (const auto& c : golden["cases"]) {
    const std::string name = c["template"];
    const ChatTemplate t(read(kDir + "/" + name));
    nlohmann::json context = golden["special_tokens"];
    context["messages"] = c["messages"];
    context["add_generation_prompt"] = c["add_generation_prompt"];
    const std::string what = name + " on " + c["messages"].dump() +
                             (c["add_generation_prompt"].get<bool>() ? " +gen" : "");
    if (c.contains("rendered")) {
      std::string got;
      EXPECT_NO_THROW(got = t.render(context)) << what;
      EXPECT_EQ(got, c["rendered"].get<std::string>()) << what;
      ++n_rendered;
    } else {
      try {
        t.render(context);
        ADD_FAILURE() << what << ": rendered, jinja2 raised " << c["error"];
      } catch (const TemplateError& e) {
        EXPECT_EQ(e.message(), c["error"].get<std::string>()) << what;
      }
      ++n_raised;
    }
  }
  EXPECT_GT(n_rendered, 30);
  EXPECT_GT(n_raised, 5) << "role-alternation errors and unsupported roles";
}

TEST(ChatTemplate, MixtralInstructExactly) {
  const ChatTemplate t(read(kDir + "/mixtral_instruct_v0.1.jinja"));
  const nlohmann::json context = {{"bos_token", "<s>"},
                                  {"eos_token", "</s>"},
                                  {"messages",
                                   {{{"role", "user"}, {"content", "Hi"}},
                                    {{"role", "assistant"}, {"content", "Hello"}},
                                    {{"role", "user"}, {"content", "Bye"}}}}};
  EXPECT_EQ(t.render(context), "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]")
      << "BOS once, EOS after each assistant turn";
}

std::string parse_error(const std::string& source) {
  try {
    ChatTemplate t(source);
  } catch (const TemplateError& e) {
    return e.message();
  }
  return "";
}

TEST(ChatTemplate, WhatItCannotRunFailsAtParse) {
  EXPECT_EQ(parse_error("{{ x | wordwrap }}"), "chat template: line 1: unknown filter 'wordwrap'");
  EXPECT_EQ(parse_error("a\n{% if x %}b"),
            "chat template: unexpected end of template: a block is not closed");
  EXPECT_EQ(parse_error("{% macro m() %}{% endmacro %}"),
            "chat template: line 1: unsupported tag 'macro'");
  EXPECT_EQ(parse_error("{{ x"), "chat template: line 1: unclosed tag");
  EXPECT_EQ(parse_error("\n\n{{ x + }}"), "chat template: line 3: unexpected end of expression");
  EXPECT_EQ(parse_error("{{ strftime_now('%Y') }}"),
            "chat template: line 1: unknown function 'strftime_now'");
  EXPECT_EQ(parse_error("{% endfor %}"), "chat template: line 1: unexpected 'endfor'");
  EXPECT_EQ(parse_error("{{ x is frobbed }}"), "chat template: line 1: unknown test 'frobbed'");
  EXPECT_EQ(parse_error("{{ 'a' }}{% set x %}y{% endset %}"),
            "chat template: line 1: block set ({% set x %}...{% endset %}) is not supported");
}

TEST(ChatTemplate, RenderErrorsNameTheLine) {
  const ChatTemplate t("x\n{{ messages[0].content + 1 }}");
  try {
    t.render({{"messages", {{{"role", "user"}, {"content", "a"}}}}});
    FAIL();
  } catch (const TemplateError& e) {
    EXPECT_EQ(e.message(), "chat template: line 2: unsupported operands for '+': 'a' and 1");
  }
  EXPECT_THROW(ChatTemplate("{{ undefined_name.attr }}").render(nlohmann::json::object()),
               TemplateError);
}

TEST(ChatTemplate, TheBuiltInMixtralTemplateIsTheRealOne) {
  EXPECT_EQ(ChatTemplate::mixtral_instruct(), read(kDir + "/mixtral_instruct_v0.1_system.jinja"));
  EXPECT_EQ(ChatTemplate::find(std::string(SY_FIXTURES_DIR) + "/no_such_dir"), "");
}

}  // namespace
}  // namespace sy
