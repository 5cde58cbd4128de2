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
  expect_identical(res$outputs$payloads, list(f64(3), f64(7)))
  ints <- ketch_run_predict(function(inputs) lapply(inputs, length), list(1:2, 3:5))
  expect_identical(ints$outputs$payloads, lapply(2:3, function(v) writeBin(v, raw(), size = 4L, endian = "little")))
  expect_identical(ints$outputs$tensors, list(list(dtype = 3, shape = numeric(0))))
  na <- ketch_run_predict(function(inputs) c(1L, NA), list(1, 2))
  expect_identical(na$outputs$ok, c(TRUE, FALSE))
  expect_match(na$outputs$message[2], "cannot hold NA")
})

test_that("batch inputs are checked against frames and shapes; a bad payload fails its item only", {
  body <- list(batch_id = 1, dtype = "FLOAT64", ndim = 1, shapes = c(2, 1), budgets_us = c(10, 10))
  inputs <- ketch_batch_inputs(body, list(f64(1:2), f64(3)))
  expect_identical(unclass(inputs)[1:2], list(c(1, 2), 3))
  expect_identical(attr(inputs, "dtype"), "FLOAT64")
  expect_identical(attr(inputs, "budgets_us"), c(10, 10))
  expect_identical(attr(inputs, "errors"), c(NA_character_, NA_character_))
  expect_error(ketch_batch_inputs(body, list(f64(1:2))), class = "ketch_bad_frames")
  expect_error(ketch_batch_inputs(modifyList(body, list(shapes = 2)), list(f64(1:2), f64(3))),
               class = "ketch_bad_frames")
  expect_error(ketch_batch_inputs(modifyList(body, list(dtype = 99)), list(f64(1:2), f64(3))),
               class = "ketch_bad_frames")
  bad <- ketch_batch_inputs(body, list(f64(1:2), f64(1:2)))
  expect_match(attr(bad, "errors")[2], "item 1: payload of 16 bytes")
  expect_null(bad[[2]])
  seen <- NULL
  res <- ketch_run_predict(function(inputs) {
    seen <<- inputs
    vapply(inputs, sum, 0)
  }, bad, attr(bad, "errors"))
  expect_identical(unclass(seen)[1], list(c(1, 2)))
  expect_identical(attr(seen, "budgets_us"), 10)
  expect_identical(res$outputs$ok, c(TRUE, FALSE))
  expect_identical(res$outputs$error[2], KETCH_ERROR_CODES[["BAD_INPUT"]])
  expect_identical(res$outputs$payloads, list(f64(3), raw(0)))
})

test_that("whole-batch decoding gives what one payload at a time gives", {
  for (dtype in c("FLOAT64", "FLOAT32", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
                  "UINT32", "UINT64", "BOOL")) {
    n <- sample(1:20, 1)
    lens <- sample(0:6, n, replace = TRUE)
    values <- lapply(lens, function(k) {
      v <- sample(0:100, k, replace = TRUE)
      if (dtype == "BOOL") v %% 2 == 1 else v
    })
    payloads <- lapply(values, function(v) ketch_value_to_payload(ketch_tensor(v, dtype, length(v)))$payload)
    got <- ketch_batch_values(dtype, 1, lens, payloads)
    want <- lapply(seq_len(n), function(i) ketch_payload_to_value(dtype, lens[i], payloads[[i]]))
    expect_identical(got$values, want, info = dtype)
    expect_true(all(is.na(got$errors)))
    scalars <- ketch_batch_values(dtype, 0, numeric(0), lapply(payloads[lens > 0], function(p) p[seq_len(KETCH_ITEMSIZE[[dtype]])]))
    expect_identical(lengths(scalars$values), rep(1L, sum(lens > 0)), info = dtype)
  }
})

