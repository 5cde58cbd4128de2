# Model container runtime: the container side of docs/protocol.md section 5.
#
#   connect --Hello--> [Welcome] --> ready <--PredictRequest / PredictReply--> ...
#   ready --Shutdown or SIGINT--> draining (Ready{0}) --held batches done--> Goodbye --> return
#
# One loop owns the state (an environment `rt`): it polls the DEALER socket with a timeout
# that is the next deadline (heartbeat due, broker silent too long, Welcome overdue).
#
# R has one thread, yet heartbeats must keep flowing while a batch computes. Each batch's
# predict therefore runs in a forked child (parallel::mcparallel): the child inherits the
# model and the inputs without copying, converts the outputs to payloads, and sends the
# result back through its pipe. The parent never blocks on the child: while a batch
# computes it alternates a non-blocking poll of the socket with
# mccollect(wait = FALSE, timeout <= 10 ms), which returns as soon as the child is done.
# The child never touches the ZeroMQ sockets (it exits with _exit, so no finalizer runs).
# Consequences: state that predict_fn changes (a counter, a cache in a closure) is lost
# with the child; load the model before ketch_serve(). Batches run one at a time in the
# order they came; up to `credits` batches are held (one computing, the rest queued).
# With fork = FALSE (the only choice on Windows) predict runs inline and no heartbeat is
# sent while it computes, so batches must stay shorter than dead_after_ms.
#
# Signals: R has no R-level SIGTERM handler (SIGTERM ends R at once), so SIGTERM cannot
# drain. SIGINT does: it sets a flag (the interrupt is resumed, so no multipart send is
# cut in half) and the loop drains exactly as on Shutdown. inst/sigterm_to_sigint.sh runs
# a container and turns a SIGTERM into a SIGINT for it (Docker: or STOPSIGNAL SIGINT).
#
# Clock: base R has no monotonic clock; timers use proc.time()["elapsed"], a wall clock,
# so a jump of the system clock can cause an early heartbeat or a reconnect.

KETCH_SDK <- "r/0.1.0"
KETCH_MAX_U32 <- 4294967295

# What the container serves, sent in Hello (the broker keys its cache on it): "build:" and
# $KETCH_BUILD_ID when set, else "md5:" and the digest of predict_fn's source (what it calls
# or loads is not seen: set KETCH_BUILD_ID where that matters).
ketch_fingerprint <- function(predict_fn, build = Sys.getenv("KETCH_BUILD_ID")) {
  if (nzchar(build)) {
    text <- paste0("build:", build)
    if (nchar(text, type = "bytes") > 128 || !grepl("^[!-~]+$", text, useBytes = TRUE)) {
      stop("KETCH_BUILD_ID: at most 122 printable ASCII characters, no space")
    }
    return(text)
  }
  file <- tempfile()
  on.exit(unlink(file))
  writeLines(deparse(predict_fn, control = c("keepInteger", "showAttributes")), file)
  paste0("md5:", unname(tools::md5sum(file)))
}

