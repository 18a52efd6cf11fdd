// The xq binary on bad input. Whatever is wrong -- a truncated or corrupt
// model, a missing text file, a mistyped option -- xq must exit with status 1
// or 2 (never a signal) and print exactly one stderr line, "error: ...",
// naming the file or option and the problem. Each test builds its broken
// input in a fresh temporary directory and runs the real binary.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/cache_mode.h"
#include "tests/test_util.h"
#include "tests/tiny_llama_gguf.h"

#if defined(XQ_HAVE_CUDA)
#include "kernels/cuda/device.h"
#endif

extern char** environ;

namespace xq {
namespace {

namespace fs = std::filesystem;
using testing::shared_path;
using testing::TinyLlamaGguf;

struct RunResult {
  int exit_code = -1;  // valid when signal == 0
  int signal = 0;      // the signal that ended xq, or 0
  std::string out, err;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string as_string(const std::vector<uint8_t>& bytes) {
  return {bytes.begin(), bytes.end()};
}

// The verdict every bad-input test wants: a clean failure with exactly one
// "error: " line that contains each of `expected`.
::testing::AssertionResult FailsWithOneError(const RunResult& r,
                                             const std::vector<std::string>& expected) {
  if (r.signal != 0) {
    return ::testing::AssertionFailure() << "xq was killed by signal " << r.signal << " ("
                                         << strsignal(r.signal) << "); stderr:\n"
                                         << r.err;
  }
  if (r.exit_code != 1 && r.exit_code != 2) {
    return ::testing::AssertionFailure()
           << "exit code " << r.exit_code << ", expected 1 or 2; stderr:\n"
           << r.err;
  }
  const size_t newline = r.err.find('\n');
  if (r.err.rfind("error: ", 0) != 0 || newline != r.err.size() - 1) {
    return ::testing::AssertionFailure() << "stderr is not one \"error: \" line:\n" << r.err;
  }
  for (const std::string& text : expected) {
    if (r.err.find(text) == std::string::npos) {
      return ::testing::AssertionFailure()
             << "the error does not mention \"" << text << "\": " << r.err;
    }
  }
  return ::testing::AssertionSuccess();
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "xq_cli_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr) << std::strerror(errno);
    dir_ = pattern;
    text_ = file("story.txt");
    write_file(text_,
               "Once upon a time there was a little girl who liked to play in the park. "
               "One day she saw a big dog. The dog was happy and they played all day.\n");
  }

  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  std::string file(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Writes `bytes` to a file in the temporary directory and returns its path.
  std::string write(const std::string& name, const std::string& bytes) {
    const std::string path = file(name);
    write_file(path, bytes);
    return path;
  }
  std::string write_gguf(const std::string& name, const TinyLlamaGguf& model) {
    return write(name, as_string(model.build()));
  }

  // Runs xq with `args`, stdin empty and both outputs captured; with
  // `merge_streams`, stderr goes into the same file as stdout (as `2>&1` into
  // a pipe, where stdout is fully buffered) and RunResult::out holds both.
  RunResult run(const std::vector<std::string>& args, bool merge_streams = false) {
    const std::string out_path = file("stdout.txt"), err_path = file("stderr.txt");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    if (merge_streams)
      posix_spawn_file_actions_adddup2(&actions, 1, 2);
    else
      posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                       0644);
    std::vector<std::string> argv_strings = {XQ_BINARY};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : argv_strings) argv.push_back(s.data());
    argv.push_back(nullptr);

    RunResult result;
    pid_t pid = 0;
    const int spawn_error = posix_spawn(&pid, XQ_BINARY, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (spawn_error != 0) {
      ADD_FAILURE() << "cannot run " << XQ_BINARY << ": " << std::strerror(spawn_error);
      return result;
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(status)) result.signal = WTERMSIG(status);
    if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
    result.out = read_file(out_path);
    if (!merge_streams) result.err = read_file(err_path);
    return result;
  }

