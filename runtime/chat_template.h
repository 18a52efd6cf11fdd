// Chat prompts from the chat template a model file carries.
//
// GGUF files carry a Jinja template (tokenizer.chat_template). Rather than
// run Jinja, this recognizes the template's family (ChatML and the other
// common ones) from the markers its text contains and renders messages the
// way that family's template does, including a default system prompt the
// template adds when the conversation has none. A template of no known
// family is an error naming what was seen, never a guess.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace xq {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

enum class ChatTemplateFamily {
  kChatMl,  // <|im_start|>role\n...<|im_end|>\n (SmolLM2, Qwen, ...)
  kLlama3,  // <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
  kLlama2,  // [INST] ... [/INST] with <<SYS>> blocks
  kZephyr,  // <|role|>\n...</s>
  kGemma,   // <start_of_turn>role\n...<end_of_turn>\n
};

class ChatTemplate {
 public:
  // Recognizes a tokenizer.chat_template text. Throws xq::Error for an empty
  // text or one of no known family, saying which families it knows.
  static ChatTemplate from_jinja(const std::string& jinja);
  // A family by name ("chatml", "llama3", "llama2", "zephyr", "gemma");
  // throws xq::Error for another name.
  static ChatTemplate from_name(const std::string& name);

  ChatTemplateFamily family() const { return family_; }
  const char* name() const;
  // The system prompt the template adds when the first message is not a
  // system message ("" when it adds none).
  const std::string& default_system_prompt() const { return default_system_prompt_; }

  // The prompt text for `messages`, ending with the assistant's turn opened
  // when `add_generation_prompt`. Throws xq::Error for an empty conversation,
  // a role the family has no place for, or roles in an order it cannot
  // express. The text is tokenized as any prompt (BOS where the model wants it).
  std::string apply(const std::vector<ChatMessage>& messages,
                    bool add_generation_prompt = true) const;
  // Strings that end the assistant's turn (e.g. "<|im_end|>"), to pass as
  // stop strings so generation ends with the turn even where the marker is
  // not the model's EOS token.
  std::vector<std::string> stop_strings() const;

 private:
  ChatTemplate(ChatTemplateFamily family, std::string default_system_prompt)
      : family_(family), default_system_prompt_(std::move(default_system_prompt)) {}

  ChatTemplateFamily family_;
  std::string default_system_prompt_;
};

}  // namespace xq