#' Serve an R model as a Ketch model container.
#'
#' @param predict_fn function(inputs) -> outputs. `inputs` is a list with one decoded
#'   value per item of the batch (see R/tensor.R for the dtype mapping); its attributes
#'   "dtype" (the batch's wire dtype name) and "budgets_us" describe the batch. It must
#'   return a list (or an atomic vector) with one output per input; an output may be a
#'   ketch_tensor() to choose the dtype, or a condition object to fail that item alone.
#'   An error, or a wrong number of outputs, fails the whole batch with MODEL_ERROR and
#'   "Class: message".
#' @param name,version model name and version sent in Hello.
#' @param input_type wire dtype name of the input ("float64", "string", "bytes", ...).
#' @param input_shape per-item input shape, -1 for any size; empty for text kinds.
#' @param broker backend address of the broker.
#' @param replica_id stable id of this replica; default "host/name/pid".
#' @param credits batches held at once; max_batch 0 means no limit; deterministic FALSE
#'   turns the broker's prediction cache off for this model.
#' @param fork run each predict in a forked child so heartbeats keep flowing (Unix).
#' @param welcome_timeout_ms how long to wait for Welcome before reconnecting (doubles on
#'   each further try, up to 30 s).
#' @return invisibly "drained" after Shutdown or SIGINT; signals an error of class
#'   "ketch_refused" when the broker refuses the Hello (UNSUPPORTED_VERSION, or any other
#'   Error answering it but CONFLICT, which means Hello again later).
ketch_serve <- function(predict_fn, name, version, input_type, input_shape = integer(0),
                        broker = "tcp://127.0.0.1:7000", replica_id = NULL, credits = 2,
                        max_batch = 0, deterministic = TRUE,
                        fork = .Platform$OS.type == "unix", welcome_timeout_ms = 5000) {
  stopifnot(is.function(predict_fn))
  input_type <- ketch_dtype_name(input_type)
  if (input_type %in% KETCH_TEXT_DTYPES && length(input_shape)) {
    stop("text kinds (bytes, string, json) have an empty input_shape")
  }
  if (is.null(replica_id)) {
    replica_id <- paste(Sys.info()[["nodename"]], name, Sys.getpid(), sep = "/")
  }
  rt <- new.env(parent = emptyenv())
  rt$predict_fn <- predict_fn
  rt$fork <- isTRUE(fork)
  rt$broker <- broker
  rt$hello <- list(model = name, model_version = as.character(version),
                   input = list(dtype = input_type, shape = as.numeric(input_shape)),
                   sdk = KETCH_SDK, replica_id = replica_id, credits = credits,
                   max_batch = max_batch, deterministic = deterministic, pid = Sys.getpid(),
                   fingerprint = ketch_fingerprint(predict_fn))
  rt$welcome_timeout <- welcome_timeout_ms / 1000
  rt$heartbeat <- 1
  rt$dead_after <- Inf
  rt$attempts <- 0
  rt$queue <- list()
  rt$job <- NULL
  rt$draining <- FALSE
  rt$interrupted <- FALSE
  rt$outcome <- NULL
  rt$ctx <- pbdZMQ::zmq.ctx.new()
  rt$sock <- NULL
  on.exit(rt_close(rt))
  rt_connect(rt)
  # SIGINT: note it and resume where R was interrupted; the loop then drains.
  repeat {
    done <- tryCatch(withCallingHandlers(rt_loop(rt), interrupt = function(c) {
      rt$interrupted <- TRUE
      if (!is.null(findRestart("resume"))) invokeRestart("resume")
    }), interrupt = function(c) NULL)
    if (!is.null(done)) break
  }
  if (inherits(done, "condition")) stop(done)
  invisible(done)
}

# ---------------------------------------------------------------- the loop

rt_loop <- function(rt) {
  repeat {
    if (rt$interrupted && !rt$draining) rt_drain(rt, "SIGINT")
    if (is.null(rt$job) && length(rt$queue)) rt_start_next(rt)
    if (!is.null(rt$outcome)) return(rt$outcome)
    if (rt$draining && is.null(rt$job) && !length(rt$queue)) {
      rt_send(rt, "Goodbye", list(reason = "drained"))
      rt_log(rt, "drained, goodbye")
      return("drained")
    }
    wait <- rt_next_deadline(rt) - rt_now()
    if (is.null(rt$job)) {
      rt_poll(rt, wait)
    } else {
      rt_poll(rt, 0)
      if (is.null(rt$outcome) && !is.null(rt$job)) rt_collect(rt, min(max(wait, 0), 0.01))
    }
    if (!is.null(rt$outcome)) return(rt$outcome)
    rt_timers(rt)
  }
}

rt_now <- function() proc.time()[["elapsed"]]

rt_log <- function(rt, ...) {
  cat(sprintf("%s ketch[r] %s: %s\n", format(Sys.time(), "%H:%M:%OS3"), rt$hello$replica_id,
              paste0(...)), file = stderr())
}

# The earliest time something is due (capped one second ahead).
rt_next_deadline <- function(rt) {
  now <- rt_now()
  due <- now + 1
  if (rt$phase == "ready") {
    due <- min(due, rt$last_sent + rt$heartbeat, rt$last_recv + rt$dead_after)
  } else {
    due <- min(due, rt$connected_at + rt_welcome_wait(rt), rt$hello_again_at)
  }
  due
}

rt_welcome_wait <- function(rt) min(30, rt$welcome_timeout * 2^max(0, rt$attempts - 1))