  // The llama2.c model and its tokenizer from the shared folder; the test is
  // skipped where they are absent.
  bool have_stories() const {
    return testing::file_exists(stories_) && testing::file_exists(tok512_);
  }

  std::vector<std::string> perplexity_on_stories(const std::vector<std::string>& extra) const {
    std::vector<std::string> args = {"perplexity", "--model", stories_, "--tokenizer",
                                     tok512_,      "--file",  text_};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  std::string dir_;
  std::string text_;
  const std::string stories_ = shared_path("models/stories260K.bin");
  const std::string tok512_ = shared_path("models/tok512.bin");
};

#define REQUIRE_STORIES()                                                            \
  do {                                                                               \
    if (!have_stories()) GTEST_SKIP() << stories_ << " or " << tok512_ << " absent"; \
  } while (0)

// ---------------------------------------------------------------------------
// Usage and options

TEST_F(Cli, HelpOnEveryCommand) {
  const RunResult top = run({"--help"});
  ASSERT_EQ(top.signal, 0);
  EXPECT_EQ(top.exit_code, 0);
  EXPECT_NE(top.out.find("usage: xq <command>"), std::string::npos) << top.out;

  // Every command the top-level usage lists, so a new one is covered too.
  std::vector<std::string> commands;
  std::istringstream lines(top.out.substr(top.out.find("commands:")));
  std::string line;
  std::getline(lines, line);
  while (std::getline(lines, line) && line.rfind("  ", 0) == 0) {
    commands.push_back(line.substr(2, line.find(' ', 2) - 2));
  }
  EXPECT_NE(std::find(commands.begin(), commands.end(), "perplexity"), commands.end());
  EXPECT_NE(std::find(commands.begin(), commands.end(), "generate"), commands.end());
  for (const std::string& command : commands) {
    for (const char* help : {"--help", "-h"}) {
      const RunResult r = run({command, help});
      EXPECT_EQ(r.signal, 0) << command;
      EXPECT_EQ(r.exit_code, 0) << command << " " << help;
      EXPECT_EQ(r.out.rfind("usage: xq " + command + " [options]", 0), 0u) << r.out;
      // The serving front-ends load no model; every other command does.
      const bool loads_a_model = command != "coordinator" && command != "client";
      EXPECT_EQ(r.out.find("--model") != std::string::npos, loads_a_model) << r.out;
      EXPECT_EQ(r.err, "") << command;
    }
  }
}

TEST_F(Cli, NoCommandPrintsUsageAndFails) {
  const RunResult r = run({});
  EXPECT_EQ(r.signal, 0);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("usage: xq <command>"), std::string::npos) << r.err;
}

TEST_F(Cli, UnknownCommand) {
  EXPECT_TRUE(FailsWithOneError(run({"frobnicate"}), {"unknown command 'frobnicate'"}));
}

TEST_F(Cli, UnknownOption) {
  for (const char* command : {"perplexity", "generate"}) {
    EXPECT_TRUE(FailsWithOneError(run({command, "--frobnicate", "1"}),
                                  {command, "unknown option '--frobnicate'"}));
  }
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "stray"}), {"unexpected argument 'stray'"}));
}

TEST_F(Cli, OptionWithoutValue) {
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--file"}), {"'--file'", "needs a value"}));
}

TEST_F(Cli, RequiredOptionMissing) {
  EXPECT_TRUE(FailsWithOneError(run({"perplexity"}), {"--file is required"}));
  EXPECT_TRUE(FailsWithOneError(run({"generate"}), {"--prompt is required"}));
}

TEST_F(Cli, NonNumericCtx) {
  REQUIRE_STORIES();
  for (const char* bad : {"abc", "12abc", "", "1.5"}) {
    EXPECT_TRUE(FailsWithOneError(run(perplexity_on_stories({"--ctx", bad})),
                                  {"--ctx", "wants an integer", "got '" + std::string(bad) + "'"}));
  }
}

