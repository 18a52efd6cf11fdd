// Between the wire and the scheduler: a GenerateRequest checked and turned
// into an xq::Request, and scheduler events turned into stream messages.
// The coordinator and the replicas run the same checks, so a bad request
// gets the same status wherever it is caught.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>

#include "runtime/request.h"
#include "runtime/tokenizer.h"
#include "xquant/v1/xquant.pb.h"

namespace xq::serve {

namespace v1 = ::xquant::v1;

struct PromptLimits {
  int32_t context = 0;            // prompt + generated tokens at most
  int32_t vocab = 0;              // token ids must lie in [0, vocab)
  int32_t max_prompt_tokens = 0;  // 0: the context's
};

// The fields that need no model: UNIMPLEMENTED for an option this server
// does not support (n > 1, penalties, min_tokens, stop_token_ids, prompt
// logprobs), INVALID_ARGUMENT naming the field for a bad value (no prompt,
// max_tokens <= 0, temperature < 0 or not finite, top_p outside (0, 1],
// top_k < 0, logprobs outside [0, 20]).
grpc::Status check_generate_fields(const v1::GenerateRequest& request);

// check_generate_fields, then the prompt: tokenized (text, with BOS where
// the model wants it) or copied (ids), checked against `limits` (empty,
// longer than the prompt limit, ids outside the vocabulary, no room for
// max_tokens in the context: INVALID_ARGUMENT) and written to `out`.
grpc::Status to_request(const v1::GenerateRequest& request, const Tokenizer& tokenizer,
                        const PromptLimits& limits, Request* out);

// Prompt tokens the request carries before tokenization: the ids, or an
// upper bound for text (one token per byte, plus BOS). Used where the
// coordinator counts queued tokens without a tokenizer.
int64_t prompt_token_bound(const v1::GenerateRequest& request);

v1::FinishReason to_proto(FinishReason reason);
// One token event appended to a delta (token id, text, logprobs).
void append_token(const RequestEvent& event, v1::Delta* delta);
// A finished event (not kFailed) as the terminal message.
void fill_finished(const RequestEvent& event, v1::Finished* finished);

// A new unique request id ("xq-" and 24 hex digits).
std::string new_request_id();

}  // namespace xq::serve
