# inst/vectors.R as the cross-language tests run it: a separate Rscript process.

run_vectors <- function(mode, from, to) {
  script <- ketch_script("vectors.R")
  if (is.na(script)) skip("vectors.R not found")
  out <- suppressWarnings(system2(file.path(R.home("bin"), "Rscript"), c(shQuote(script), mode, shQuote(from), shQuote(to)),
                                  stdout = TRUE, stderr = TRUE))
  status <- attr(out, "status")
  list(status = if (is.null(status)) 0L else status, output = paste(out, collapse = "\n"))
}

test_that("vectors.R decode writes the canonical twin of every golden vector", {
  out <- tempfile("decoded-")
  on.exit(unlink(out, recursive = TRUE))
  res <- run_vectors("decode", vectors_dir(), out)
  expect_identical(res$status, 0L, info = res$output)
  for (name in vector_names()) {
    twin <- read_twin(name)
    twin$payloads <- NULL
    expect_identical(jsonlite::fromJSON(file.path(out, paste0(name, ".json")), simplifyVector = FALSE), twin,
                     info = name)
  }
})

test_that("vectors.R encode writes headers that decode to the twins", {
  out <- tempfile("encoded-")
  on.exit(unlink(out, recursive = TRUE))
  res <- run_vectors("encode", vectors_dir(), out)
  expect_identical(res$status, 0L, info = res$output)
  for (name in vector_names()) {
    path <- file.path(out, paste0(name, ".bin"))
    twin <- read_twin(name)
    twin$payloads <- NULL
    expect_identical(as_tree(ketch_decode(readBin(path, "raw", file.size(path)))), twin, info = name)
  }
})

test_that("vectors.R reports bad input and usage errors", {
  dir <- tempfile("bad-")
  dir.create(dir)
  on.exit(unlink(dir, recursive = TRUE))
  writeBin(as.raw(1:5), file.path(dir, "junk.bin"))
  res <- run_vectors("decode", dir, file.path(dir, "out"))
  expect_identical(res$status, 1L)
  expect_match(res$output, "junk.bin")
  expect_identical(run_vectors("explode", dir, dir)$status, 2L)
})