// A number that would wrap or make no sense is refused, not truncated.
TEST_F(Cli, OutOfRangeNumbers) {
  REQUIRE_STORIES();
  const std::vector<std::vector<std::string>> cases = {
      {"--ctx", "4294967298"}, {"--ctx", "1"},
      {"--ctx", "-5"},         {"--chunks", "-1"},
      {"--threads", "0"},      {"--threads", "99999999999"},
      {"--threads", "100000"}, {"--ctx", "99999999999999999999"}};
  for (const std::vector<std::string>& option : cases) {
    EXPECT_TRUE(FailsWithOneError(run(perplexity_on_stories(option)),
                                  {option[0], "got '" + option[1] + "'"}));
  }
  const std::vector<std::string> generate = {"generate", "--model",  stories_, "--tokenizer",
                                             tok512_,    "--prompt", "Once"};
  for (const std::vector<std::string>& option :
       std::vector<std::vector<std::string>>{{"--max-tokens", "-1"}, {"--top-k", "-3"}}) {
    std::vector<std::string> args = generate;
    args.insert(args.end(), option.begin(), option.end());
    EXPECT_TRUE(FailsWithOneError(run(args), {option[0], "got '" + option[1] + "'"}));
  }
  std::vector<std::string> args = generate;
  args.insert(args.end(), {"--temperature", "warm"});
  EXPECT_TRUE(FailsWithOneError(run(args), {"--temperature", "wants a number", "'warm'"}));
}

// --force-ids feeds the given ids and prints what each step sampled: fed the
// greedy run's own ids it reproduces that run (ids and margins); fed another
// id at one step, the steps up to it are unchanged; bad lists fail.
TEST_F(Cli, ForceIdsReplaysGreedyRun) {
  REQUIRE_STORIES();
  const std::vector<std::string> generate = {
      "generate",         "--model",   stories_, "--tokenizer", tok512_,    "--prompt",
      "Once upon a time", "--threads", "1",      "--ids",       "--margins"};
  std::vector<std::string> args = generate;
  args.insert(args.end(), {"--max-tokens", "12"});
  const RunResult free = run(args);
  ASSERT_EQ(free.exit_code, 0) << free.err;
  std::vector<std::string> lines, ids;
  for (size_t start = 0, end; (end = free.out.find('\n', start)) != std::string::npos;
       start = end + 1) {
    lines.push_back(free.out.substr(start, end - start));
    ids.push_back(lines.back().substr(0, lines.back().find(' ')));
  }
  ASSERT_EQ(lines.size(), 12u) << free.out;
  auto joined = [](const std::vector<std::string>& v) {
    std::string out;
    for (const std::string& id : v) out += (out.empty() ? "" : ",") + id;
    return out;
  };
  args = generate;
  args.insert(args.end(), {"--force-ids", joined(ids)});
  const RunResult forced = run(args);
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_EQ(forced.out, free.out);

  std::vector<std::string> other = ids;
  other[3] = ids[3] == "7" ? "8" : "7";  // fed after step 3
  args = generate;
  args.insert(args.end(), {"--force-ids", joined(other)});
  const RunResult changed = run(args);
  ASSERT_EQ(changed.exit_code, 0) << changed.err;
  std::string first4;
  for (int i = 0; i < 4; ++i) first4 += lines[static_cast<size_t>(i)] + "\n";
  EXPECT_EQ(changed.out.rfind(first4, 0), 0u) << changed.out;
  EXPECT_NE(changed.out, free.out);

  args = generate;
  args.insert(args.end(), {"--force-ids", "1,x"});
  EXPECT_TRUE(FailsWithOneError(run(args), {"--force-ids", "'1,x'"}));
  args = generate;
  args.insert(args.end(), {"--force-ids", "1,2,99999"});
  const RunResult outside = run(args);
  EXPECT_EQ(outside.exit_code, 1);
  EXPECT_NE(outside.err.find("forced token id 99999 is outside the vocabulary"), std::string::npos)
      << outside.err;
}

