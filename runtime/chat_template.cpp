// Chat templates by family. Each family renders what its canonical Jinja
// template renders (Hugging Face's apply_chat_template: trim_blocks and
// lstrip_blocks), except the leading BOS those templates write: the tokenizer
// adds BOS itself where the model wants it, as llama.cpp's
// llama_chat_apply_template leaves it out. A BOS or EOS inside the
// conversation (Llama-2's "</s><s>[INST]") stays in the text.
#include "runtime/chat_template.h"

#include <cstdint>
#include <string_view>

#include "kernels/error.h"

namespace xq {
namespace {

struct FamilyInfo {
  ChatTemplateFamily family;
  const char* name;
  const char* markers;  // how from_jinja recognizes it, for error messages
};

constexpr FamilyInfo kFamilies[] = {
    {ChatTemplateFamily::kChatMl, "chatml", "<|im_start|>"},
    {ChatTemplateFamily::kLlama3, "llama3", "<|start_header_id|>"},
    {ChatTemplateFamily::kLlama2, "llama2", "[INST] with <<SYS>>"},
    {ChatTemplateFamily::kZephyr, "zephyr", "<|user|> with </s> or eos_token"},
    {ChatTemplateFamily::kGemma, "gemma", "<start_of_turn>"},
};

const FamilyInfo& info(ChatTemplateFamily family) {
  for (const FamilyInfo& f : kFamilies)
    if (f.family == family) return f;
  throw Error("chat template: unknown family");
}

std::string known_families() {
  std::string list;
  for (const FamilyInfo& f : kFamilies)
    list += std::string(list.empty() ? "" : ", ") + f.name + " (" + f.markers + ")";
  return list;
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

// The start of a template for an error message: at most ~80 bytes, cut at a
// character boundary, control characters escaped so the message stays on
// one line.
std::string quote_start(const std::string& text) {
  size_t end = std::min<size_t>(text.size(), 80);
  while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  std::string quoted = "\"";
  for (size_t i = 0; i < end; ++i) {
    const char c = text[i];
    if (c == '\n') {
      quoted += "\\n";
    } else if (c == '"' || c == '\\') {
      quoted += std::string("\\") + c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      quoted += ' ';
    } else {
      quoted += c;
    }
  }
  return quoted + (end < text.size() ? "...\"" : "\"");
}

// The literal texts of a Jinja template: its raw text between tags and the
// string literals inside {{ }} and {% %} (escapes resolved as Jinja resolves
// them). A default system prompt is a literal of these, never text built
// from variables.
std::vector<std::string> jinja_literals(const std::string& jinja) {
  std::vector<std::string> literals;
  std::string raw;  // text outside tags, written as it stands
  size_t i = 0;
  const size_t n = jinja.size();
  while (i < n) {
    const bool tag = jinja[i] == '{' && i + 1 < n &&
                     (jinja[i + 1] == '{' || jinja[i + 1] == '%' || jinja[i + 1] == '#');
    if (!tag) {
      raw += jinja[i++];
      continue;
    }
    if (!raw.empty()) literals.push_back(std::move(raw));
    raw.clear();
    const char kind = jinja[i + 1];
    const std::string close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    i += 2;
    while (i < n && jinja.compare(i, 2, close) != 0) {
      const char quote = jinja[i];
      if (kind == '#' || (quote != '\'' && quote != '"')) {
        ++i;
        continue;
      }
      std::string literal;
      for (++i; i < n && jinja[i] != quote; ++i) {
        if (jinja[i] != '\\' || i + 1 >= n) {
          literal += jinja[i];
          continue;
        }
        const char escaped = jinja[++i];
        switch (escaped) {
          case 'n':
            literal += '\n';
            break;
          case 't':
            literal += '\t';
            break;
          case 'r':
            literal += '\r';
            break;
          case '\\':
          case '\'':
          case '"':
            literal += escaped;
            break;
          default:
            literal += std::string("\\") + escaped;
        }
      }
      ++i;  // the closing quote
      literals.push_back(std::move(literal));
    }
    i += 2;
  }
  if (!raw.empty()) literals.push_back(std::move(raw));
  return literals;
}

// The text between `opener` and `closer` within one literal of the template:
// the system turn it writes itself ("" when it writes none).
std::string default_system_turn(const std::string& jinja, std::string_view opener,
                                std::string_view closer) {
  for (const std::string& literal : jinja_literals(jinja)) {
    const size_t at = literal.find(opener);
    if (at == std::string::npos) continue;
    const size_t from = at + opener.size();
    const size_t end = literal.find(closer, from);
    if (end != std::string::npos) return literal.substr(from, end - from);
  }
  return "";
}

// Length of the UTF-8 character at text[i] when Python's str.isspace() holds
// for it (what str.strip() and Jinja's trim remove), else 0.
size_t python_space_at(const std::string& text, size_t i) {
  const auto byte = [&](size_t k) {
    return k < text.size() ? static_cast<unsigned char>(text[k]) : 0u;
  };
  const unsigned b0 = byte(i);
  if ((b0 >= 0x09 && b0 <= 0x0D) || (b0 >= 0x1C && b0 <= 0x20)) return 1;
  uint32_t cp = 0;
  size_t length = 0;
  if (b0 == 0xC2 || b0 == 0xE1 || b0 == 0xE2 || b0 == 0xE3) {
    length = b0 == 0xC2 ? 2 : 3;
    cp = b0 & (length == 2 ? 0x1F : 0x0F);
    for (size_t k = 1; k < length; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return 0;
      cp = (cp << 6) | (byte(i + k) & 0x3F);
    }
  }
  const bool space = cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
                     cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
  return space ? length : 0;
}

// Python's str.strip() (Jinja's trim filter): Unicode whitespace at both ends.
std::string python_strip(const std::string& text) {
  size_t begin = 0;
  while (size_t length = python_space_at(text, begin)) begin += length;
  // From the end: find the start of the trailing run of whitespace characters.
  size_t end = begin;
  for (size_t i = begin; i < text.size();) {
    const size_t length = python_space_at(text, i);
    if (length == 0) {
      ++i;
      while (i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) ++i;
      end = i;
    } else {
      i += length;
    }
  }
  return text.substr(begin, end - begin);
}

[[noreturn]] void fail(const ChatTemplate& t, const std::string& problem) {
  throw Error(std::string("chat template ") + t.name() + ": " + problem);
}

// Gemma and Llama-2 raise an exception unless user and assistant alternate,
// starting with the user.
void check_alternation(const ChatTemplate& t, const std::vector<ChatMessage>& turns) {
  for (size_t i = 0; i < turns.size(); ++i) {
    const char* expected = i % 2 == 0 ? "user" : "assistant";
    if (turns[i].role != expected)
      fail(t, "roles must alternate user/assistant starting with user, but turn " +
                  std::to_string(i + 1) + " is '" + turns[i].role + "'");
  }
}

}  // namespace

ChatTemplate ChatTemplate::from_jinja(const std::string& jinja) {
  if (jinja.empty())
    throw Error("chat template: the text is empty; known families: " + known_families());
  std::vector<ChatTemplateFamily> found;
  if (contains(jinja, "<|im_start|>")) found.push_back(ChatTemplateFamily::kChatMl);
  if (contains(jinja, "<|start_header_id|>")) found.push_back(ChatTemplateFamily::kLlama3);
  if (contains(jinja, "[INST]") && contains(jinja, "<<SYS>>"))
    found.push_back(ChatTemplateFamily::kLlama2);
  // Phi-3 (<|end|>) and StableLM's zephyr (<|endoftext|>) share <|user|>
  // but end turns differently.
  if (contains(jinja, "<|user|>") && (contains(jinja, "</s>") || contains(jinja, "eos_token")) &&
      !contains(jinja, "<|end|>") && !contains(jinja, "<|endoftext|>"))
    found.push_back(ChatTemplateFamily::kZephyr);
  if (contains(jinja, "<start_of_turn>")) found.push_back(ChatTemplateFamily::kGemma);
  if (found.size() != 1) {
    std::string seen;
    for (ChatTemplateFamily f : found)
      seen += std::string(seen.empty() ? "" : " and ") + info(f).name;
    throw Error("chat template: " +
                (found.empty() ? std::string("of no known family")
                               : "has the markers of both " + seen + ", so its family is unclear") +
                "; known families: " + known_families() + "; the template begins " +
                quote_start(jinja));
  }
  const ChatTemplateFamily family = found.front();
  std::string default_system;
  if (family == ChatTemplateFamily::kChatMl) {
    default_system = default_system_turn(jinja, "<|im_start|>system\n", "<|im_end|>");
  } else if (family == ChatTemplateFamily::kLlama3) {
    // Llama 3.1 and later write a dated system turn (and tool descriptions)
    // of their own, which this family does not render.
    if (contains(jinja, "Cutting Knowledge Date") || contains(jinja, "ipython"))
      throw Error(
          "chat template: a Llama-3.1-style template (a dated system turn, tools) is not "
          "supported; only Llama-3's plain header format is; the template begins " +
          quote_start(jinja));
    default_system =
        default_system_turn(jinja, "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>");
  }
  return ChatTemplate(family, default_system);
}

ChatTemplate ChatTemplate::from_name(const std::string& name) {
  for (const FamilyInfo& f : kFamilies)
    if (name == f.name) return ChatTemplate(f.family, "");
  throw Error("chat template: unknown family '" + name + "'; known families: " + known_families());
}

const char* ChatTemplate::name() const {
  return info(family_).name;
}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt) const {
  if (messages.empty()) fail(*this, "the conversation has no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant")
      fail(*this, "message " + std::to_string(i + 1) + " has role '" + role +
                      "'; the roles are system, user and assistant");
  }
  std::vector<ChatMessage> turns;
  if (!default_system_prompt_.empty() && messages.front().role != "system")
    turns.push_back({"system", default_system_prompt_});
  turns.insert(turns.end(), messages.begin(), messages.end());