rt_timers <- function(rt) {
  now <- rt_now()
  if (rt$phase == "ready") {
    if (now - rt$last_recv > rt$dead_after) {
      rt_log(rt, sprintf("broker silent for %.1f s, reconnecting", now - rt$last_recv))
      rt_reconnect(rt)
    } else if (now - rt$last_sent >= rt$heartbeat) {
      rt_send(rt, "Heartbeat", list(busy = !is.null(rt$job)))
    }
  } else if (now >= rt$hello_again_at) {
    rt_log(rt, "saying Hello again after a CONFLICT")
    rt_reconnect(rt)
  } else if (now - rt$connected_at > rt_welcome_wait(rt)) {
    rt_log(rt, sprintf("no Welcome after %.1f s, reconnecting", now - rt$connected_at))
    rt_reconnect(rt)
  }
}

# ---------------------------------------------------------------- socket

rt_connect <- function(rt) {
  sock <- pbdZMQ::zmq.socket(rt$ctx, pbdZMQ::ZMQ.ST()$DEALER)
  so <- pbdZMQ::ZMQ.SO()
  pbdZMQ::zmq.setsockopt(sock, so$LINGER, 0L)
  pbdZMQ::zmq.setsockopt(sock, so$SNDTIMEO, 1000L)  # never block forever on a send
  pbdZMQ::zmq.setsockopt(sock, so$RCVTIMEO, 1000L)
  if (pbdZMQ::zmq.connect(sock, rt$broker) != 0) stop("cannot connect to ", rt$broker)
  rt$sock <- sock
  rt$phase <- "connecting"
  rt$connected_at <- rt_now()
  rt$hello_again_at <- Inf
  rt$last_recv <- rt_now()
  rt$attempts <- rt$attempts + 1
  rt_send(rt, "Hello", rt$hello)
  rt_log(rt, "hello sent to ", rt$broker)
}

rt_reconnect <- function(rt) {
  rt_drop_held(rt)
  pbdZMQ::zmq.close(rt$sock)
  rt_connect(rt)
}

rt_close <- function(rt) {
  rt_drop_held(rt, quiet = TRUE)
  if (!is.null(rt$sock)) {
    # give a Goodbye that was just sent a moment to leave
    pbdZMQ::zmq.setsockopt(rt$sock, pbdZMQ::ZMQ.SO()$LINGER, 1000L)
    pbdZMQ::zmq.close(rt$sock)
    rt$sock <- NULL
  }
  if (!is.null(rt$ctx)) {
    pbdZMQ::zmq.ctx.destroy(rt$ctx)
    rt$ctx <- NULL
  }
}

# Send one message; pbdZMQ's zmq.send.multipart cannot send a single frame, so frames
# go one by one with SNDMORE. A first frame that cannot go within SNDTIMEO is dropped
# whole (ZeroMQ delivers all frames of a message or none).
rt_send <- function(rt, type, body, payloads = list()) {
  frames <- c(list(ketch_encode(type, body)), payloads)
  n <- length(frames)
  flags <- pbdZMQ::ZMQ.SR()
  for (i in seq_len(n)) {
    rc <- pbdZMQ::zmq.msg.send(frames[[i]], rt$sock, flags = if (i < n) flags$SNDMORE else flags$BLOCK,
                               serialize = FALSE)
    if (i == 1 && identical(rc, -1L)) {
      rt_log(rt, type, " dropped: the socket would block")
      return(invisible(FALSE))
    }
  }
  rt$last_sent <- rt_now()
  invisible(TRUE)
}

rt_send_error <- function(rt, code, message) {
  rt_log(rt, "error sent: ", code, ": ", message)
  rt_send(rt, "Error", list(code = code, message = message))
}

# Wait up to `timeout` seconds for messages and handle every one that is there.
rt_poll <- function(rt, timeout) {
  ms <- as.integer(ceiling(max(0, timeout) * 1000))
  pollin <- pbdZMQ::ZMQ.PO()$POLLIN
  repeat {
    sock <- rt$sock
    r <- pbdZMQ::zmq.poll(c(sock), c(pollin), ms)  # c(-1, EINTR) on a signal: no events
    if (r[1] <= 0) return(invisible(NULL))
    frames <- pbdZMQ::zmq.recv.multipart(sock, unserialize = FALSE)
    rt_handle(rt, frames)
    if (!is.null(rt$outcome) || !identical(sock, rt$sock)) return(invisible(NULL))
    ms <- 0L
  }
}

