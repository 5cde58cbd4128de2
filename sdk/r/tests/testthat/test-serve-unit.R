# The pure parts of the container runtime (R/serve.R), without sockets.

test_that("a model error fails the whole batch with Class: message", {
  res <- ketch_run_predict(function(inputs) stop("boom"), list(1, 2))
  expect_false(res$ok)
  expect_identical(res$error, "MODEL_ERROR")
  expect_identical(res$message, "simpleError: boom")
  reply <- ketch_predict_reply(5, res)
  expect_identical(reply$payloads, list())
  msg <- ketch_decode(ketch_encode("PredictReply", reply$body))
  expect_identical(msg$body$outputs, list())
  expect_identical(msg$body$message, "simpleError: boom")
  custom <- ketch_run_predict(function(inputs) stop(ketch_condition("shape_error", "bad shape")), list(1))
  expect_identical(custom$message, "shape_error: bad shape")
})

test_that("a wrong number of outputs fails the whole batch", {
  res <- ketch_run_predict(function(inputs) list(1), list(1, 2))
  expect_false(res$ok)
  expect_match(res$message, "^BatchSizeError: predict_fn returned 1 outputs for a batch of 2")
  res <- ketch_run_predict(function(inputs) data.frame(a = 1:2), list(1, 2))
  expect_match(res$message, "^BatchSizeError")
})

test_that("one output per input, with per-item errors", {
  res <- ketch_run_predict(function(inputs) {
    list(sum(inputs[[1]]), simpleError("bad row"), function() 1, ketch_tensor(inputs[[4]], "float32"))
  }, list(c(1, 2), 0, 0, c(0.5, 2)))
  expect_true(res$ok)
  reply <- ketch_predict_reply(7, res)
  expect_identical(vapply(reply$body$outputs, `[[`, "", "status"), c("OK", "ERROR", "ERROR", "OK"))
  expect_identical(reply$body$outputs[[2]]$message, "simpleError: bad row")
  expect_identical(reply$body$outputs[[3]]$message, "simpleError: an output of class function cannot be sent")
  expect_identical(reply$payloads[[1]], f64(3))
  expect_identical(reply$payloads[[2]], raw(0))
  expect_identical(reply$payloads[[4]], writeBin(c(0.5, 2), raw(), size = 4, endian = "little"))
  msg <- ketch_decode(ketch_encode("PredictReply", reply$body))
  expect_identical(msg$body$outputs[[4]]$output, list(dtype = "FLOAT32", shape = 2))
  expect_null(msg$body$outputs[[2]]$output)
})

test_that("an atomic vector counts as one output per input", {
  res <- ketch_run_predict(function(inputs) vapply(inputs, sum, 0), list(1:2, 3:4))
  expect_true(res$ok)
  expect_identical(lapply(res$items, `[[`, "payload"), list(f64(3), f64(7)))
})

test_that("batch inputs are checked against frames and shapes", {
  body <- list(batch_id = 1, dtype = "FLOAT64", ndim = 1, shapes = c(2, 1), budgets_us = c(10, 10))
  inputs <- ketch_batch_inputs(body, list(f64(1:2), f64(3)))
  expect_identical(unclass(inputs)[1:2], list(c(1, 2), 3))
  expect_identical(attr(inputs, "dtype"), "FLOAT64")
  expect_identical(attr(inputs, "budgets_us"), c(10, 10))
  expect_error(ketch_batch_inputs(body, list(f64(1:2))), class = "ketch_bad_frames")
  expect_error(ketch_batch_inputs(modifyList(body, list(shapes = 2)), list(f64(1:2), f64(3))),
               class = "ketch_bad_frames")
  wrong <- ketch_batch_inputs(body, list(f64(1:2), f64(1:2)))  # item 1 alone is bad
  expect_identical(unclass(wrong)[1], list(c(1, 2)))
  expect_identical(attr(wrong, "budgets_us"), 10)
  expect_match(attr(wrong, "bad_items")[["2"]], "^item 1: payload of 16 bytes")
})

test_that("the fingerprint is a digest of predict_fn's source, or the build id", {
  f <- function(inputs) lapply(inputs, sum)
  g <- function(inputs) lapply(inputs, sum)
  h <- function(inputs) lapply(inputs, function(x) 2 * sum(x))
  fp <- ketch_fingerprint(f, build = "")
  expect_match(fp, "^md5:[0-9a-f]{32}$")
  expect_identical(ketch_fingerprint(g, build = ""), fp)  # the same code, the same fingerprint
  expect_false(identical(ketch_fingerprint(h, build = ""), fp))  # other code, another
  expect_identical(ketch_fingerprint(f, build = "2026-11-30.1"), "build:2026-11-30.1")
  for (bad in c("with space", strrep("x", 123), "caf\u00e9", "tab\t")) {
    expect_error(ketch_fingerprint(f, build = bad), "KETCH_BUILD_ID")
  }
  expect_identical(nchar(ketch_fingerprint(f, build = strrep("x", 122))), 128L)
})

test_that("an item that is not a value of its type fails alone; the others compute", {
  utf8 <- function(x) charToRaw(enc2utf8(x))
  deep <- charToRaw(paste0(strrep("[", 100000), strrep("]", 100000)))
  body <- list(batch_id = 3, dtype = "JSON", ndim = 0, shapes = numeric(0), budgets_us = c(1, 2, 3, 4, 5))
  inputs <- ketch_batch_inputs(body, list(utf8("[1, 2]"), utf8("[1,"), deep, as.raw(c(0x22, 0xff, 0x22)),
                                          utf8("{\"a\": 3}")))
  bad <- attr(inputs, "bad_items")
  expect_identical(names(bad), c("2", "3", "4"))
  expect_match(bad[["2"]], "^item 1: ")
  expect_match(bad[["3"]], "^item 2: ")
  expect_lte(nchar(bad[["3"]]), 320)
  expect_identical(attr(inputs, "budgets_us"), c(1, 5))
  expect_identical(unclass(inputs)[1:2], list(c(1L, 2L), list(a = 3L)))
  res <- ketch_merge_bad_items(ketch_run_predict(function(xs) lapply(xs, length), inputs), bad, 5)
  reply <- ketch_predict_reply(3, res)
  expect_identical(vapply(reply$body$outputs, `[[`, "", "status"), c("OK", "ERROR", "ERROR", "ERROR", "OK"))
  expect_identical(vapply(reply$body$outputs[2:4], `[[`, "", "error"), rep("BAD_INPUT", 3))
  # the model failing its batch fails the computed items; the bad ones keep BAD_INPUT
  failed <- ketch_merge_bad_items(ketch_run_predict(function(xs) stop("boom"), inputs), bad, 5)
  errors <- vapply(failed$items, `[[`, "", "error")
  expect_identical(errors, c("MODEL_ERROR", "BAD_INPUT", "BAD_INPUT", "BAD_INPUT", "MODEL_ERROR"))
  expect_identical(failed$items[[1]]$message, "simpleError: boom")
  # nothing bad: the result as it was
  ok <- ketch_run_predict(function(xs) lapply(xs, length), inputs)
  expect_identical(ketch_merge_bad_items(ok, list(), 2), ok)
})
