// `xq client`: talks to an xquant server (a coordinator or a replica).
//
// By default streams one completion: the text to stdout as it arrives, a
// summary line to stderr (finish reason, tokens, the server's timings and the
// time to first token the client saw). --json prints one JSON object a line
// per stream message instead ({"request_id", "delta"|"finished"|"error"}).
// Other actions: --tokenize, --info, --load, --abort ID (JSON to stdout) and
// --wait-ready S (polls the health service until SERVING).
//
// Exit status: 0 for a finished stream (or a successful action), 1 for an
// error message, a non-OK RPC status (its code's name on stderr) or an
// interrupt (SIGINT/SIGTERM cancel the call), 2 for bad arguments.
#pragma once

namespace xq {

// The `xq client` command (argv after the command name).
int run_client(int argc, char** argv);

}  // namespace xq
