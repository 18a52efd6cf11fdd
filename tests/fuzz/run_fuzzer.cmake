# Runs one libFuzzer target for a bounded time on a scratch copy of its seeds
# (ctest calls this; see CMakeLists.txt). Variables:
#   FUZZER, SCRATCH, SEEDS, SECONDS, MAX_LEN   required
#   DICT                                       optional libFuzzer dictionary
#   NEEDS_VOCABULARY, DEFAULT_SHARED_DIR       the tokenizer fuzzer's vocabularies
# Prints XQ_FUZZ_SKIPPED (which ctest reports as a skip) when data is missing.

set(fuzzer_args "")
if(NEEDS_VOCABULARY)
  if(DEFINED ENV{XQ_SHARED_DIR})
    set(shared_dir $ENV{XQ_SHARED_DIR})
  else()
    set(shared_dir ${DEFAULT_SHARED_DIR})
  endif()
  set(vocab_dir ${shared_dir}/tokenizer-vectors)
  foreach(vocab ggml-vocab-llama-spm.gguf ggml-vocab-gpt-2.gguf)
    if(NOT EXISTS ${vocab_dir}/${vocab})
      message("XQ_FUZZ_SKIPPED: ${vocab_dir}/${vocab} is absent")
      return()
    endif()
  endforeach()
  set(ENV{XQ_FUZZ_VOCAB_DIR} ${vocab_dir})
endif()

file(REMOVE_RECURSE ${SCRATCH})
file(MAKE_DIRECTORY ${SCRATCH}/corpus ${SCRATCH}/artifacts)
# Copies are made writable: libFuzzer adds to and may rewrite the corpus, and
# files copied from a read-only shared/ would keep its permissions.
file(COPY ${SEEDS}/ DESTINATION ${SCRATCH}/corpus FILE_PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
if(NEEDS_VOCABULARY)
  # llama.cpp's tokenizer test inputs, one file per vocabulary, are good texts to start from.
  file(GLOB vector_inputs ${vocab_dir}/*.inp)
  file(COPY ${vector_inputs} DESTINATION ${SCRATCH}/corpus FILE_PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
endif()
if(DICT)
  list(APPEND fuzzer_args -dict=${DICT})
endif()

# A stack trace for UBSan reports; leaks are real bugs here (everything the
# targets allocate per input is freed), so LeakSanitizer stays on.
set(ENV{UBSAN_OPTIONS} "print_stacktrace=1:halt_on_error=1")
execute_process(
  COMMAND ${FUZZER} -max_total_time=${SECONDS} -rss_limit_mb=2048 -timeout=20 -max_len=${MAX_LEN}
          -print_final_stats=1 -artifact_prefix=${SCRATCH}/artifacts/ ${fuzzer_args} ${SCRATCH}/corpus
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  file(GLOB artifacts ${SCRATCH}/artifacts/*)
  message(FATAL_ERROR "${FUZZER} failed (${result}). Input that triggered it: ${artifacts}\n"
                      "Replay it with: ${FUZZER} <that file>")
endif()