test_that("the hot-path request reader agrees with the generic decoder", {
  for (k in 1:20) {
    n <- sample(1:70, 1)
    ndim <- sample(0:3, 1)
    body <- list(batch_id = sample(2^40, 1), model = "m", model_version = "v9", dtype = sample(names(KETCH_DTYPES), 1),
                 ndim = ndim, shapes = sample(0:9, n * ndim, replace = TRUE),
                 budgets_us = c(sample(1e6, n - 1, replace = TRUE), 4294967295))
    frame <- ketch_encode("PredictRequest", body)
    fast <- ketch_read_request(frame)
    slow <- ketch_decode(frame)$body
    expect_identical(fast[c("batch_id", "dtype", "ndim", "shapes", "budgets_us")],
                     slow[c("batch_id", "dtype", "ndim", "shapes", "budgets_us")])
    expect_equal(ketch_peek(frame), c(1, KETCH_BODIES[["PredictRequest"]]))
  }
  expect_error(ketch_read_request(ketch_encode("Ready", list(credits = 1))), class = "ketch_decode_error")
  expect_error(ketch_read_request(as.raw(1:40)), class = "ketch_decode_error")
  frame <- ketch_encode("PredictRequest", list(batch_id = 3, budgets_us = 1:5))
  for (cut in c(12, 20, 30, length(frame) - 8)) {
    expect_error(ketch_read_request(frame[seq_len(cut)]), class = "ketch_decode_error")
  }
  expect_null(ketch_peek(charToRaw("not a flatbuffer")))
})

test_that("the hot-path reply writer gives what the generic encoder gives", {
  outputs_of <- function(values) ketch_encode_outputs(values)
  cases <- list(
    as.list(rnorm(64)),
    rnorm(3),
    list(1L, 2L, NA),
    list("a", c(1, 2), simpleError("bad row"), ketch_tensor(matrix(1:6, 2), "int64"), NULL, TRUE, raw(3)),
    list(ketch_tensor(c(1, 2), "float32"), ketch_tensor(c(3, 4), "float32"), "x", "été")
  )
  for (values in cases) {
    o <- outputs_of(values)
    result <- list(ok = TRUE, outputs = o, compute_us = 4294967295)
    batch_id <- 2^52 + 7
    fast <- ketch_decode(ketch_write_reply(batch_id, result$compute_us, o))
    generic <- ketch_predict_reply(batch_id, result)
    slow <- ketch_decode(ketch_encode("PredictReply", generic$body))
    expect_identical(fast, slow)
  }
  fast <- ketch_decode(ketch_write_reply(9, 12, NULL, "BAD_MESSAGE", "frames do not add up"))
  slow <- ketch_decode(ketch_encode("PredictReply", list(batch_id = 9, compute_us = 12, error = "BAD_MESSAGE",
                                                          message = "frames do not add up")))
  expect_identical(fast, slow)
  expect_identical(ketch_decode(ketch_write_reply(0, 0, NULL))$body$outputs, list())
})

