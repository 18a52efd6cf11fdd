// `xq coordinator`: the public Generation API in front of replicas
// (`xq worker --serve`), which register with it or are given with
// --replica. Runs until SIGINT or SIGTERM, then drains and exits 0.
#pragma once

namespace xq {

int run_coordinator(int argc, char** argv);

}  // namespace xq