# ---------------------------------------------------------------- messages

rt_handle <- function(rt, frames) {
  rt$last_recv <- rt_now()
  msg <- tryCatch(ketch_decode(frames[[1]]), ketch_decode_error = function(e) e)
  version <- if (inherits(msg, "condition")) ketch_peek_version(frames[[1]]) else msg$version
  if (!is.na(version) && version != KETCH_PROTOCOL_VERSION) {
    # MUST NOT act on it; an Error is not answered with an Error (no ping-pong)
    if (inherits(msg, "condition") || msg$type != "Error") {
      rt_send_error(rt, "UNSUPPORTED_VERSION",
                    sprintf("protocol version %d is not supported (speaks %d)", version,
                            KETCH_PROTOCOL_VERSION))
    }
    return(invisible(NULL))
  }
  if (inherits(msg, "condition")) {
    code <- if (inherits(msg, "ketch_unknown_message")) "UNKNOWN_MESSAGE" else "BAD_MESSAGE"
    rt_send_error(rt, code, conditionMessage(msg))
    return(invisible(NULL))
  }
  body <- msg$body
  switch(msg$type,
    Welcome = rt_on_welcome(rt, body),
    Heartbeat = NULL,
    PredictRequest = {
      rt$queue[[length(rt$queue) + 1]] <- list(body = body, payloads = frames[-1], received = rt_now())
    },
    Shutdown = rt_drain(rt, paste0("Shutdown: ", body$reason)),
    Error = rt_on_error(rt, body),
    rt_send_error(rt, "UNKNOWN_MESSAGE", sprintf("%s is not valid from the broker on the backend", msg$type))
  )
  invisible(NULL)
}

ketch_peek_version <- function(frame) {
  tryCatch(fb_get_scalar(fb_root(frame, KETCH_IDENTIFIER), 0L, "u16", 0), error = function(e) NA)
}

rt_on_welcome <- function(rt, body) {
  # 0 would mean "no figure": keep a heartbeat of 1 s and never declare the broker dead
  rt$heartbeat <- if (body$heartbeat_ms > 0) max(body$heartbeat_ms, 10) / 1000 else 1
  rt$dead_after <- if (body$dead_after_ms > 0) body$dead_after_ms / 1000 else Inf
  if (rt$phase != "ready") rt_log(rt, sprintf("welcome (heartbeat %g ms, dead after %g ms)",
                                              body$heartbeat_ms, body$dead_after_ms))
  rt$phase <- "ready"
  rt$attempts <- 0
  if (rt$draining) rt_send(rt, "Ready", list(credits = 0))  # a new connection: say it again
}

# Acted on by the code alone, never the text: UNSUPPORTED_VERSION ends the container;
# BAD_MESSAGE once welcomed means the broker does not know this connection (Hello again),
# before the Welcome it answers something sent before the Hello (nothing to do); CONFLICT
# answering the Hello (the replica id is live on another connection, or other code serves
# this version) means Hello again later on a new connection, backing off 1 s doubling to
# 30 s; any other Error answering the Hello (INVALID) ends the container.
rt_on_error <- function(rt, body) {
  text <- sprintf("%s: %s", body$code, body$message)
  if (identical(body$code, "UNSUPPORTED_VERSION")) {
    rt_refused(rt, text)  # MUST NOT retry with the same version
  } else if (identical(body$code, "BAD_MESSAGE")) {
    if (rt$phase == "ready") {
      # the broker does not know this connection (it restarted): Hello again, same id;
      # whatever it sent before is no longer its business, so held batches are dropped
      rt_log(rt, "broker asks for Hello again")
      rt_drop_held(rt)
      rt$phase <- "connecting"
      rt$connected_at <- rt_now()
      rt_send(rt, "Hello", rt$hello)
    }  # else a Hello is already on its way
  } else if (identical(body$code, "CONFLICT") && rt$phase == "connecting") {
    wait <- min(30, 2^max(0, rt$attempts - 1))
    rt_log(rt, sprintf("hello refused for now (%s); Hello again in %g s", text, wait))
    rt$hello_again_at <- rt_now() + wait
  } else if (rt$phase == "connecting") {
    rt_refused(rt, text)  # an Error answering the Hello: the container exits
  } else {
    rt_log(rt, "broker error: ", text)
  }
}