test_that("a batch is answered end to end by ketch_answer_batch", {
  req <- ketch_encode("PredictRequest", list(batch_id = 77, dtype = "FLOAT64", ndim = 1, shapes = c(2, 3, 1),
                                             budgets_us = c(1, 1, 1)))
  frames <- ketch_answer_batch(function(inputs) vapply(inputs, sum, 0), list(req, f64(1:2), f64(c(1, 1, 1)), raw(3)))
  reply <- ketch_decode(frames[[1]])$body
  expect_identical(reply$batch_id, 77)
  expect_identical(vapply(reply$outputs, `[[`, "", "status"), c("OK", "OK", "ERROR"))
  expect_identical(reply$outputs[[3]]$error, "BAD_INPUT")
  expect_identical(frames[-1], list(f64(3), f64(3), raw(0)))
  unknown <- ketch_decode(ketch_answer_batch(identity, list(
    ketch_encode("PredictRequest", list(batch_id = 5, dtype = 42, ndim = 0, budgets_us = 1)), raw(8)))[[1]])$body
  expect_identical(unknown$error, "BAD_MESSAGE")
  expect_match(unknown$message, "unknown dtype 42")
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
  errors <- attr(inputs, "errors")
  expect_identical(which(!is.na(errors)), 2:4)
  expect_match(errors[2], "^item 1: ")
  expect_match(errors[3], "^item 2: ")  # R's own protection-stack error, caught
  expect_lte(nchar(errors[3]), 320)
  expect_match(errors[4], "^item 3: .*UTF-8")
  seen <- NULL
  res <- ketch_run_predict(function(xs) {
    seen <<- xs
    lapply(xs, length)
  }, inputs, errors)
  expect_identical(unclass(seen)[1:2], list(c(1L, 2L), list(a = 3L)))
  expect_identical(attr(seen, "budgets_us"), c(1, 5))
  reply <- ketch_predict_reply(3, res)
  expect_identical(vapply(reply$body$outputs, `[[`, "", "status"), c("OK", "ERROR", "ERROR", "ERROR", "OK"))
  expect_identical(vapply(reply$body$outputs[2:4], `[[`, "", "error"), rep("BAD_INPUT", 3))
  # the model failing its batch fails the computed items; the bad ones keep BAD_INPUT
  for (fn in list(function(xs) stop("boom"), function(xs) list(1))) {
    failed <- ketch_run_predict(fn, inputs, errors)
    expect_true(failed$ok)
    reply <- ketch_predict_reply(3, failed)
    expect_identical(vapply(reply$body$outputs, `[[`, "", "error"),
                     c("MODEL_ERROR", "BAD_INPUT", "BAD_INPUT", "BAD_INPUT", "MODEL_ERROR"))
    expect_identical(reply$body$outputs[[2]]$message, errors[2])
    # the hot-path writer says the same
    written <- ketch_decode(ketch_write_reply(3, failed$compute_us, failed$outputs))$body
    expect_identical(written$outputs, ketch_decode(ketch_encode("PredictReply", reply$body))$body$outputs)
  }
  expect_identical(ketch_run_predict(function(xs) stop("boom"), inputs, errors)$outputs$message[1],
                   "simpleError: boom")
  # every item bad: predict_fn is not called, each item answers BAD_INPUT
  all_bad <- ketch_batch_inputs(modifyList(body, list(budgets_us = 1)), list(utf8("{")))
  called <- FALSE
  res <- ketch_run_predict(function(xs) { called <<- TRUE; list() }, all_bad, attr(all_bad, "errors"))
  expect_false(called)
  expect_identical(res$outputs$error, KETCH_ERROR_CODES[["BAD_INPUT"]])
})

test_that("a batch that matches a fast-path template but has a bad item fails that item alone", {
  req <- function(id) ketch_encode("PredictRequest", list(batch_id = id, dtype = "FLOAT64", ndim = 1,
                                                           shapes = c(2, 2, 2), budgets_us = c(1, 2, 3)))
  sum_fn <- function(inputs) vapply(inputs, sum, 0)
  ok <- ketch_answer_batch(sum_fn, list(req(1), f64(1:2), f64(3:4), f64(5:6)))  # learns the template
  t <- ketch_request_template(req(2))
  expect_false(is.null(t$fast))
  expect_identical(ok[-1], list(f64(3), f64(7), f64(11)))
  for (fn in list(sum_fn, function(inputs) stop("boom"))) {
    frames <- ketch_answer_batch(fn, list(req(2), f64(1:2), raw(3), f64(5:6)), t)
    reply <- ketch_decode(frames[[1]])$body
    expect_identical(reply$batch_id, 2)
    expect_identical(reply$outputs[[2]]$error, "BAD_INPUT")
    expect_match(reply$outputs[[2]]$message, "^item 1: payload of 3 bytes")
  }
  frames <- ketch_answer_batch(sum_fn, list(req(3), f64(1:2), raw(3), f64(5:6)), t)
  expect_identical(frames[-1], list(f64(3), raw(0), f64(11)))
  # a frame missing: the whole batch is BAD_MESSAGE, nothing computed
  short <- ketch_decode(ketch_answer_batch(sum_fn, list(req(4), f64(1:2), f64(5:6)), t)[[1]])$body
  expect_identical(short$error, "BAD_MESSAGE")
  expect_identical(short$batch_id, 4)
})
