# The container acts on the broker's Error codes, never their text (protocol section 5), over
# real sockets: this process is the broker, inst/serve_example.R a child process.

with_sum_container <- function(fn) {
  b <- fake_broker()
  on.exit(broker_close(b), add = TRUE)
  child <- start_container(b$endpoint, "sum", c("--name", "sum", "--replica-id", "test/sum/0"))
  r_pid <- integer(0)
  on.exit(stop_container(child, r_pid), add = TRUE)
  hello <- broker_expect(b, "Hello", 30, child)
  r_pid <- hello$body$pid
  fn(b, child, hello)
}

serves <- function(b, child, identity, batch_id) {
  body <- list(batch_id = batch_id, model = "sum", model_version = "1", dtype = "FLOAT64", ndim = 1,
               shapes = 2, budgets_us = 1e6)
  broker_send(b, identity, "PredictRequest", body, list(f64(c(1, 2))))
  reply <- broker_expect(b, "PredictReply", 15, child)
  expect_identical(reply$body$batch_id, batch_id)
  expect_identical(reply$payloads[[1]], f64(3))
}

test_that("the Hello carries the fingerprint; CONFLICT means Hello again later, not the end", {
  with_sum_container(function(b, child, hello) {
    expect_match(hello$body$fingerprint, "^md5:[0-9a-f]{32}$")
    broker_send(b, hello$identity, "Error", list(code = "CONFLICT", message = "replica id live elsewhere"))
    again <- broker_expect(b, "Hello", 15, child)
    expect_false(identical(again$identity, hello$identity))  # a new connection
    expect_identical(again$body$replica_id, "test/sum/0")
    expect_identical(again$body$fingerprint, hello$body$fingerprint)
    expect_true(is.na(container_rc(child, 0)))
    broker_send(b, again$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
    serves(b, child, again$identity, 1)
  })
})

test_that("BAD_MESSAGE before the Welcome is no refusal, whatever its text; INVALID ends it", {
  with_sum_container(function(b, child, hello) {
    broker_send(b, hello$identity, "Error", list(code = "BAD_MESSAGE", message = "heartbeat from a stranger"))
    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
    serves(b, child, hello$identity, 1)
    # once welcomed, BAD_MESSAGE means Hello again whatever its text
    broker_send(b, hello$identity, "Error", list(code = "BAD_MESSAGE", message = "unknown peer"))
    again <- broker_expect(b, "Hello", 5, child)
    expect_identical(again$identity, hello$identity)  # the same socket
    broker_send(b, again$identity, "Error", list(code = "INVALID", message = "send Hello first: model"))
    rc <- container_rc(child, 15)
    expect_false(is.na(rc))
    expect_false(identical(rc, 0L))
    expect_match(container_log(child), "INVALID", fixed = TRUE)
  })
})

test_that("one item that is not a value of its type fails alone and the container lives", {
  b <- fake_broker()
  on.exit(broker_close(b), add = TRUE)
  child <- start_container(b$endpoint, "echo", c("--name", "echo", "--input-type", "json",
                                                 "--replica-id", "test/echo/0"))
  r_pid <- integer(0)
  on.exit(stop_container(child, r_pid), add = TRUE)
  hello <- broker_expect(b, "Hello", 30, child)
  r_pid <- hello$body$pid
  broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
  deep <- charToRaw(paste0(strrep("[", 100000), strrep("]", 100000)))
  payloads <- list(charToRaw("[1, 2]"), charToRaw("{\"a\": "), deep, as.raw(c(0x22, 0xff, 0x22)), charToRaw("7"))
  body <- list(batch_id = 1, model = "echo", model_version = "1", dtype = "JSON", ndim = 0,
               shapes = numeric(0), budgets_us = rep(1e6, 5))
  broker_send(b, hello$identity, "PredictRequest", body, payloads)
  reply <- broker_expect(b, "PredictReply", 15, child)
  expect_identical(vapply(reply$body$outputs, `[[`, "", "status"), c("OK", "ERROR", "ERROR", "ERROR", "OK"))
  expect_identical(vapply(reply$body$outputs[2:4], `[[`, "", "error"), rep("BAD_INPUT", 3))
  expect_identical(jsonlite::fromJSON(rawToChar(reply$payloads[[1]])), c(1L, 2L))
  expect_identical(rawToChar(reply$payloads[[5]]), "7")
  body$batch_id <- 2  # and it still serves
  broker_send(b, hello$identity, "PredictRequest", modifyList(body, list(budgets_us = 1e6)), list(charToRaw("3")))
  reply <- broker_expect(b, "PredictReply", 15, child)
  expect_identical(reply$body$batch_id, 2)
  expect_identical(rawToChar(reply$payloads[[1]]), "3")
  expect_true(is.na(container_rc(child, 0)))
})
