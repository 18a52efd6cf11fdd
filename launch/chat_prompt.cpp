#include "launch/chat_prompt.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/error.h"
#include "launch/arguments.h"
#include "runtime/model.h"

namespace xq {

ChatTemplate chat_template_for(const std::string& model_jinja, const std::string& name,
                               const std::string& command) {
  if (!name.empty()) return ChatTemplate::from_name(name);
  if (model_jinja.empty())
    throw Error(command +
                ": the model has no chat template; choose a family with --chat-template "
                "(chatml, llama3, llama2, zephyr or gemma)");
  try {
    return ChatTemplate::from_jinja(model_jinja);
  } catch (const Error& e) {
    throw Error(command + ": the model's " + e.what() + " (--chat-template NAME chooses one)");
  }
}

ChatPrompt chat_prompt(const ChatTemplate& chat_template, const std::string& system,
                       const std::string& prompt) {
  std::vector<ChatMessage> messages;
  if (!system.empty()) messages.push_back({"system", system});
  messages.push_back({"user", prompt});
  return {chat_template.apply(messages, /*add_generation_prompt=*/true),
          chat_template.stop_strings()};
}

namespace {

using json = nlohmann::json;

// A template file's text; unlike a prompt file it may be empty (that is the
// template's problem to report).
std::string read_template_file(const std::string& path) {
  std::error_code ignored;
  if (std::filesystem::is_directory(path, ignored))
    throw Error(path + ": cannot read template file: it is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot read template file: " + std::strerror(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::vector<ChatMessage> parse_messages(const std::string& text) {
  const std::string usage =
      "chat-template: --messages wants a JSON list like "
      "'[{\"role\": \"user\", \"content\": \"Hi\"}]'";
  const json list = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!list.is_array()) throw Error(usage);
  std::vector<ChatMessage> messages;
  for (const json& item : list) {
    if (!item.is_object() || !item.contains("role") || !item.contains("content") ||
        !item["role"].is_string() || !item["content"].is_string())
      throw Error(usage);
    messages.push_back({item["role"].get<std::string>(), item["content"].get<std::string>()});
  }
  return messages;
}

}  // namespace

int run_chat_template(int argc, char** argv) {
  Arguments args("chat-template",
                 "Print a conversation as a chat template formats it (what --chat sends the "
                 "model). The template: --chat-template NAME, --jinja FILE, or the model's.");
  args.option("model", default_model_path(), "model file whose chat template to use");
  args.option("jinja", "", "file holding a Jinja chat template (instead of the model's)");
  args.option("chat-template", "", "a family by name: chatml, llama3, llama2, zephyr, gemma");
  args.option("prompt", "", "the user's message");
  args.option("system", "", "a system message before it");
  args.option("messages", "", "the conversation as JSON [{\"role\": ..., \"content\": ...}, ...]");
  args.flag("no-generation-prompt", "do not open the assistant's turn at the end");
  args.flag("json", "print {family, default_system_prompt, prompt, stop} as JSON");
  if (!args.parse(argc, argv)) return 0;
  if (args.has("prompt") == args.has("messages"))
    throw Error("chat-template: give one of --prompt and --messages (see --help)");
  if (args.has("messages") && args.has("system"))
    throw Error("chat-template: --system goes with --prompt; put it in --messages instead");
  if (args.has("jinja") && args.has("chat-template"))
    throw Error("chat-template: give at most one of --jinja and --chat-template");
  std::vector<ChatMessage> messages;
  if (args.has("messages")) {
    messages = parse_messages(args.get("messages"));
  } else {
    if (args.has("system")) messages.push_back({"system", args.get("system")});
    messages.push_back({"user", args.get("prompt")});
  }
  const ChatTemplate chat_template = [&] {
    if (args.has("jinja")) return ChatTemplate::from_jinja(read_template_file(args.get("jinja")));
    if (args.has("chat-template")) return ChatTemplate::from_name(args.get("chat-template"));
    const std::unique_ptr<Model> model = Model::load(args.get("model"));
    return chat_template_for(model->chat_template(), "", "chat-template");
  }();
  const std::string text = chat_template.apply(messages, !args.has("no-generation-prompt"));
  if (args.has("json")) {
    const json out = {{"family", chat_template.name()},
                      {"default_system_prompt", chat_template.default_system_prompt()},
                      {"prompt", text},
                      {"stop", chat_template.stop_strings()}};
    std::printf("%s\n", out.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
  } else {
    std::fwrite(text.data(), 1, text.size(), stdout);
  }
  return 0;
}

}  // namespace xq