TEST_F(Cli, CtxOutsideWhatTheModelAllows) {
  REQUIRE_STORIES();
  EXPECT_TRUE(FailsWithOneError(run(perplexity_on_stories({"--ctx", "100000"})),
                                {"--ctx", "model's context"}));
  // Two tokens per chunk leave nothing to score in the second half.
  EXPECT_TRUE(FailsWithOneError(run(perplexity_on_stories({"--ctx", "2"})),
                                {"--ctx 2", "no token to score"}));
}

TEST_F(Cli, UnknownCacheMode) {
  REQUIRE_STORIES();
  EXPECT_TRUE(FailsWithOneError(run(perplexity_on_stories({"--ctx", "16", "--cache", "nonsense"})),
                                {"cache mode 'nonsense'"}));
}

// `xq modes --names` is what scripts read (bench/accuracy_table.py): the
// table's names, one a line, in order.
TEST_F(Cli, ModesListsTheTable) {
  const RunResult r = run({"modes", "--names"});
  ASSERT_EQ(r.signal, 0);
  EXPECT_EQ(r.exit_code, 0);
  std::string expected;
  for (const CacheModeSpec& mode : cache_modes()) expected += std::string(mode.name) + "\n";
  EXPECT_EQ(r.out, expected);
  const RunResult described = run({"modes"});
  EXPECT_EQ(described.exit_code, 0);
  EXPECT_NE(described.out.find("xquant-4: X per token"), std::string::npos) << described.out;
}

// ---------------------------------------------------------------------------
// The text file of `xq perplexity`

TEST_F(Cli, EmptyTextFile) {
  REQUIRE_STORIES();
  const std::string empty = write("empty.txt", "");
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", stories_, "--tokenizer", tok512_, "--file", empty}),
      {empty, "empty"}));
}

TEST_F(Cli, MissingTextFile) {
  REQUIRE_STORIES();
  const std::string missing = file("no-such-file.txt");
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", stories_, "--tokenizer", tok512_, "--file", missing}),
      {missing, "No such file"}));
}

TEST_F(Cli, TextFileIsADirectory) {
  REQUIRE_STORIES();
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", stories_, "--tokenizer", tok512_, "--file", dir_}),
      {dir_, "directory"}));
}

TEST_F(Cli, TextTooShortForOneChunk) {
  REQUIRE_STORIES();
  const std::string tiny = write("tiny.txt", "Once");
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", stories_, "--tokenizer", tok512_,
                                     "--file", tiny, "--ctx", "64"}),
                                {"fewer than one chunk"}));
}

// ---------------------------------------------------------------------------
// llama2.c checkpoints

TEST_F(Cli, TruncatedLlama2cCheckpoint) {
  REQUIRE_STORIES();
  const std::string whole = read_file(stories_);
  const std::string half = write("half.bin", whole.substr(0, whole.size() / 2));
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", half, "--tokenizer", tok512_, "--file", text_}),
      {half, "does not match the header"}));
  const std::string stub = write("stub.bin", whole.substr(0, 10));
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", stub, "--tokenizer", tok512_, "--file", text_}),
      {stub, "neither a GGUF file", "nor a llama2.c checkpoint", "only 10 bytes"}));
  const std::string empty = write("empty.bin", "");
  EXPECT_TRUE(FailsWithOneError(
      run({"generate", "--model", empty, "--tokenizer", tok512_, "--prompt", "Once"}),
      {empty, "neither a GGUF file"}));
}

TEST_F(Cli, CheckpointWithoutTokenizer) {
  REQUIRE_STORIES();
  const std::string copy = file("stories260K.bin");
  fs::copy_file(stories_, copy);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", copy, "--file", text_}),
                                {copy, "no tokenizer found", "--tokenizer"}));
  const std::string missing = file("missing-tok.bin");
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", copy, "--tokenizer", missing, "--file", text_}),
      {missing, "cannot open"}));
}

TEST_F(Cli, TruncatedTokenizer) {
  REQUIRE_STORIES();
  const std::string tokenizer = write("tok512.bin", read_file(tok512_).substr(0, 1000));
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", stories_, "--tokenizer", tokenizer, "--file", text_}),
      {tokenizer, "truncated"}));
}