rt_refused <- function(rt, text) {
  rt_log(rt, "hello refused: ", text)
  rt$outcome <- structure(class = c("ketch_refused", "error", "condition"),
                          list(message = paste("broker refused the container:", text), call = NULL))
}

rt_drain <- function(rt, why) {
  if (rt$draining) return(invisible(NULL))
  rt$draining <- TRUE
  rt_log(rt, "draining (", why, "), ", length(rt$queue) + !is.null(rt$job), " batch(es) held")
  rt_send(rt, "Ready", list(credits = 0))
}

# ---------------------------------------------------------------- batches

rt_start_next <- function(rt) {
  batch <- rt$queue[[1]]
  rt$queue <- rt$queue[-1]
  inputs <- tryCatch(ketch_batch_inputs(batch$body, batch$payloads), error = function(e) e)
  if (inherits(inputs, "error")) {
    code <- if (inherits(inputs, "ketch_bad_frames")) "BAD_MESSAGE" else "BAD_INPUT"
    rt_reply(rt, batch, list(ok = FALSE, error = code, message = conditionMessage(inputs), compute_us = 0))
    return(invisible(NULL))
  }
  # items whose payload is not a value of their type fail alone (BAD_INPUT); the others compute
  batch$bad <- attr(inputs, "bad_items")
  attr(inputs, "bad_items") <- NULL
  if (length(inputs) == 0 && length(batch$bad) > 0) {
    rt_reply(rt, batch, list(ok = TRUE, items = list(), compute_us = 0))
    return(invisible(NULL))
  }
  if (!rt$fork) {
    rt_reply(rt, batch, ketch_run_predict(rt$predict_fn, inputs))
    return(invisible(NULL))
  }
  predict_fn <- rt$predict_fn
  process <- parallel::mcparallel(ketch_run_predict(predict_fn, inputs))
  rt$job <- list(batch = batch, process = process)
}

rt_collect <- function(rt, timeout) {
  res <- suppressWarnings(parallel::mccollect(rt$job$process, wait = FALSE, timeout = timeout))
  if (is.null(res)) return(invisible(NULL))
  batch <- rt$job$batch
  rt$job <- NULL
  result <- res[[1]]
  if (!is.list(result) || is.null(result$ok)) {
    why <- if (inherits(result, "try-error")) as.character(result) else "it ended without a result"
    result <- list(ok = FALSE, error = "MODEL_ERROR", compute_us = 0,
                   message = paste("ChildProcessError:", trimws(why)))
  }
  rt_reply(rt, batch, result)
}

rt_reply <- function(rt, batch, result) {
  result <- ketch_merge_bad_items(result, batch$bad, length(batch$body$budgets_us))
  reply <- ketch_predict_reply(batch$body$batch_id, result)
  rt_send(rt, "PredictReply", reply$body, reply$payloads)
}

rt_drop_held <- function(rt, quiet = FALSE) {
  n <- length(rt$queue) + !is.null(rt$job)
  if (!is.null(rt$job)) {
    tools::pskill(rt$job$process$pid, tools::SIGKILL)
    suppressWarnings(parallel::mccollect(rt$job$process, wait = TRUE))
    rt$job <- NULL
  }
  rt$queue <- list()
  if (n > 0 && !quiet) rt_log(rt, n, " held batch(es) dropped (the broker re-queues them)")
}

# ---------------------------------------------------------------- pure helpers

ketch_condition <- function(class, message) {
  structure(class = c(class, "error", "condition"), list(message = message, call = NULL))
}

