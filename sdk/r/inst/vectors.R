#!/usr/bin/env Rscript
# Cross-language conformance with the golden vectors (schemas/vectors/), runnable
# without installing the package:
#
#   Rscript sdk/r/inst/vectors.R encode JSON_DIR OUT_DIR   # NAME.json -> OUT_DIR/NAME.bin
#   Rscript sdk/r/inst/vectors.R decode BIN_DIR OUT_DIR    # NAME.bin  -> OUT_DIR/NAME.json
#
# encode reads each JSON twin ({"type", "version", "body"[, "payloads"]}; payloads are
# not part of the header and are ignored) and writes the header built by the R encoder.
# decode writes the canonical form {"type", "version", "body"} of each header: every
# field present, enums as names, absent sub-tables null, absent strings "" and vectors [].
# Exits 1 when a file fails (the others are still written), 2 on a usage error.

load_ketch <- function() {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  here <- dirname(normalizePath(sub("^--file=", "", file_arg[1])))
  sources <- sort(list.files(file.path(here, "..", "R"), pattern = "\\.R$", full.names = TRUE))
  if (length(sources)) for (f in sources) sys.source(f, envir = globalenv())
  else suppressPackageStartupMessages(library(ketch))
}
load_ketch()

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 3 || !args[1] %in% c("encode", "decode")) {
  cat("usage: vectors.R encode JSON_DIR OUT_DIR | vectors.R decode BIN_DIR OUT_DIR\n", file = stderr())
  quit(status = 2)
}
mode <- args[1]
in_dir <- args[2]
out_dir <- args[3]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)
pattern <- if (mode == "encode") "\\.json$" else "\\.bin$"
files <- sort(list.files(in_dir, pattern = pattern, full.names = TRUE))
failed <- 0
for (path in files) {
  name <- sub(pattern, "", basename(path))
  ok <- tryCatch({
    if (mode == "encode") {
      text <- paste(readLines(path, encoding = "UTF-8", warn = FALSE), collapse = "\n")
      writeBin(ketch_encode(ketch_from_canonical(text)), file.path(out_dir, paste0(name, ".bin")))
    } else {
      frame <- readBin(path, "raw", n = file.size(path))
      text <- paste0(ketch_canonical_json(ketch_decode(frame)), "\n")
      writeBin(charToRaw(enc2utf8(text)), file.path(out_dir, paste0(name, ".json")))
    }
    TRUE
  }, error = function(e) {
    cat(sprintf("%s: %s\n", basename(path), conditionMessage(e)), file = stderr())
    FALSE
  })
  if (!ok) failed <- failed + 1
}
cat(sprintf("%s: %d file(s), %d failed\n", mode, length(files), failed))
quit(status = if (failed > 0) 1 else 0)