TEST_F(Cli, MissingModelOrADirectory) {
  const std::string missing = file("missing.gguf");
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", missing, "--file", text_}),
                                {missing, "cannot open", "No such file"}));
  EXPECT_TRUE(FailsWithOneError(run({"generate", "--model", dir_, "--prompt", "a"}),
                                {dir_, "not a regular file"}));
}

// ---------------------------------------------------------------------------
// --backend

// --backend cuda where it cannot run: a CPU-only build, or a machine without
// a CUDA device. One clear line and status 1 from every tool, never a crash;
// with a device, the run goes through and says where it ran.
TEST_F(Cli, BackendCudaWithoutDeviceIsAClearError) {
  const std::string model = write_gguf("tiny.gguf", TinyLlamaGguf());
  std::string text;
  for (int i = 0; i < 40; ++i) text += i % 3 ? "a " : "b ";
  const std::string text_file = write("ab.txt", text);
  const std::string requests =
      write("requests.jsonl", "{\"prompt\": \"a b\", \"max_tokens\": 2}\n");
  const std::vector<std::vector<std::string>> commands = {
      {"generate", "--model", model, "--prompt", "a b", "--max-tokens", "3", "--backend", "cuda"},
      {"perplexity", "--model", model, "--file", text_file, "--ctx", "8", "--backend", "cuda"},
      {"batch", "--model", model, "--input", requests, "--output", file("results.jsonl"),
       "--backend", "cuda"}};
  std::string expected = "--backend cuda: this build has no CUDA backend";
#if defined(XQ_HAVE_CUDA)
  std::string why_not;
  if (cuda::device_available(&why_not)) {
    for (const auto& args : commands) {
      const RunResult r = run(args);
      EXPECT_EQ(r.signal, 0) << args[0];
      EXPECT_EQ(r.exit_code, 0) << args[0] << ": " << r.err;
      EXPECT_NE(r.err.find("backend cuda, CUDA device 0"), std::string::npos) << r.err;
    }
    return;
  }
  expected = "--backend cuda: no CUDA device: ";
#endif
  for (const auto& args : commands) {
    const RunResult r = run(args);
    EXPECT_TRUE(FailsWithOneError(r, {expected})) << args[0];
    EXPECT_EQ(r.exit_code, 1) << args[0];
  }
}

TEST_F(Cli, BackendNamesAreChecked) {
  EXPECT_TRUE(FailsWithOneError(run({"generate", "--prompt", "a", "--backend", "gpu"}),
                                {"--backend must be 'cpu' or 'cuda', got 'gpu'"}));
  EXPECT_TRUE(FailsWithOneError(
      run({"generate", "--prompt", "a", "--backend", "cuda", "--device", "-1"}), {"--device"}));
}

