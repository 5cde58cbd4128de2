# The container runtime over real sockets: this process is the broker (a ROUTER on a
# free port) and inst/serve_example.R runs as a child process. Every wait is bounded;
# every child is killed by pid at the end, whatever happened.
#
# The tests assert what arrives and in what order, not how fast: on a busy machine this
# process or the container may stall for a second or more. Waits are generous bounds on
# something that must come (WAIT_S); the only time bounds asserted are the protocol's own
# (a container is never silent for as long as the broker waits before declaring it dead).

WAIT_S <- 60

with_container <- function(kind, args, fn, wrapper = FALSE) {
  b <- fake_broker()
  on.exit(broker_close(b), add = TRUE)
  child <- start_container(b$endpoint, kind, args, wrapper = wrapper)
  r_pid <- integer(0)
  on.exit(stop_container(child, r_pid), add = TRUE)
  hello <- broker_expect(b, "Hello", 2 * WAIT_S, child)
  r_pid <- hello$body$pid
  fn(b, child, hello)
}

predict_request <- function(batch_id, dtype, shapes, ndim = 1) {
  n <- if (ndim == 0) length(shapes) else length(shapes) / ndim
  list(batch_id = batch_id, model = "m", model_version = "1", dtype = dtype, ndim = ndim,
       shapes = if (ndim == 0) numeric(0) else shapes, budgets_us = rep(1e6, n))
}

test_that("Hello, Welcome, a batch, idle heartbeats, then Shutdown and Goodbye", {
  with_container("sum", c("--name", "sum-model", "--version", "3", "--replica-id", "test/sum/0"),
                 function(b, child, hello) {
    expect_identical(hello$version, 1)
    expect_identical(hello$body$versions, c(1, 2))
    expect_identical(hello$payloads, list())
    expect_identical(hello$body[c("model", "model_version", "sdk", "replica_id", "credits", "max_batch",
                                  "deterministic", "pid")],
                     list(model = "sum-model", model_version = "3", sdk = "r/0.1.0",
                          replica_id = "test/sum/0", credits = 2, max_batch = 0, deterministic = TRUE,
                          pid = as.numeric(child$pid)))
    expect_identical(hello$body$input, list(dtype = "FLOAT64", shape = -1))

    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 150, dead_after_ms = 10000))
    x <- list(runif(3), runif(5) * 100, rnorm(1))
    batch_id <- 2^40 + sample(1000, 1)
    broker_send(b, hello$identity, "PredictRequest", predict_request(batch_id, "FLOAT64", c(3, 5, 1)),
                lapply(x, f64))
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(reply$body$batch_id, batch_id)
    expect_identical(reply$body$error, "NONE")
    expect_length(reply$body$outputs, 3)
    for (i in 1:3) {
      expect_identical(reply$body$outputs[[i]]$status, "OK")
      expect_identical(reply$body$outputs[[i]]$output, list(dtype = "FLOAT64", shape = numeric(0)))
      expect_equal(fb_unpack(reply$payloads[[i]], "f64"), sum(x[[i]]))
    }
    # compute_us in microseconds, not in steps of a millisecond: of ten short batches (the
    # first ones the general way, later ones through learnt templates) some are not whole ms
    compute_us <- vapply(seq_len(10), function(k) {
      broker_send(b, hello$identity, "PredictRequest", predict_request(100 + k, "FLOAT64", 2), list(f64(c(k, 1))))
      r <- broker_expect(b, "PredictReply", WAIT_S, child)
      expect_equal(fb_unpack(r$payloads[[1]], "f64"), k + 1)
      r$body$compute_us
    }, 0)
    expect_true(any(compute_us %% 1000 != 0), info = paste(compute_us, collapse = " "))
    hb <- broker_expect(b, "Heartbeat", WAIT_S, child)
    expect_false(hb$body$busy)  # idle: the batch is answered

    broker_send(b, hello$identity, "Shutdown", list(reason = "test over"))
    ready <- broker_expect(b, "Ready", WAIT_S, child)
    expect_identical(ready$body$credits, 0)
    bye <- broker_expect(b, "Goodbye", WAIT_S, child)
    expect_identical(bye$body$reason, "drained")
    expect_identical(container_rc(child, WAIT_S), 0L)
  })
})

