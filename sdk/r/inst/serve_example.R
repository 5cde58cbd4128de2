#!/usr/bin/env Rscript
# Example R model containers, runnable without installing the package:
#
#   Rscript sdk/r/inst/serve_example.R --broker tcp://127.0.0.1:7000 --name NAME \
#       --version V --kind KIND [--replica-id ID] [--input-type DTYPE] [--delay-ms MS]
#       [--delay-per-item-ms MS] [--fork auto|true|false]
#
# KIND: sum   float64 vector in, float64 scalar out (the sum)
#       echo  each input back with the batch's dtype (bytes, string, ...); declares
#             --input-type (default bytes) in its Hello
#       fail  always stop("boom"): every batch fails with "simpleError: boom"
#       noop  float64 vector in, the float64 scalar 0 out (for benchmarks)
#       pid   float64 vector in, the pid of the process that computed it out; sleeps the
#             largest first element of the batch's inputs, in ms, first (for tests of
#             where batches are computed)
# --delay-ms sleeps that long in predict before answering (to test heartbeats), and
# --delay-per-item-ms that long more for each input of the batch (a model of a given speed,
# for the scheduling benchmark).
# --fork: where predict runs (ketch_serve's fork): auto (the default) in this process when
# the model is known to be fast and in a worker process forked once otherwise; true always
# in the worker; false always here (no heartbeat while predict runs).

load_ketch <- function() {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  here <- dirname(normalizePath(sub("^--file=", "", file_arg[1])))
  sources <- sort(list.files(file.path(here, "..", "R"), pattern = "\\.R$", full.names = TRUE))
  if (!length(sources)) return(suppressPackageStartupMessages(library(ketch)))
  # from source: byte-compile now, as installing the package does, so that no function is
  # compiled on first use while the loop should be sending heartbeats
  env <- new.env()
  for (f in sources) sys.source(f, envir = env)
  for (name in ls(env)) {  # compiled where they look each other up, then made visible here
    f <- get(name, envir = env)
    if (is.function(f)) assign(name, compiler::cmpfun(f), envir = env)
  }
  for (name in ls(env)) assign(name, get(name, envir = env), envir = globalenv())
}
load_ketch()

parse_args <- function(args, defaults) {
  out <- defaults
  i <- 1
  while (i <= length(args)) {
    key <- sub("^--", "", args[i])
    if (!startsWith(args[i], "--") || !key %in% names(defaults) || i == length(args)) {
      stop("usage: serve_example.R --broker ADDR --name NAME --version V --kind sum|echo|fail ",
           "[--replica-id ID] [--input-type DTYPE] [--delay-ms MS] [--delay-per-item-ms MS] ",
           "[--fork auto|true|false]", call. = FALSE)
    }
    out[[key]] <- args[i + 1]
    i <- i + 2
  }
  out
}

opts <- parse_args(commandArgs(trailingOnly = TRUE),
                   list(broker = "tcp://127.0.0.1:7000", name = NA, version = "1", kind = NA,
                        `replica-id` = NA, `input-type` = NA, `delay-ms` = "0",
                        `delay-per-item-ms` = "0", fork = "auto"))
if (is.na(opts$name) || is.na(opts$kind)) stop("--name and --kind are required", call. = FALSE)
delay <- as.numeric(opts$`delay-ms`) / 1000
per_item <- as.numeric(opts$`delay-per-item-ms`) / 1000

kinds <- list(
  sum = list(type = "float64", shape = -1, predict = function(inputs) {
    lapply(inputs, function(x) sum(x))
  }),
  echo = list(type = "bytes", shape = integer(0), predict = function(inputs) {
    dtype <- attr(inputs, "dtype")
    lapply(inputs, function(x) ketch_tensor(x, dtype = dtype))
  }),
  fail = list(type = "float64", shape = -1, predict = function(inputs) stop("boom")),
  noop = list(type = "float64", shape = -1, predict = function(inputs) rep(0, length(inputs))),
  pid = list(type = "float64", shape = -1, predict = function(inputs) {
    wait <- max(0, vapply(inputs, function(x) x[1], 0))
    if (wait > 0) Sys.sleep(wait / 1000)
    rep(as.numeric(Sys.getpid()), length(inputs))
  })
)
kind <- kinds[[opts$kind]]
if (is.null(kind)) stop("unknown --kind ", opts$kind, "; one of sum, echo, fail, noop, pid", call. = FALSE)
input_type <- if (is.na(opts$`input-type`)) kind$type else opts$`input-type`
input_shape <- if (toupper(input_type) %in% c("BYTES", "STRING", "JSON")) integer(0) else kind$shape

predict <- function(inputs) {
  if (delay > 0 || per_item > 0) Sys.sleep(delay + per_item * length(inputs))
  kind$predict(inputs)
}

ketch_serve(predict, name = opts$name, version = opts$version, input_type = input_type,
            input_shape = input_shape, broker = opts$broker,
            replica_id = if (is.na(opts$`replica-id`)) NULL else opts$`replica-id`,
            fork = if (opts$fork == "auto") "auto" else as.logical(opts$fork))