// The default backend is the CPU, and the tools say so.
TEST_F(Cli, GenerateNamesItsBackend) {
  const std::string model = write_gguf("tiny.gguf", TinyLlamaGguf());
  const RunResult r =
      run({"generate", "--model", model, "--prompt", "a b", "--max-tokens", "2", "--threads", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("backend cpu, 1 thread(s)"), std::string::npos) << r.err;
}

// ---------------------------------------------------------------------------
// GGUF models: the tiny llama, broken one way at a time

// The control for everything below: unbroken, the tiny model loads and runs,
// so each failure is due to the one thing the test broke.
TEST_F(Cli, TinyGgufRuns) {
  const std::string model = write_gguf("tiny.gguf", TinyLlamaGguf());
  const RunResult generated =
      run({"generate", "--model", model, "--prompt", "a b", "--max-tokens", "3", "--ids"});
  EXPECT_EQ(generated.signal, 0);
  EXPECT_EQ(generated.exit_code, 0) << generated.err;
  std::string text;
  for (int i = 0; i < 40; ++i) text += i % 3 ? "a " : "b ";
  const std::string text_file = write("ab.txt", text);
  const RunResult scored = run({"perplexity", "--model", model, "--file", text_file, "--ctx", "8"});
  EXPECT_EQ(scored.signal, 0);
  EXPECT_EQ(scored.exit_code, 0) << scored.err;
  EXPECT_NE(scored.out.find("perplexity "), std::string::npos) << scored.out;
}

// The generated text alone on stdout, ended by a newline; the statistics on a
// line of their own on stderr, also when both go to one pipe.
TEST_F(Cli, GenerateKeepsTextAndStatisticsOnSeparateLines) {
  const std::string model = write_gguf("tiny.gguf", TinyLlamaGguf());
  const std::vector<std::string> args = {"generate", "--model",      model, "--prompt",
                                         "a b",      "--max-tokens", "3"};
  const RunResult apart = run(args);
  ASSERT_EQ(apart.exit_code, 0) << apart.err;
  EXPECT_EQ(apart.out.rfind("a b", 0), 0u) << apart.out;
  ASSERT_FALSE(apart.out.empty());
  EXPECT_EQ(apart.out.back(), '\n') << apart.out;
  EXPECT_EQ(apart.out.find("tokens/s"), std::string::npos) << apart.out;
  EXPECT_NE(apart.err.find("\nprompt "), std::string::npos) << apart.err;
  const RunResult merged = run(args, /*merge_streams=*/true);
  ASSERT_EQ(merged.exit_code, 0) << merged.out;
  const size_t stats = merged.out.find("prompt ");
  ASSERT_NE(stats, std::string::npos) << merged.out;
  ASSERT_GT(stats, 0u);
  EXPECT_EQ(merged.out[stats - 1], '\n') << "statistics glued to the text:\n" << merged.out;
}

TEST_F(Cli, GgufWithWrongMagic) {
  std::string image = as_string(TinyLlamaGguf().build());
  image[3] = 'X';
  const std::string model = write("magic.gguf", image);
  EXPECT_TRUE(FailsWithOneError(
      run({"perplexity", "--model", model, "--file", text_}),
      {model, "neither a GGUF file (no 'GGUF' magic) nor a llama2.c checkpoint"}));
}

// Where the cut lands decides which read fails first: a fixed-size field
// ("truncated file") or a length-prefixed string, array or tensor ("... runs
// past the end of the file"). Either way the message says so.
::testing::AssertionResult SaysTruncated(const RunResult& r, const std::string& model) {
  ::testing::AssertionResult one_error = FailsWithOneError(r, {model});
  if (!one_error) return one_error;
  if (r.err.find("truncated file") == std::string::npos &&
      r.err.find("past the end of the file") == std::string::npos) {
    return ::testing::AssertionFailure()
           << "the error does not say the file is cut short: " << r.err;
  }
  return ::testing::AssertionSuccess();
}

TEST_F(Cli, TruncatedGguf) {
  const std::string image = as_string(TinyLlamaGguf().build());
  // Cuts in every part of the file: the header, the metadata (a key, a value,
  // the token array), the tensor table, the tensor data.
  for (size_t length : {size_t{6}, size_t{30}, size_t{40}, size_t{300}, size_t{700},
                        image.size() / 2, image.size() - 1}) {
    const std::string model =
        write("cut" + std::to_string(length) + ".gguf", image.substr(0, length));
    EXPECT_TRUE(SaysTruncated(run({"perplexity", "--model", model, "--file", text_}), model))
        << "cut at " << length << " of " << image.size() << " bytes";
  }
  // A real vocabulary file cut in half, where shared/ has one.
  const std::string vocab = shared_path("tokenizer-vectors/ggml-vocab-llama-spm.gguf");
  if (testing::file_exists(vocab)) {
    const std::string whole = read_file(vocab);
    const std::string model = write("vocab-half.gguf", whole.substr(0, whole.size() / 2));
    EXPECT_TRUE(SaysTruncated(run({"perplexity", "--model", model, "--file", text_}), model));
  }
}

TEST_F(Cli, GgufNotALlamaModel) {
  const std::string vocab = shared_path("tokenizer-vectors/ggml-vocab-gpt-2.gguf");
  if (!testing::file_exists(vocab)) GTEST_SKIP() << vocab << " absent";
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", vocab, "--file", text_}),
                                {vocab, "architecture 'gpt2' is not supported"}));
}