test_that("heartbeats flow during a slow predict; Hello again on request and after silence; SIGINT drains", {
  with_container("sum", c("--name", "slow", "--replica-id", "test/slow/0", "--delay-ms", "2500"),
                 function(b, child, hello) {
    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 100, dead_after_ms = 10000))
    sent_at <- proc.time()[["elapsed"]]
    broker_send(b, hello$identity, "PredictRequest", predict_request(11, "FLOAT64", 2), list(f64(c(1, 2))))
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(fb_unpack(reply$payloads[[1]], "f64"), 3)
    expect_gte(reply$body$compute_us, 2.4e6)
    busy <- Filter(function(m) m$type == "Heartbeat" && m$body$busy, attr(reply, "skipped"))
    expect_gte(length(busy), 1)  # heartbeats, busy, while the batch computed (about 25 at 100 ms)
    times <- c(sent_at, vapply(busy, `[[`, 0, "at"), reply$at)
    # never silent for as long as the broker waits before declaring it dead (dead_after_ms)
    expect_lt(max(diff(times)), 10)

    # a broker that lost this connection asks for Hello: same socket, same replica id
    broker_send(b, hello$identity, "Error", list(code = "BAD_MESSAGE", message = "send Hello first"))
    again <- broker_expect(b, "Hello", WAIT_S, child)
    expect_identical(again$identity, hello$identity)
    expect_identical(again$body$replica_id, "test/slow/0")

    # a broker that goes silent: the container reconnects (a new identity) and says Hello
    broker_send(b, again$identity, "Welcome", list(heartbeat_ms = 100, dead_after_ms = 700))
    silent_from <- proc.time()[["elapsed"]]
    third <- broker_expect(b, "Hello", WAIT_S, child)
    expect_false(identical(third$identity, hello$identity))
    expect_identical(third$body$replica_id, "test/slow/0")
    expect_gt(third$at - silent_from, 0.6)

    broker_send(b, third$identity, "Welcome", list(heartbeat_ms = 100, dead_after_ms = 10000))
    hb <- broker_expect(b, "Heartbeat", WAIT_S, child)
    tools::pskill(hello$body$pid, tools::SIGINT)
    ready <- broker_expect(b, "Ready", WAIT_S, child)
    expect_identical(ready$body$credits, 0)
    expect_identical(ready$identity, third$identity)
    broker_expect(b, "Goodbye", WAIT_S, child)
    expect_identical(container_rc(child, WAIT_S), 0L)
  })
})

test_that("a failing model gets MODEL_ERROR and keeps serving; UNSUPPORTED_VERSION stops it", {
  with_container("fail", c("--name", "bad", "--replica-id", "test/fail/0"), function(b, child, hello) {
    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
    for (batch_id in c(21, 22)) {
      broker_send(b, hello$identity, "PredictRequest", predict_request(batch_id, "FLOAT64", c(2, 1)),
                  list(f64(1:2), f64(3)))
      reply <- broker_expect(b, "PredictReply", WAIT_S, child)
      expect_identical(reply$body$batch_id, batch_id)
      expect_identical(reply$body$outputs, list())
      expect_identical(reply$body$error, "MODEL_ERROR")
      expect_identical(reply$body$message, "simpleError: boom")
      expect_identical(reply$payloads, list())
    }
    # a message in a version it does not speak is answered, not acted on
    broker_send(b, hello$identity, "Shutdown", list(reason = "from the future"), version = 3)
    err <- broker_expect(b, "Error", WAIT_S, child)
    expect_identical(err$body$code, "UNSUPPORTED_VERSION")
    expect_match(err$body$message, "version 3 is not supported (speaks 1, 2)", fixed = TRUE)
    skipped <- vapply(attr(err, "skipped"), `[[`, "", "type")
    expect_false(any(skipped %in% c("Ready", "Goodbye")))

    broker_send(b, hello$identity, "Error", list(code = "UNSUPPORTED_VERSION", message = "speaks 2"))
    rc <- container_rc(child, WAIT_S)
    expect_false(is.na(rc))
    expect_false(identical(rc, 0L))
    expect_match(container_log(child), "refused", fixed = TRUE)
  })
})

