// `xq batch`'s core on the real stories260K engine: a JSONL file with good
// and bad lines gives one result per line in input order, errors that name
// their line, and good lines that equal generate() of the prompt alone.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "launch/arguments.h"
#include "launch/batch_tool.h"
#include "runtime/generation.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace xq {
namespace {

using json = nlohmann::json;

TEST(BatchTool, GoodAndBadLinesInInputOrder) {
  auto model = Model::load(testing::shared_path("models/stories260K.bin"));
  EngineOptions options;
  options.sequences = 3;
  TransformerEngine engine(*model, options);
  LocalExecutor executor(engine);
  const std::string input =
      R"({"prompt": "Once upon a time", "max_tokens": 20, "id": "a"})"
      "\n"
      R"({"prompt": "Lily liked", oops})"
      "\n"
      R"({"prompt": "Tom", "colour": "red"})"
      "\n"
      "\n"  // blank: skipped
      R"({"prompt_token_ids": [1, 400, 401, 402], "max_tokens": 5, "logprobs": 2, "id": 7,)"
      R"( "arrival_step": 3})"
      "\n"
      R"({"prompt": "The dog", "max_tokens": 0})"
      "\n"
      R"({"prompt_token_ids": [1, 9999]})"
      "\n"
      R"({"prompt": "The sun was", "max_tokens": 30, "stop": ["the", "xyz"], "arrival_step": 1})"
      "\n"
      R"({"prompt": "One day", "temperature": -1})"
      "\n";
  std::istringstream in(input);
  std::ostringstream out;
  const BatchSummary summary = run_batch_jsonl(executor, SchedulerOptions{128, 3, 8, {}}, in, out,
                                               /*progress=*/false);
  std::vector<json> results;
  std::istringstream lines(out.str());
  for (std::string line; std::getline(lines, line);) results.push_back(json::parse(line));
  ASSERT_EQ(results.size(), 8u);
  EXPECT_EQ(summary.requests, 8);
  EXPECT_EQ(summary.failed, 5);
  const std::vector<int> numbers = {1, 2, 3, 5, 6, 7, 8, 9};
  for (size_t i = 0; i < results.size(); ++i) EXPECT_EQ(results[i]["line"], numbers[i]);
  auto error = [&](size_t i) { return results[i].value("error", std::string()); };
  EXPECT_NE(error(1).find("line 2: invalid JSON"), std::string::npos) << error(1);
  EXPECT_NE(error(2).find("line 3: unknown field 'colour'"), std::string::npos) << error(2);
  EXPECT_NE(error(4).find("line 6: max_tokens"), std::string::npos) << error(4);
  EXPECT_NE(error(5).find("line 7: prompt token 1 is id 9999"), std::string::npos) << error(5);
  EXPECT_NE(error(7).find("line 9: temperature"), std::string::npos) << error(7);

  const Tokenizer& tok = model->tokenizer();
  EngineOptions alone_options;
  TransformerEngine alone(*model, alone_options);
  auto solo = [&](const std::vector<int32_t>& prompt, int64_t max_tokens) {
    GenerationOptions g;
    g.max_new_tokens = max_tokens;
    std::vector<int32_t> ids;
    for (const SampledToken& t : generate(alone, prompt, g).tokens) ids.push_back(t.token);
    alone.release(0);
    return ids;
  };
  const json& a = results[0];
  EXPECT_EQ(a["id"], "a");
  const std::vector<int32_t> a_ids = a["token_ids"];
  EXPECT_EQ(a_ids, solo(tok.encode("Once upon a time", tok.add_bos()), 20));
  EXPECT_EQ(a["text"], tok.decode(a_ids));
  EXPECT_EQ(a["usage"]["completion_tokens"], a_ids.size());
  const json& b = results[3];
  EXPECT_EQ(b["id"], 7);
  EXPECT_EQ(b["finish_reason"], "length");
  ASSERT_EQ(b["logprobs"].size(), 5u);
  EXPECT_EQ(b["logprobs"][0]["top"].size(), 2u);
  EXPECT_EQ(b["token_ids"].get<std::vector<int32_t>>(), solo({1, 400, 401, 402}, 5));
  const json& c = results[6];
  const std::vector<int32_t> c_ids = c["token_ids"];
  const std::string c_full = tok.decode(c_ids);
  if (c["finish_reason"] == "stop") {
    EXPECT_EQ(c["text"], c_full.substr(0, c_full.find("the")));
  } else {
    EXPECT_EQ(c_full.find("the"), std::string::npos);
  }
}

TEST(BatchTool, ByteSizes) {
  EXPECT_EQ(parse_byte_size("512MiB", "--cache-memory"), 512u << 20);
  EXPECT_EQ(parse_byte_size("2GiB", "--cache-memory"), 2ull << 30);
  EXPECT_EQ(parse_byte_size("64MB", "--cache-memory"), 64000000u);
  EXPECT_EQ(parse_byte_size("1.5kib", "--cache-memory"), 1536u);
  EXPECT_EQ(parse_byte_size("4096", "--cache-memory"), 4096u);
  EXPECT_EQ(parse_byte_size("7B", "--cache-memory"), 7u);
  for (const char* bad : {"", "MiB", "-5", "1.5", "12XB", "1..2GB", "99999999999999999999TiB"})
    EXPECT_THROW(parse_byte_size(bad, "--cache-memory"), Error) << bad;
}

}  // namespace
}  // namespace xq