TEST_F(Cli, GgufWithAbsurdDimensions) {
  struct Case {
    const char* name;
    void (*edit)(TinyLlamaGguf&);
    const char* problem;
  };
  const Case cases[] = {
      {"width", [](TinyLlamaGguf& m) { m.embedding_length = 1u << 30; }, "absurd embedding width"},
      {"width-overflow", [](TinyLlamaGguf& m) { m.embedding_length = 0xFFFFFFFFu; },
       "absurd value of 'llama.embedding_length'"},
      {"layers", [](TinyLlamaGguf& m) { m.block_count = 1u << 20; }, "absurd layer count"},
      {"heads", [](TinyLlamaGguf& m) { m.head_count = 0; }, "absurd head count"},
      {"ffn", [](TinyLlamaGguf& m) { m.feed_forward_length = 0; }, "absurd feed-forward width"},
      {"context", [](TinyLlamaGguf& m) { m.context_length = 0; }, "absurd context length"},
  };
  for (const Case& c : cases) {
    TinyLlamaGguf tiny;
    c.edit(tiny);
    const std::string model = write_gguf(std::string(c.name) + ".gguf", tiny);
    EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                  {model, c.problem}))
        << c.name;
  }
}

TEST_F(Cli, TensorWithAbsurdDimension) {
  TinyLlamaGguf tiny;
  tiny.find("token_embd.weight")->shape = {TinyLlamaGguf::kDim, uint64_t{1} << 41};
  const std::string model = write_gguf("huge.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "'token_embd.weight'", "absurd dimension"}));
}

TEST_F(Cli, TensorDataPastEndOfFile) {
  // The header is intact and promises more data than the file holds.
  const std::string image = as_string(TinyLlamaGguf().build());
  const std::string model = write("short.gguf", image.substr(0, image.size() - 16));
  EXPECT_TRUE(FailsWithOneError(run({"generate", "--model", model, "--prompt", "a"}),
                                {model, "data", "runs past the end of the file"}));
}

TEST_F(Cli, UnknownTensorType) {
  TinyLlamaGguf tiny;
  tiny.find("blk.0.attn_q.weight")->type = 99;
  const std::string model = write_gguf("type99.gguf", tiny);
  EXPECT_TRUE(
      FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                        {model, "'blk.0.attn_q.weight'", "unknown or unsupported type id 99"}));
}

