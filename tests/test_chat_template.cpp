// Chat templates: recognition, the default system prompt read from the
// template, and the errors. That each family renders exactly what its Jinja
// template renders is checked against Jinja itself
// (tests/reference/check_chat_templates.py, ctest reference.chat_templates);
// the expected texts here are the formats as the model cards document them.
// Also the stop-string filter `xq generate --chat` ends generation with.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/chat_template.h"
#include "runtime/model.h"
#include "runtime/stop_strings.h"
#include "tests/test_util.h"

namespace xq {
namespace {

// The message of the xq::Error `f` throws ("" when it throws none).
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

const char* const kSmolLm2Default =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

TEST(ChatTemplate, SmolLm2TemplateIsChatMlWithItsDefaultSystemPrompt) {
  const std::string path = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(path)) GTEST_SKIP() << path << " absent (run launch/setup.sh)";
  const ChatTemplate t = ChatTemplate::from_jinja(Model::load(path)->chat_template());
  EXPECT_EQ(t.family(), ChatTemplateFamily::kChatMl);
  EXPECT_STREQ(t.name(), "chatml");
  EXPECT_EQ(t.default_system_prompt(), kSmolLm2Default);
  EXPECT_EQ(t.apply({{"user", "Hi"}}), std::string("<|im_start|>system\n") + kSmolLm2Default +
                                           "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                           "<|im_start|>assistant\n");
  // A system message of the user's replaces the default.
  EXPECT_EQ(t.apply({{"system", "S"}, {"user", "Hi"}}, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(t.stop_strings(), std::vector<std::string>{"<|im_end|>"});
}

TEST(ChatTemplate, DefaultSystemPromptComesOnlyFromALiteral) {
  // Escaped newlines in the literal, as Qwen2's template writes them.
  const ChatTemplate qwen = ChatTemplate::from_jinja(
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful "
      "assistant.<|im_end|>\\n' }}{% endif %}{% for m in messages %}...{% endfor %}");
  EXPECT_EQ(qwen.default_system_prompt(), "You are a helpful assistant.");
  // A system turn built from a variable is no default.
  const ChatTemplate built = ChatTemplate::from_jinja(
      "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}");
  EXPECT_EQ(built.default_system_prompt(), "");
  EXPECT_EQ(ChatTemplate::from_name("chatml").default_system_prompt(), "");
}

TEST(ChatTemplate, RecognizesEachFamilyByItsMarkers) {
  const std::vector<std::pair<std::string, ChatTemplateFamily>> cases = {
      {"{{ '<|im_start|>' + message['role'] }}", ChatTemplateFamily::kChatMl},
      {"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}",
       ChatTemplateFamily::kLlama3},
      {"{{ bos_token + '[INST] ' + '<<SYS>>\\n' }}", ChatTemplateFamily::kLlama2},
      {"{{ '<|user|>\\n' + message['content'] + eos_token }}", ChatTemplateFamily::kZephyr},
      {"{{ '<start_of_turn>' + role }}", ChatTemplateFamily::kGemma},
  };
  for (const auto& [jinja, family] : cases) {
    const ChatTemplate t = ChatTemplate::from_jinja(jinja);
    EXPECT_EQ(t.family(), family) << jinja;
    EXPECT_EQ(ChatTemplate::from_name(t.name()).family(), family) << jinja;
  }
}

TEST(ChatTemplate, EmptyUnknownAndAmbiguousTemplatesAreErrors) {
  const std::string empty = error_of([] { ChatTemplate::from_jinja(""); });
  EXPECT_NE(empty.find("empty"), std::string::npos) << empty;
  for (const char* family : {"chatml", "llama3", "llama2", "zephyr", "gemma"})
    EXPECT_NE(empty.find(family), std::string::npos) << empty;

  // Mistral's [INST] without <<SYS>>: not Llama-2's format.
  const std::string mistral =
      "{{ bos_token }}{% for message in messages %}{{ '[INST] ' + "
      "message['content'] + ' [/INST]' }}\n{% endfor %}" +
      std::string(100, 'x');
  const std::string unknown = error_of([&] { ChatTemplate::from_jinja(mistral); });
  EXPECT_NE(unknown.find("no known family"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("gemma (<start_of_turn>)"), std::string::npos) << unknown;
  // The start of the text, on one line, cut short.
  EXPECT_NE(unknown.find("\"{{ bos_token }}{% for message in messages %}"), std::string::npos)
      << unknown;
  EXPECT_EQ(unknown.find('\n'), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("...\""), std::string::npos) << unknown;
  EXPECT_EQ(unknown.find("xxx"), std::string::npos) << unknown;

  // Phi-3 shares <|user|> with Zephyr but ends turns with <|end|>.
  EXPECT_NE(
      error_of([] { ChatTemplate::from_jinja("{{ '<|user|>\\n' + c + '<|end|>' + eos_token }}"); }),
      "");
  const std::string both =
      error_of([] { ChatTemplate::from_jinja("<|im_start|> or <start_of_turn>"); });
  EXPECT_NE(both.find("chatml and gemma"), std::string::npos) << both;
  // Llama 3.1's dated system turn is not rendered by this family.
  EXPECT_NE(error_of([] {
              ChatTemplate::from_jinja(
                  "<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: ");
            }),
            "");
  const std::string name = error_of([] { ChatTemplate::from_name("mistral"); });
  EXPECT_NE(name.find("'mistral'"), std::string::npos) << name;
  EXPECT_NE(name.find("zephyr"), std::string::npos) << name;
}

TEST(ChatTemplate, BadConversationsAreErrors) {
  for (const char* name : {"chatml", "llama3", "llama2", "zephyr", "gemma"}) {
    const ChatTemplate t = ChatTemplate::from_name(name);
    EXPECT_NE(error_of([&] { t.apply({}); }).find("no messages"), std::string::npos) << name;
    EXPECT_NE(error_of([&] {
                t.apply({{"tool", "x"}});
              }).find("'tool'"),
              std::string::npos)
        << name;
  }
  const ChatTemplate llama2 = ChatTemplate::from_name("llama2");
  EXPECT_NE(error_of([&] { llama2.apply({{"assistant", "a"}, {"user", "u"}}); }), "");
  EXPECT_NE(error_of([&] { llama2.apply({{"user", "u"}, {"user", "u"}}); }), "");
  EXPECT_NE(error_of([&] { llama2.apply({{"system", "s"}}); }), "");
  const ChatTemplate gemma = ChatTemplate::from_name("gemma");
  EXPECT_NE(error_of([&] {
              gemma.apply({{"system", "s"}, {"user", "u"}});
            }).find("system"),
            std::string::npos);
  // ChatML takes any order.
  EXPECT_EQ(ChatTemplate::from_name("chatml").apply({{"assistant", "a"}}, false),
            "<|im_start|>assistant\na<|im_end|>\n");
}

TEST(ChatTemplate, FormatsAsTheModelCardsShowThem) {
  // Llama-2: BOS left to the tokenizer, the later ones kept.
  EXPECT_EQ(
      ChatTemplate::from_name("llama2").apply(
          {{"system", "test"}, {"user", "hello"}, {"assistant", "response"}, {"user", "again"}}),
      "[INST] <<SYS>>\ntest\n<</SYS>>\n\nhello [/INST] response </s><s>[INST] again [/INST]");
  EXPECT_EQ(ChatTemplate::from_name("llama3").apply({{"user", " hi "}}),
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(ChatTemplate::from_name("zephyr").apply({{"system", "S"}, {"user", "U"}}),
            "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n");
  EXPECT_EQ(ChatTemplate::from_name("gemma").apply({{"user", "hello"}, {"assistant", "response"}}),
            "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\nresponse<end_of_turn>\n"
            "<start_of_turn>model\n");
  // Jinja's trim is Python's str.strip(): Unicode spaces go too.
  EXPECT_EQ(ChatTemplate::from_name("gemma").apply({{"user", "\u3000\u00a0x\u2003 \n"}}, false),
            "<start_of_turn>user\nx<end_of_turn>\n");
}

std::string filtered(const std::vector<std::string>& stops, const std::vector<std::string>& pieces,
                     bool* stopped) {
  StopStringFilter filter(stops);
  std::string out;
  for (const std::string& piece : pieces) out += filter.push(piece);
  out += filter.finish();
  *stopped = filter.stopped();
  return out;
}

TEST(StopStringFilter, EndsBeforeTheStopStringEvenAcrossPieces) {
  bool stopped = false;
  EXPECT_EQ(filtered({"<|im_end|>"}, {"Hello", " wor", "ld<|im", "_end|>", "more"}, &stopped),
            "Hello world");
  EXPECT_TRUE(stopped);
  // A prefix of a stop string that never completes is released at the end.
  EXPECT_EQ(filtered({"<|im_end|>"}, {"a <|im", "_"}, &stopped), "a <|im_");
  EXPECT_FALSE(stopped);
  // The earliest of several stop strings wins.
  EXPECT_EQ(filtered({"END", "</s>"}, {"x</s>yEND"}, &stopped), "x");
  EXPECT_TRUE(stopped);
  EXPECT_EQ(filtered({""}, {"abc"}, &stopped), "abc");
  EXPECT_FALSE(stopped);
}

TEST(StopStringFilter, ReleasesTextAsSoonAsNoStopStringCanBeginInIt) {
  StopStringFilter filter({"</s>"});
  EXPECT_EQ(filter.push("ab<"), "ab");
  EXPECT_EQ(filter.push("/x"), "</x");
  EXPECT_EQ(filter.push("</s"), "");
  EXPECT_EQ(filter.push(">tail"), "");
  EXPECT_TRUE(filter.stopped());
}

}  // namespace
}  // namespace xq
