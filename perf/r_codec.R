#!/usr/bin/env Rscript
# The R SDK's hot-path codec against its generic codec, measured in the same run:
#
#   Rscript perf/r_codec.R
#
# For batches of 1, 8, 32 and 64 float64 items (4 elements each): reading a PredictRequest
# (the generic ketch_decode; the hot path the first time, a full read that learns the
# request as a template; the hot path on a learnt template), and writing the PredictReply
# of as many float64 scalars (the generic ketch_encode; the hot-path writer building it;
# the hot path on a learnt template); then a whole batch answered (a no-op model that
# returns one double per item), request in, reply frames out: the general way
# (ketch_answer_batch without its fast path) against the fast path (ketch_answer_fast).
# CPU microseconds per call: each try calls until it has used 0.1 s of CPU (user +
# system); the median of 5 tries.

file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
here <- dirname(normalizePath(sub("^--file=", "", file_arg[1])))
env <- new.env()
for (f in sort(list.files(file.path(here, "..", "sdk", "r", "R"), "\\.R$", full.names = TRUE))) {
  sys.source(f, envir = env)
}
for (name in ls(env)) {  # compiled, as an installed package is
  f <- get(name, envir = env)
  if (is.function(f)) assign(name, compiler::cmpfun(f), envir = env)
}
cpu_s <- function() {
  t <- proc.time()
  t[["user.self"]] + t[["sys.self"]]
}

cpu_us <- function(fn) {
  fn()
  tries <- vapply(1:5, function(k) {
    calls <- 0
    start <- cpu_s()
    while (cpu_s() - start < 0.1) {
      for (i in 1:10) fn()
      calls <- calls + 10
    }
    (cpu_s() - start) / calls * 1e6
  }, 0)
  stats::median(tries)
}

rows <- list()
with(env, {
  for (n in c(1, 8, 32, 64)) {
    request <- ketch_encode("PredictRequest", list(batch_id = 2^40 + 7, model = "m", model_version = "1",
                                                   dtype = "FLOAT64", ndim = 1, shapes = rep(4, n),
                                                   budgets_us = rep(1e6, n)))
    outputs <- ketch_encode_outputs(rep(0.5, n))
    generic <- ketch_predict_reply(2^40 + 7, list(ok = TRUE, outputs = outputs, compute_us = 12))$body
    frames <- c(list(request), rep(list(writeBin(c(5.1, 3.5, 1.4, 0.2), raw(), endian = "little")), n))
    noop <- function(inputs) rep(0, length(inputs))
    ketch_read_request(request)
    t <- ketch_request_template(request)
    stopifnot(!is.null(ketch_answer_fast(noop, frames, t)))
    rows[[length(rows) + 1]] <<- data.frame(
      items = n,
      read_generic_us = cpu_us(function() ketch_decode(request)),
      read_learning_us = cpu_us(function() {
        rm(list = ls(KETCH_REQUEST_TEMPLATES), envir = KETCH_REQUEST_TEMPLATES)
        ketch_read_request(request)
      }),
      read_template_us = cpu_us(function() ketch_read_request(request)),
      write_generic_us = cpu_us(function() ketch_encode("PredictReply", generic)),
      write_build_us = cpu_us(function() ketch_build_reply(2^40 + 7, 12, outputs, "NONE", "")),
      write_template_us = cpu_us(function() ketch_write_reply(2^40 + 7, 12, outputs)),
      answer_general_us = cpu_us(function() ketch_answer_batch(noop, frames, NULL)),
      answer_fast_us = cpu_us(function() ketch_answer_fast(noop, frames, t))
    )
  }
})
table <- do.call(rbind, rows)
cat(sprintf("R %s, %s\n", getRversion(), format(Sys.time(), "%Y-%m-%d %H:%M UTC", tz = "UTC")))
print(format(table, digits = 3), row.names = FALSE, width = 200)