TEST_F(Cli, QuantizedRowNotWholeBlocks) {
  TinyLlamaGguf tiny;
  tiny.find("blk.0.attn_q.weight")->type = 8;  // Q8_0: 32-value blocks, but rows hold 8
  const std::string model = write_gguf("q8.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "not a whole number of Q8_0 blocks"}));
}

TEST_F(Cli, MissingTensor) {
  TinyLlamaGguf tiny;
  tiny.remove("blk.0.ffn_down.weight");
  const std::string model = write_gguf("missing.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "missing tensor 'blk.0.ffn_down.weight'"}));
}

TEST_F(Cli, WrongTensorShape) {
  TinyLlamaGguf tiny;
  tiny.reshape("blk.0.attn_k.weight", {TinyLlamaGguf::kDim, 4});
  const std::string model = write_gguf("shape.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "'blk.0.attn_k.weight'", "shape 8 x 4", "expected 8 x 8"}));
}

TEST_F(Cli, VocabularyDisagreesWithEmbedding) {
  TinyLlamaGguf tiny;
  tiny.tokens.push_back("c");  // nine tokens, eight embedding rows
  const std::string model = write_gguf("vocab.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "'token_embd.weight'", "expected 8 x 9"}));
}

TEST_F(Cli, NormTensorNotF32) {
  TinyLlamaGguf tiny;
  TinyLlamaGguf::Tensor* norm = tiny.find("output_norm.weight");
  norm->type = 1;  // F16
  norm->bytes.resize(TinyLlamaGguf::kDim * 2);
  const std::string model = write_gguf("norm.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "'output_norm.weight' must be F32", "not F16"}));
}

TEST_F(Cli, GgufWithoutTokenizer) {
  TinyLlamaGguf tiny;
  tiny.tokens.clear();
  const std::string model = write_gguf("notokens.gguf", tiny);
  EXPECT_TRUE(FailsWithOneError(run({"perplexity", "--model", model, "--file", text_}),
                                {model, "tokenizer.ggml.tokens"}));
}

// ---------------------------------------------------------------------------
// Chat prompts

// `generate --chat` feeds the model the template's text for the message,
// special tokens and all: the same tokens as that text given as the prompt.
TEST_F(Cli, GenerateChatIsItsFormattedPrompt) {
  const std::string model = testing::models_path("SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!testing::file_exists(model)) GTEST_SKIP() << model << " absent (run launch/setup.sh)";
  const std::string formatted =
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
      "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
  const RunResult chat = run(
      {"generate", "--model", model, "--chat", "--prompt", "What is 2+2?", "--max-tokens", "8"});
  ASSERT_EQ(chat.exit_code, 0) << chat.err;
  EXPECT_EQ(chat.out.rfind(formatted, 0), 0u) << chat.out;
  EXPECT_GT(chat.out.size(), formatted.size() + 1) << chat.out;  // it generated text

  for (const std::vector<std::string>& system :
       {std::vector<std::string>{}, std::vector<std::string>{"--system", "Be brief."}}) {
    std::vector<std::string> chat_args = {"generate",     "--model",  model,
                                          "--chat",       "--prompt", "What is 2+2?",
                                          "--max-tokens", "8",        "--ids"};
    chat_args.insert(chat_args.end(), system.begin(), system.end());
    const std::string text =
        system.empty() ? formatted
                       : "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is "
                         "2+2?<|im_end|>\n<|im_start|>assistant\n";
    const RunResult by_chat = run(chat_args);
    const RunResult by_prompt = run({"generate", "--model", model, "--prompt", text,
                                     "--parse-special", "--max-tokens", "8", "--ids"});
    ASSERT_EQ(by_chat.exit_code, 0) << by_chat.err;
    ASSERT_EQ(by_prompt.exit_code, 0) << by_prompt.err;
    EXPECT_FALSE(by_chat.out.empty());
    EXPECT_EQ(by_chat.out, by_prompt.out);
  }
}

TEST_F(Cli, ChatTemplateErrors) {
  REQUIRE_STORIES();
  const std::vector<std::string> stories = {"generate",    "--model",      stories_,
                                            "--tokenizer", tok512_,        "--prompt",
                                            "Hi",          "--max-tokens", "4"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = stories;
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  };
  // A llama2.c model has no template: the error says how to choose one.
  EXPECT_TRUE(FailsWithOneError(run(with({"--chat"})), {"no chat template", "--chat-template"}));
  EXPECT_TRUE(FailsWithOneError(run(with({"--chat", "--chat-template", "vicuna"})),
                                {"'vicuna'", "chatml", "llama3", "llama2", "zephyr", "gemma"}));
  EXPECT_TRUE(FailsWithOneError(run(with({"--system", "S"})), {"--chat"}));
  EXPECT_TRUE(FailsWithOneError(run(with({"--chat", "--chat-template", "gemma", "--system", "S"})),
                                {"gemma", "system"}));
  const RunResult named = run(with({"--chat", "--chat-template", "zephyr"}));
  EXPECT_EQ(named.exit_code, 0) << named.err;
  EXPECT_EQ(named.out.rfind("<|user|>\nHi</s>\n<|assistant|>\n", 0), 0u) << named.out;
  // A template file of no known family.
  const std::string jinja = write("mistral.jinja", "{{ '[INST] ' + message['content'] }}");
  EXPECT_TRUE(FailsWithOneError(run({"chat-template", "--jinja", jinja, "--prompt", "Hi"}),
                                {"no known family", "\"{{ '[INST] '"}));
}

}  // namespace
}  // namespace xq