test_that("echo returns bytes, strings and JSON with their dtype; bad frames and types get errors", {
  with_container("echo", c("--name", "echo", "--input-type", "string", "--replica-id", "test/echo/0"),
                 function(b, child, hello) {
    expect_identical(hello$body$input, list(dtype = "STRING", shape = numeric(0)))
    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
    texts <- c("h\u00e9llo w\u00f6rld", "", "\u65e5\u672c")
    broker_send(b, hello$identity, "PredictRequest", predict_request(31, "STRING", rep(0, 3), ndim = 0),
                lapply(texts, function(s) charToRaw(enc2utf8(s))))
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(vapply(reply$body$outputs, function(o) o$output$dtype, ""), rep("STRING", 3))
    expect_identical(vapply(reply$payloads, ketch_utf8, ""), texts)

    blobs <- list(as.raw(sample(0:255, 64, replace = TRUE)), raw(0), as.raw(0))
    broker_send(b, hello$identity, "PredictRequest", predict_request(32, "BYTES", rep(0, 3), ndim = 0), blobs)
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(vapply(reply$body$outputs, function(o) o$output$dtype, ""), rep("BYTES", 3))
    expect_identical(reply$payloads, blobs)

    doc <- '{"a":[1,2],"b":"x"}'
    broker_send(b, hello$identity, "PredictRequest", predict_request(33, "JSON", 0, ndim = 0), list(charToRaw(doc)))
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(reply$body$outputs[[1]]$output$dtype, "JSON")
    expect_identical(jsonlite::fromJSON(rawToChar(reply$payloads[[1]])), jsonlite::fromJSON(doc))

    # two items, one payload frame: the whole batch fails, the container carries on
    broker_send(b, hello$identity, "PredictRequest", predict_request(34, "BYTES", rep(0, 2), ndim = 0), list(raw(1)))
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(reply$body$batch_id, 34)
    expect_identical(reply$body$error, "BAD_MESSAGE")
    expect_identical(reply$body$outputs, list())

    broker_send(b, hello$identity, "Query", list(app = "x"))
    err <- broker_expect(b, "Error", WAIT_S, child)
    expect_identical(err$body$code, "UNKNOWN_MESSAGE")
    pbdZMQ::zmq.send.multipart(b$sock, list(hello$identity, charToRaw("not a flatbuffer")), serialize = FALSE)
    err <- broker_expect(b, "Error", WAIT_S, child)
    expect_identical(err$body$code, "BAD_MESSAGE")

    broker_send(b, hello$identity, "PredictRequest", predict_request(35, "BYTES", 0, ndim = 0), list(as.raw(7)))
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(reply$payloads, list(as.raw(7)))
  })
})

test_that("SIGTERM through sigterm_to_sigint.sh drains: Ready{0}, the held batch, then Goodbye", {
  with_container("sum", c("--name", "term", "--replica-id", "test/term/0", "--delay-ms", "3000"), wrapper = TRUE,
                 function(b, child, hello) {
    expect_false(identical(hello$body$pid, as.numeric(child$pid)))  # the wrapper is the parent
    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 100, dead_after_ms = 10000))
    broker_send(b, hello$identity, "PredictRequest", predict_request(41, "FLOAT64", 1), list(f64(2)))
    hb <- broker_expect(b, "Heartbeat", WAIT_S, child)
    while (!hb$body$busy) hb <- broker_expect(b, "Heartbeat", WAIT_S, child)  # idle ones came first
    expect_true(hb$body$busy)
    tools::pskill(child$pid, tools::SIGTERM)
    ready <- broker_expect(b, "Ready", WAIT_S, child)
    expect_identical(ready$body$credits, 0)
    reply <- broker_expect(b, "PredictReply", WAIT_S, child)
    expect_identical(reply$body$batch_id, 41)
    expect_identical(fb_unpack(reply$payloads[[1]], "f64"), 2)
    bye <- broker_expect(b, "Goodbye", WAIT_S, child)
    expect_false("PredictReply" %in% vapply(attr(bye, "skipped"), `[[`, "", "type"))
    expect_identical(container_rc(child, WAIT_S), 0L)
  })
})

# ---------------------------------------------------------------- versions (docs/protocol.md 3)

newer_frames <- function(name) {
  twin <- read_twin(file.path("newer", name))
  c(list(read_vector(file.path("newer", name))), twin_payloads(twin))
}

broker_send_raw <- function(b, identity, frames) {
  pbdZMQ::zmq.send.multipart(b$sock, c(list(identity), frames), serialize = FALSE)
}

