#!/usr/bin/env Rscript
# Run the testthat suite without installing the package:
#
#   Rscript sdk/r/tests/run.R [FILTER]
#
# Sources sdk/r/R/*.R into one environment, runs tests/testthat/test-*.R in it and
# exits 1 when any expectation fails or errors (FILTER: a regular expression on the
# test file names, as testthat::test_dir's `filter`).

file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
here <- dirname(normalizePath(sub("^--file=", "", file_arg[1])))
root <- normalizePath(file.path(here, ".."))
env <- new.env(parent = globalenv())
for (f in sort(list.files(file.path(root, "R"), pattern = "\\.R$", full.names = TRUE))) {
  sys.source(f, envir = env)
}
options(ketch.sdk_root = root, testthat.progress.max_fails = Inf)
args <- commandArgs(trailingOnly = TRUE)
started <- proc.time()[["elapsed"]]
results <- testthat::test_dir(file.path(here, "testthat"), filter = if (length(args)) args[1] else NULL,
                              env = env, stop_on_failure = FALSE)
df <- as.data.frame(results)
bad <- sum(df$failed) + sum(df$error)
cat(sprintf("\nketch R tests: %d test(s), %d expectation(s), %d failed, %d error(s), %d skipped, %.1f s\n",
            nrow(df), sum(df$nb), sum(df$failed), sum(df$error), sum(df$skipped),
            proc.time()[["elapsed"]] - started))
quit(status = if (bad > 0) 1 else 0)