  std::string text;
  switch (family_) {
    case ChatTemplateFamily::kChatMl:
      for (const ChatMessage& m : turns)
        text += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) text += "<|im_start|>assistant\n";
      break;
    case ChatTemplateFamily::kLlama3:
      for (const ChatMessage& m : turns)
        text += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + python_strip(m.content) +
                "<|eot_id|>";
      if (add_generation_prompt) text += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatTemplateFamily::kZephyr:
      for (const ChatMessage& m : turns) text += "<|" + m.role + "|>\n" + m.content + "</s>\n";
      if (add_generation_prompt) text += "<|assistant|>\n";
      break;
    case ChatTemplateFamily::kLlama2: {
      // The system message goes inside the first [INST]; the user's turn
      // ends with [/INST], which already opens the assistant's turn.
      const bool has_system = turns.front().role == "system";
      const std::vector<ChatMessage> rest(turns.begin() + (has_system ? 1 : 0), turns.end());
      if (rest.empty()) fail(*this, "the conversation has no user message");
      check_alternation(*this, rest);
      for (size_t i = 0; i < rest.size(); ++i) {
        std::string content = rest[i].content;
        if (i == 0 && has_system)
          content = "<<SYS>>\n" + turns.front().content + "\n<</SYS>>\n\n" + content;
        if (rest[i].role == "user")
          text += std::string(i == 0 ? "" : "<s>") + "[INST] " + python_strip(content) + " [/INST]";
        else
          text += " " + python_strip(content) + " </s>";
      }
      break;
    }
    case ChatTemplateFamily::kGemma:
      if (turns.front().role == "system") fail(*this, "the template has no system role");
      check_alternation(*this, turns);
      for (const ChatMessage& m : turns)
        text += "<start_of_turn>" + std::string(m.role == "assistant" ? "model" : "user") + "\n" +
                python_strip(m.content) + "<end_of_turn>\n";
      if (add_generation_prompt) text += "<start_of_turn>model\n";
      break;
  }
  return text;
}

std::vector<std::string> ChatTemplate::stop_strings() const {
  switch (family_) {
    case ChatTemplateFamily::kChatMl:
      return {"<|im_end|>"};
    case ChatTemplateFamily::kLlama3:
      return {"<|eot_id|>"};
    case ChatTemplateFamily::kLlama2:
    case ChatTemplateFamily::kZephyr:
      return {"</s>"};
    case ChatTemplateFamily::kGemma:
      return {"<end_of_turn>"};
  }
  return {};
}

}  // namespace xq