for (fork in c("true", "false")) {
  test_that(sprintf("a newer broker's messages are read or answered, serving goes on, Paused ends the drain (fork %s)",
                    fork), {
    with_container("sum", c("--name", "m3", "--replica-id", "test/newer/0", "--fork", fork),
                   function(b, child, hello) {
      # a broker of version 3 chooses 2 and appends a field to its Welcome
      broker_send_raw(b, hello$identity, newer_frames("welcome"))
      # a batch with fields appended to its tables and its Envelope
      broker_send_raw(b, hello$identity, newer_frames("predict_request"))
      reply <- broker_expect(b, "PredictReply", 15, child)
      expect_identical(reply$body$batch_id, 42)
      expect_identical(vapply(reply$payloads, fb_unpack, 0, kind = "f64"), c(4, -4))
      # a message type this package does not know, of a version it speaks
      broker_send_raw(b, hello$identity, newer_frames("unknown_body"))
      err <- broker_expect(b, "Error", 5, child)
      expect_identical(err$body$code, "UNKNOWN_MESSAGE")
      broker_send(b, hello$identity, "Heartbeat", list(), version = 3)
      err <- broker_expect(b, "Error", 5, child)
      expect_identical(err$body$code, "UNSUPPORTED_VERSION")
      broker_send(b, hello$identity, "PredictRequest", predict_request(43, "FLOAT64", 2), list(f64(c(1, 2))))
      reply <- broker_expect(b, "PredictReply", 15, child)
      expect_identical(fb_unpack(reply$payloads[[1]], "f64"), 3)

      # the drain waits for the broker's Paused (longer than the 50 ms quiet spell)
      tools::pskill(hello$body$pid, tools::SIGINT)
      ready <- broker_expect(b, "Ready", 5, child)
      expect_identical(ready$body$credits, 0)
      early <- broker_recv(b, 0.3)
      expect_true(is.null(early) || early$type == "Heartbeat")
      broker_send(b, hello$identity, "PredictRequest", predict_request(44, "FLOAT64", 1), list(f64(5)))
      broker_send_raw(b, hello$identity, newer_frames("paused"))
      reply <- broker_expect(b, "PredictReply", 15, child)
      expect_identical(reply$body$batch_id, 44)
      bye <- broker_expect(b, "Goodbye", 5, child)
      expect_identical(bye$body$reason, "drained")
      expect_identical(container_rc(child, 10), 0L)
      expect_match(container_log(child), "paused by the broker", fixed = TRUE)
    })
  })
}

# ---------------------------------------------------------------- where batches are computed

pids_of <- function(b, hello, batch_id, delay_ms = 0, child = NULL) {
  broker_send(b, hello$identity, "PredictRequest", predict_request(batch_id, "FLOAT64", 1), list(f64(delay_ms)))
  reply <- broker_expect(b, "PredictReply", 15, child)
  expect_identical(reply$body$batch_id, as.numeric(batch_id))
  fb_unpack(reply$payloads[[1]], "f64")
}

test_that("fork = auto computes a fast model's batches here, and after a slow batch in the worker", {
  with_container("pid", c("--name", "where", "--replica-id", "test/where/0"), function(b, child, hello) {
    broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
    serving <- hello$body$pid
    expect_false(pids_of(b, hello, 1, 0, child) == serving)  # the first batches: the worker
    # then here, once 16 in a row were fast (a loaded machine may make one slow: bounded)
    here <- 0
    for (i in 2:300) {
      here <- if (pids_of(b, hello, i, 0, child) == serving) here + 1 else 0
      if (here == 5) break
    }
    expect_identical(here, 5)
    # a batch predicted fast but slow (300 ms): computed here, then the next goes to the worker
    expect_identical(pids_of(b, hello, 1001, 300, child), serving)
    expect_false(pids_of(b, hello, 1002, 0, child) == serving)
  })
})

test_that("fork = true computes every batch in the worker, fork = false every one here", {
  for (fork in c("true", "false")) {
    with_container("pid", c("--name", "where", "--replica-id", "test/where/1", "--fork", fork),
                   function(b, child, hello) {
      broker_send(b, hello$identity, "Welcome", list(heartbeat_ms = 1000, dead_after_ms = 10000))
      where <- vapply(1:20, function(i) pids_of(b, hello, i, 0, child), 0)
      if (fork == "true") expect_true(all(where != hello$body$pid)) else expect_true(all(where == hello$body$pid))
    })
  }
})
