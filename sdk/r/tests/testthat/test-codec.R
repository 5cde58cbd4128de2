# The message codec against the golden vectors (schemas/vectors/) and its JSON form.

test_that("there are golden vectors for every message type", {
  types <- vapply(vector_names(), function(n) read_twin(n)$type, "")
  expect_setequal(unique(types), names(KETCH_BODIES))
})

test_that("every golden vector decodes equal to its JSON twin", {
  for (name in vector_names()) {
    twin <- read_twin(name)
    twin$payloads <- NULL
    expect_identical(as_tree(ketch_decode(read_vector(name))), twin, info = name)
  }
})

test_that("the canonical JSON text is laid out like the Python twins", {
  for (name in vector_names()) {
    lines <- readLines(file.path(vectors_dir(), paste0(name, ".json")), encoding = "UTF-8")
    cut <- grep('^  "payloads"', lines)
    want <- paste(c(lines[seq_len(cut - 1)], "}"), collapse = "\n")
    want <- sub("},\n}$", "}\n}", want)  # the body's closing brace loses its comma
    expect_identical(ketch_canonical_json(ketch_decode(read_vector(name))), want, info = name)
  }
})

test_that("every twin encoded by R decodes back equal", {
  for (name in vector_names()) {
    twin <- read_twin(name)
    header <- ketch_encode(ketch_from_canonical(twin))
    expect_identical(header[5:8], charToRaw("KTCH"), info = name)
    twin$payloads <- NULL
    expect_identical(as_tree(ketch_decode(header)), twin, info = name)
  }
})

test_that("fields equal to their default are left out of the buffer", {
  header <- ketch_encode("Hello", list(model = "m", credits = 2, deterministic = TRUE, max_batch = 0))
  root <- fb_root(header, "KTCH")
  body <- fb_get_table(root, 2L)
  spec <- names(KETCH_SPEC$Hello)
  for (field in c("credits", "deterministic", "max_batch", "pid", "sdk")) {
    expect_identical(fb_field(body, match(field, spec) - 1L), 0, info = field)
  }
  msg <- ketch_decode(header)
  expect_identical(msg$body$credits, 2)
  expect_true(msg$body$deterministic)
  expect_null(msg$body$input)
  expect_identical(msg$body$sdk, "")
})

test_that("ids up to 2^53 - 1 survive as doubles", {
  ids <- c(0, 1, 2^32 + 1, 2^53 - 1)
  msg <- ketch_decode(ketch_encode("Query", list(app = "a", request_ids = ids)))
  expect_identical(msg$body$request_ids, ids)
  expect_identical(ketch_decode(ketch_encode("PredictReply", list(batch_id = 2^53 - 1)))$body$batch_id, 2^53 - 1)
  expect_match(ketch_canonical_json(msg), "9007199254740991", fixed = TRUE)
})

test_that("bodies are checked before encoding", {
  expect_error(ketch_encode("Hello", list(modle = "x")), "no field")
  expect_error(ketch_encode("Nope", list()), "unknown message type")
  expect_error(ketch_encode("Tensor", list()), "unknown message type")
  expect_error(ketch_encode("Query", list(dtype = "FLOAT128")), "unknown dtype")
  expect_error(ketch_encode("Ready", list(credits = -1)), "does not fit")
})

test_that("version and unknown body types are reported", {
  header <- ketch_encode("Heartbeat", list(busy = TRUE), version = 7)
  expect_identical(ketch_decode(header)$version, 7)
  bad <- header
  root <- fb_root(bad, "KTCH")
  type_pos <- root$pos + fb_field(root, 1L)
  bad[type_pos + 1] <- as.raw(99)
  expect_error(ketch_decode(bad), class = "ketch_unknown_message")
})

test_that("truncated or corrupted headers fail cleanly", {
  set.seed(42)
  for (name in vector_names()) {
    frame <- read_vector(name)
    for (n in c(0, 4, 8, 12, length(frame) %/% 2, length(frame) - 1)) {
      res <- tryCatch(ketch_decode(frame[seq_len(n)]), error = function(e) e)
      # a short prefix may still hold a whole body whose children are past the cut
      expect_true(inherits(res, "ketch_decode_error") || is.list(res), info = paste(name, n))
    }
    for (i in 1:20) {
      bad <- frame
      at <- sample(length(bad), 3)
      bad[at] <- as.raw(sample(0:255, 3))
      res <- tryCatch(ketch_decode(bad), error = function(e) e)
      expect_true(inherits(res, "ketch_decode_error") || identical(names(res), c("type", "version", "body")),
                  info = paste(name, i, conditionMessage(res)))
    }
  }
})

test_that("a canonical message can be given as text, list or partial body", {
  msg <- ketch_from_canonical('{"type": "Ready", "version": 1, "body": {}}')
  expect_identical(msg, list(type = "Ready", version = 1, body = list(credits = 0)))
  msg <- ketch_from_canonical(list(type = "Heartbeat"))
  expect_identical(msg$body, list(busy = FALSE))
  expect_error(ketch_from_canonical(list(type = "Output")), "unknown message type")
})

test_that("json_float writes the shortest exact text", {
  expect_identical(json_float(1), "1.0")
  expect_identical(json_float(0.75), "0.75")
  expect_identical(json_float(0.1), "0.1")
  x <- fb_unpack(fb_pack(0.1, "f32"), "f32")
  expect_identical(as.numeric(json_float(x)), x)
  expect_identical(json_string("a\"b\\c\n\u0001\u00e9"), "\"a\\\"b\\\\c\\n\\u0001\u00e9\"")
})

test_that("a newer peer's messages decode to what this schema knows", {
  names <- sub("\\.bin$", "", list.files(file.path(vectors_dir(), "newer"), pattern = "\\.bin$"))
  expect_true(all(c("hello", "welcome", "predict_request", "predict_reply", "unknown_body") %in% names))
  for (name in names) {
    twin <- read_twin(file.path("newer", name))
    twin$payloads <- NULL
    frame <- read_vector(file.path("newer", name))
    if (!is.null(twin$error)) {
      err <- tryCatch(ketch_decode(frame), ketch_decode_error = function(e) e)
      expect_s3_class(err, "ketch_unknown_message")
      expect_identical(ketch_peek(frame), as.integer(c(twin$version, twin$body_type)), info = name)
    } else {
      expect_identical(as_tree(ketch_decode(frame)), twin, info = name)
    }
  }
  req <- ketch_read_request(read_vector(file.path("newer", "predict_request")))  # the hot path skips them too
  expect_identical(req[c("batch_id", "ndim", "shapes", "budgets_us")],
                   list(batch_id = 42, ndim = 1, shapes = c(2, 1), budgets_us = c(5e5, 5e5)))
})

test_that("messages are stamped with the version that brought them", {
  expect_identical(ketch_decode(ketch_encode("Paused", list(inflight = 2)))$version, 2)
  expect_identical(ketch_decode(ketch_encode("Ready", list(credits = 2)))$version, 1)
  expect_identical(ketch_decode(ketch_encode("Ready", list(), version = 2))$version, 2)
})