#' The inputs of a PredictRequest as a list of R values, one per item whose payload is a
#' value of its dtype and shape, with attributes "dtype", "budgets_us" (of those items) and
#' "bad_items" (the others: their message, named by their 1-based index in the batch).
#' Signals "ketch_bad_frames" when frames or shapes do not add up.
ketch_batch_inputs <- function(body, payloads) {
  n <- length(body$budgets_us)
  if (length(payloads) != n) {
    stop(ketch_condition("ketch_bad_frames", sprintf("PredictRequest has %d payload frame(s) for %d item(s)",
                                                     length(payloads), n)))
  }
  ndim <- body$ndim
  if (length(body$shapes) != ndim * n) {
    stop(ketch_condition("ketch_bad_frames", sprintf("PredictRequest has %d shape entries for %d item(s) of ndim %d",
                                                     length(body$shapes), n, ndim)))
  }
  inputs <- vector("list", n)
  bad <- list()
  for (i in seq_len(n)) {
    shape <- body$shapes[(i - 1) * ndim + seq_len(ndim)]
    # an error of R itself too (JSON nested too deep overflows the protection stack)
    value <- tryCatch(list(ketch_payload_to_value(body$dtype, shape, payloads[[i]])), error = function(e) e)
    if (inherits(value, "error")) {
      bad[[as.character(i)]] <- sprintf("item %d: %s", i - 1, substr(conditionMessage(value), 1, 300))
    } else {
      inputs[i] <- value
    }
  }
  good <- setdiff(seq_len(n), as.integer(names(bad)))
  inputs <- inputs[good]
  attr(inputs, "dtype") <- body$dtype
  attr(inputs, "budgets_us") <- body$budgets_us[good]
  attr(inputs, "bad_items") <- bad
  inputs
}

#' The result of a batch of n items whose `bad` items (see ketch_batch_inputs) were not
#' computed: those answered BAD_INPUT, the others as `result` says (each failing with the
#' batch's error when the batch failed).
ketch_merge_bad_items <- function(result, bad, n) {
  if (!length(bad)) return(result)
  good <- setdiff(seq_len(n), as.integer(names(bad)))
  items <- vector("list", n)
  for (k in names(bad)) {
    items[[as.integer(k)]] <- list(status = "ERROR", error = "BAD_INPUT", message = bad[[k]])
  }
  for (j in seq_along(good)) {
    items[[good[j]]] <- if (isTRUE(result$ok)) result$items[[j]] else
      list(status = "ERROR", error = result$error, message = result$message)
  }
  list(ok = TRUE, items = items, compute_us = result$compute_us)
}

ketch_class_message <- function(e) paste0(class(e)[1], ": ", conditionMessage(e))

#' Call predict_fn on a batch and turn its outputs into payloads. Runs in the forked
#' child. Returns list(ok, items | error + message, compute_us).
ketch_run_predict <- function(predict_fn, inputs) {
  t0 <- rt_now()
  out <- tryCatch(predict_fn(inputs), error = function(e) e)
  compute_us <- min(round((rt_now() - t0) * 1e6), KETCH_MAX_U32)
  fail <- function(message) list(ok = FALSE, error = "MODEL_ERROR", message = message, compute_us = compute_us)
  if (inherits(out, "error")) return(fail(ketch_class_message(out)))
  if (is.atomic(out) && is.null(dim(out))) out <- as.list(out)
  if (!is.list(out) || is.data.frame(out) || inherits(out, "ketch_tensor")) {
    return(fail(sprintf("BatchSizeError: predict_fn must return a list of %d outputs, not %s",
                        length(inputs), class(out)[1])))
  }
  if (length(out) != length(inputs)) {
    return(fail(sprintf("BatchSizeError: predict_fn returned %d outputs for a batch of %d",
                        length(out), length(inputs))))
  }
  items <- lapply(out, function(value) {
    if (inherits(value, "condition")) {
      return(list(status = "ERROR", error = "MODEL_ERROR", message = ketch_class_message(value)))
    }
    tryCatch(c(list(status = "OK"), ketch_value_to_payload(value)), error = function(e) {
      list(status = "ERROR", error = "MODEL_ERROR", message = ketch_class_message(e))
    })
  })
  list(ok = TRUE, items = items, compute_us = compute_us)
}

#' The PredictReply body and payload frames for a result of ketch_run_predict().
ketch_predict_reply <- function(batch_id, result) {
  if (!isTRUE(result$ok)) {
    return(list(body = list(batch_id = batch_id, compute_us = result$compute_us, outputs = list(),
                            error = result$error, message = result$message), payloads = list()))
  }
  outputs <- lapply(result$items, function(it) {
    if (it$status == "OK") list(status = "OK", output = list(dtype = it$dtype, shape = it$shape))
    else list(status = "ERROR", error = it$error, message = it$message)
  })
  payloads <- lapply(result$items, function(it) if (it$status == "OK") it$payload else raw(0))
  list(body = list(batch_id = batch_id, compute_us = result$compute_us, outputs = outputs),
       payloads = payloads)
}
