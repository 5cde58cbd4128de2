#!/usr/bin/env Rscript
# The entry point of Ketch's R model image: serve the model the environment names, as one
# replica of the broker at KETCH_BACKEND (run it under sigterm_to_sigint.sh so that SIGTERM
# drains).
#
#   KETCH_MODEL           an R script that defines predict_fn(inputs) (sourced in its own
#                         environment, with the working directory set to the script's folder,
#                         so it can readRDS() files beside it), or an .rds file holding such a
#                         function
#   KETCH_MODEL_FUNCTION  the function's name in the script (default predict_fn)
#   KETCH_MODEL_NAME      model name (default: the file name without its extension)
#   KETCH_MODEL_VERSION   default 1
#   KETCH_INPUT_TYPE      default float64; KETCH_INPUT_SHAPE default -1 ("" for none)
#   KETCH_BACKEND         default tcp://127.0.0.1:7000
#   KETCH_CREDITS, KETCH_MAX_BATCH, KETCH_NONDETERMINISTIC (true/1)
#   KETCH_REPLICA_ID      default host/name/version/random
#   KETCH_STATUS_FILE     the status file docker/ketch-probe reads

load_ketch <- function() {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  here <- dirname(normalizePath(sub("^--file=", "", file_arg[1])))
  sources <- sort(list.files(file.path(here, "..", "R"), pattern = "\\.R$", full.names = TRUE))
  if (length(sources)) for (f in sources) sys.source(f, envir = globalenv())
  else suppressPackageStartupMessages(library(ketch))
}
load_ketch()

env <- function(key, default = "") {
  v <- Sys.getenv(key, unset = NA)
  if (is.na(v)) default else v
}
fail <- function(...) {
  cat("error: ", ..., "\n", sep = "", file = stderr())
  quit(status = 64)
}

model_file <- env("KETCH_MODEL")
if (!nzchar(model_file)) fail("set KETCH_MODEL to an R script defining predict_fn, or an .rds function")
if (!file.exists(model_file)) fail("KETCH_MODEL ", model_file, ": no such file")
model_file <- normalizePath(model_file)
if (grepl("\\.rds$", model_file, ignore.case = TRUE)) {
  predict_fn <- readRDS(model_file)
} else {
  scope <- new.env(parent = globalenv())
  old <- setwd(dirname(model_file))
  sys.source(model_file, envir = scope)
  setwd(old)
  fn_name <- env("KETCH_MODEL_FUNCTION", "predict_fn")
  if (!exists(fn_name, envir = scope, inherits = FALSE)) fail(model_file, " defines no ", fn_name)
  predict_fn <- get(fn_name, envir = scope)
}
if (!is.function(predict_fn)) fail(model_file, ": the model is not a function")

input_type <- env("KETCH_INPUT_TYPE", "float64")
text <- toupper(input_type) %in% c("BYTES", "STRING", "JSON")
shape_text <- env("KETCH_INPUT_SHAPE", if (text) "" else "-1")
input_shape <- if (nzchar(shape_text)) as.numeric(strsplit(shape_text, "[,x]")[[1]]) else integer(0)
name <- env("KETCH_MODEL_NAME", sub("\\.[^.]*$", "", basename(model_file)))
replica_id <- env("KETCH_REPLICA_ID")
if (!nzchar(replica_id)) {
  # containers on the host's network share its hostname and pid 1: add a random part
  suffix <- if (file.exists("/proc/sys/kernel/random/uuid")) substr(readLines("/proc/sys/kernel/random/uuid"), 1, 6)
            else sprintf("%06x", sample.int(2^24, 1) - 1)
  replica_id <- paste(Sys.info()[["nodename"]], name, env("KETCH_MODEL_VERSION", "1"), suffix, sep = "/")
}

result <- tryCatch(
  ketch_serve(predict_fn, name = name, version = env("KETCH_MODEL_VERSION", "1"),
              input_type = input_type, input_shape = input_shape,
              broker = env("KETCH_BACKEND", "tcp://127.0.0.1:7000"),
              replica_id = replica_id,
              credits = as.numeric(env("KETCH_CREDITS", "2")),
              max_batch = as.numeric(env("KETCH_MAX_BATCH", "0")),
              deterministic = !tolower(env("KETCH_NONDETERMINISTIC", "false")) %in% c("1", "true", "yes")),
  ketch_refused = function(e) {
    cat(conditionMessage(e), "\n", file = stderr())
    quit(status = 2)
  })
