// Chat prompts for the command-line tools: `xq generate --chat` and
// `xq client --chat` format a prompt (and an optional system message) with
// the model's chat template through these functions, so both send the model
// the same text and end on the same stop strings. Also the `xq chat-template`
// command, which renders a conversation without loading a model.
#pragma once

#include <string>
#include <vector>

#include "runtime/chat_template.h"

namespace xq {

// The template to use: the family `name` when given (--chat-template), else
// the model file's Jinja template. Throws xq::Error naming `command` when
// there is neither, or when the template is of no known family.
ChatTemplate chat_template_for(const std::string& model_jinja, const std::string& name,
                               const std::string& command);

struct ChatPrompt {
  // Formatted with the template, ending with the assistant's turn opened.
  // Its control-token texts (<|im_start|>, ...) are meant to be tokenized as
  // those tokens (Tokenizer::encode's parse_special).
  std::string text;
  std::vector<std::string> stop;  // the template's end-of-turn strings
};

// One user message, preceded by a system message when `system` is not empty
// (else the template's default system prompt, if it has one).
ChatPrompt chat_prompt(const ChatTemplate& chat_template, const std::string& system,
                       const std::string& prompt);

// The `xq chat-template` command (argv after the command name).
int run_chat_template(int argc, char** argv);

}  // namespace xq
