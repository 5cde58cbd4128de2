# Model container runtime: the container side of docs/protocol.md section 5.
#
#   connect --Hello--> [Welcome] --> ready <--PredictRequest / PredictReply--> ...
#   ready --Shutdown or SIGINT--> draining (Ready{0}) --quiet, nothing held--> Goodbye --> return
#
# One loop owns the state (an environment `rt`): it polls the DEALER socket (and the
# worker's socket) with a timeout that is the next deadline (heartbeat due, broker silent
# too long, Welcome overdue, drain quiet).
#
# R has one thread, yet heartbeats must keep flowing while a batch computes. So a worker
# process is forked once, when ketch_serve() starts (parallel::mcparallel, before this
# process opens any ZeroMQ context): it holds the model, binds a PAIR socket on an ipc://
# path, and answers each batch the loop forwards to it (the request's frames as received)
# with the reply's frames, which the loop forwards to the broker unchanged. A worker that
# dies (a crash in native code, a kill) fails the batches it held with MODEL_ERROR and is
# forked again. The worker exits when the loop tells it to, or when this process has gone.
#
# Which process computes a batch (`fork`):
#   "auto" (the default on Unix): this process computes a batch itself when the model is
#       known to be fast for its size: every one of the last 16 batches took at most
#       KETCH_INLINE_SHARE of the heartbeat interval for each item (a batch of n items is
#       predicted to take n times the slowest recent time per item). Any other batch (the
#       first ones, those of a shape not seen before, those of a model that is or has been
#       slow) goes to the worker, so heartbeats keep flowing while it computes. A fast
#       model saves the two local hops to the worker and back.
#   TRUE: every batch goes to the worker. State predict_fn keeps between calls (a counter,
#       a cache in a closure) lives there and lasts across batches; with "auto" it is
#       split between the two processes.
#   FALSE (the only choice on Windows): predict runs in this process and no heartbeat is
#       sent while it computes, so batches must stay shorter than dead_after_ms.
#
# Draining: Ready{credits: 0} goes out at once; batches that arrive afterwards (the broker
# sent them before it read the Ready) are computed and answered as usual; Goodbye goes out
# once nothing is held and the broker's Paused has come (protocol 2: every batch it sent
# arrives before it), or, from a version-1 broker, no batch has come for 50 ms, so nothing
# is handed back.
#
# Versions (docs/protocol.md section 3): the Hello offers KETCH_PROTOCOL_VERSIONS, the
# Welcome names the one chosen (none: 1). A message of a version not spoken is answered
# UNSUPPORTED_VERSION, one of a type this package does not know UNKNOWN_MESSAGE; fields a
# newer broker appends to its tables are skipped.
#
# Signals: R has no R-level SIGTERM handler (SIGTERM ends R at once), so SIGTERM cannot
# drain. SIGINT does: it sets a flag (the interrupt is resumed, so no multipart send is
# cut in half) and the loop drains exactly as on Shutdown. inst/sigterm_to_sigint.sh runs
# a container and turns a SIGTERM into a SIGINT for it (Docker: or STOPSIGNAL SIGINT). The
# worker ignores SIGINT (a Ctrl-C in a terminal reaches both): the loop stops it.
#
# Clock: base R has no monotonic clock; timers use proc.time()["elapsed"], a wall clock,
# so a jump of the system clock can cause an early heartbeat or a reconnect. compute_us
# is measured with Sys.time(), to the microsecond.

KETCH_SDK <- "r/0.1.0"
KETCH_MAX_U32 <- 4294967295
KETCH_DRAIN_QUIET_S <- 0.05  # a draining replica says Goodbye after this long without a batch
KETCH_INLINE_SHARE <- 0.05   # fork = "auto": computed here if predicted under this share of a heartbeat
KETCH_INLINE_WINDOW <- 16L   # ... for each item, judged by the slowest of this many recent batches

# What the container serves, sent in Hello (the broker keys its cache on it): "build:" and
# $KETCH_BUILD_ID when set, else "md5:" and the digest of predict_fn's source (what it calls
# or loads is not seen: set KETCH_BUILD_ID where that matters).
# The build id is at most 122 printable ASCII characters without spaces (the fingerprint
# at most 128); any other is an error naming KETCH_BUILD_ID.
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

#' Serve an R model as a Ketch model container
#'
#' Connects to the broker's backend, says Hello, computes the batches the broker sends
#' and answers them, until the broker's Shutdown or a SIGINT; then drains (every batch the
#' broker sent is answered) and says Goodbye. Heartbeats keep flowing while a batch
#' computes: a worker process forked once at the start computes the batches that may be
#' slow, and this process the batches of a model known to be fast (\code{fork = "auto"});
#' \code{fork = TRUE} sends every batch to the worker, \code{fork = FALSE} computes every
#' batch in this process. See the package README for the protocol details and
#' \code{inst/sigterm_to_sigint.sh} to drain on SIGTERM.
#'
#' @param predict_fn \code{function(inputs)}: \code{inputs} is a list with one decoded
#'   value per item of the batch (see \code{\link{ketch_tensor}} for the dtype mapping);
#'   its attributes \code{"dtype"} (the batch's wire dtype name) and \code{"budgets_us"}
#'   describe the batch. It returns a list (or an atomic vector) with one output per
#'   input; an output may be a \code{ketch_tensor()} to choose the dtype, or a condition
#'   object to fail that item alone. An error, or a wrong number of outputs, fails the
#'   whole batch with \code{MODEL_ERROR} and \code{"Class: message"}. An item whose
#'   payload does not fit its dtype and shape (a wrong size, text that is not UTF-8, JSON
#'   that does not parse or is nested too deep) is answered \code{BAD_INPUT} and not given
#'   to \code{predict_fn}, which computes the others; when it then fails the batch, the
#'   items it got fail with its error and the bad ones keep \code{BAD_INPUT}.
#' @param name,version model name and version sent in Hello.
#' @param input_type wire dtype name of the input (\code{"float64"}, \code{"string"},
#'   \code{"bytes"}, ...).
#' @param input_shape per-item input shape, -1 for any size; empty for text kinds.
#' @param broker backend address of the broker.
#' @param replica_id stable id of this replica; default \code{"host/name/pid"}.
#' @param credits batches held at once.
#' @param max_batch largest batch accepted; 0 means no limit of its own.
#' @param deterministic \code{FALSE} turns the broker's prediction cache off for this model.
#' @param fork where \code{predict_fn} runs: \code{"auto"} (the default on Unix) in this
#'   process for batches the model is known to compute fast (each of its last 16 batches
#'   took at most a twentieth of the heartbeat interval per item), in a worker process
#'   forked once for the others, so that heartbeats keep flowing while they compute;
#'   \code{TRUE} always in the worker (state \code{predict_fn} keeps between calls then
#'   lives in one process; with \code{"auto"} it is split between two); \code{FALSE}
#'   always in this process (no heartbeat while it computes; the only choice on Windows).
#'   Load the model before calling \code{ketch_serve()}: the worker is forked from here.
#' @param welcome_timeout_ms how long to wait for Welcome before reconnecting (doubles on
#'   each further try, up to 30 s).
#' @param status_file where to keep the state the container probes read
#'   (\code{docker/ketch-probe}): \code{"ready"}, \code{"connecting"} or
#'   \code{"draining"}, rewritten every second by the loop; default
#'   \code{$KETCH_STATUS_FILE}, none when unset or empty.
#' @return Invisibly \code{"drained"} after Shutdown or SIGINT. Signals an error of class
#'   \code{"ketch_refused"} when the broker refuses the Hello (\code{UNSUPPORTED_VERSION},
#'   or any other Error answering it but \code{CONFLICT}, which means Hello again later
#'   on a new connection, after 1 s doubling to 30 s).
#' @examples
#' \dontrun{
#' model <- readRDS("iris-svm.rds")
#' ketch_serve(function(inputs) lapply(inputs, function(x) as.character(predict(model, t(x)))),
#'             name = "iris-svm", version = "2", input_type = "float64", input_shape = 4,
#'             broker = "tcp://127.0.0.1:7000")
#' }
#' @export
ketch_serve <- function(predict_fn, name, version, input_type, input_shape = integer(0),
                        broker = "tcp://127.0.0.1:7000", replica_id = NULL, credits = 2,
                        max_batch = 0, deterministic = TRUE,
                        fork = if (.Platform$OS.type == "unix") "auto" else FALSE,
                        welcome_timeout_ms = 5000, status_file = Sys.getenv("KETCH_STATUS_FILE")) {
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
  if (!(isTRUE(fork) || isFALSE(fork) || identical(fork, "auto"))) stop('fork is TRUE, FALSE or "auto"')
  rt$fork <- !isFALSE(fork)
  rt$auto <- identical(fork, "auto")
  rt$item_s <- rep(Inf, KETCH_INLINE_WINDOW)  # recent compute time per item, slowest first unknown
  rt$item_at <- 0L
  rt$broker <- broker
  rt$hello <- list(model = name, model_version = as.character(version),
                   input = list(dtype = input_type, shape = as.numeric(input_shape)),
                   sdk = KETCH_SDK, replica_id = replica_id, credits = credits,
                   max_batch = max_batch, deterministic = deterministic, pid = Sys.getpid(),
                   fingerprint = ketch_fingerprint(predict_fn),
                   versions = KETCH_PROTOCOL_VERSIONS)
  rt$welcome_timeout <- welcome_timeout_ms / 1000
  rt$heartbeat <- 1
  rt$dead_after <- Inf
  rt$attempts <- 0
  rt$generation <- 0
  rt$inflight <- list()   # batches with the worker, oldest first: list(generation, header)
  rt$draining <- FALSE
  rt$paused <- FALSE
  rt$protocol <- KETCH_PROTOCOL_VERSION
  rt$drain_from <- 0
  rt$last_batch <- 0
  rt$interrupted <- FALSE
  rt$outcome <- NULL
  rt$status_file <- if (length(status_file) && nzchar(status_file)) status_file else NULL
  rt$status_at <- -Inf
  rt$sock <- NULL
  rt$worker <- NULL
  rt$flags <- list(sndmore = pbdZMQ::ZMQ.SR()$SNDMORE, block = pbdZMQ::ZMQ.SR()$BLOCK,
                   rcvmore = pbdZMQ::ZMQ.SO()$RCVMORE, pollin = pbdZMQ::ZMQ.PO()$POLLIN)
  rt$beat_busy <- ketch_encode("Heartbeat", list(busy = TRUE))
  rt$beat_idle <- ketch_encode("Heartbeat", list(busy = FALSE))
  on.exit(rt_close(rt))
  if (rt$fork) rt_worker_start(rt)  # before this process has a ZeroMQ context
  rt$ctx <- pbdZMQ::zmq.ctx.new()
  if (rt$fork) rt_worker_connect(rt)
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
    if (!is.null(rt$outcome)) return(rt$outcome)
    if (rt$draining && !length(rt$inflight) && (rt$paused || (!rt_waits_for_paused(rt) && rt_quiet(rt)))) {
      # take what came while this process was not running (a starved process finds the
      # quiet spell over at once) before deciding that nothing came
      before <- rt$last_batch
      rt_poll(rt, 0)
      if ((rt$paused || identical(before, rt$last_batch)) && !length(rt$inflight) && is.null(rt$outcome)) {
        rt_send(rt, list(ketch_encode("Goodbye", list(reason = "drained"))))
        rt_log(rt, "drained, goodbye", if (rt$paused) " (paused by the broker)" else "")
        return("drained")
      }
      next
    }
    now <- rt_now()
    rt_poll(rt, rt_next_deadline(rt, now) - now)
    if (!is.null(rt$outcome)) return(rt$outcome)
    rt_timers(rt)
    rt_status(rt)
  }
}

# The probes' status file: the state, rewritten when it changes and at least every second.
rt_status <- function(rt) {
  if (is.null(rt$status_file)) return(invisible(NULL))
  state <- if (rt$draining) "draining" else if (identical(rt$phase, "ready")) "ready" else "connecting"
  now <- rt_now()
  if (identical(state, rt$status_state) && now - rt$status_at < 1) return(invisible(NULL))
  tmp <- paste0(rt$status_file, ".tmp")
  ok <- tryCatch({
    writeLines(state, tmp)
    file.rename(tmp, rt$status_file)
  }, error = function(e) FALSE, warning = function(w) FALSE)
  if (!isTRUE(ok) && !identical(rt$status_state, "failed")) rt_log(rt, "cannot write ", rt$status_file)
  rt$status_state <- if (isTRUE(ok)) state else "failed"
  rt$status_at <- now
}

rt_now <- function() proc.time()[["elapsed"]]

# A draining container of protocol 2 waits for the broker's Paused, up to the dead interval
# (then, or with a version-1 broker, the quiet spell decides).
rt_waits_for_paused <- function(rt) {
  rt$protocol >= KETCH_BODY_SINCE[["Paused"]] && !rt$paused &&
    rt_now() - rt$drain_from < rt_paused_wait(rt)
}

rt_paused_wait <- function(rt) if (is.finite(rt$dead_after)) rt$dead_after else 5

# No batch has come for the quiet spell since the drain began.
rt_quiet <- function(rt) rt_now() - max(rt$drain_from, rt$last_batch) >= KETCH_DRAIN_QUIET_S

rt_log <- function(rt, ...) {
  cat(sprintf("%s ketch[r] %s: %s\n", format(Sys.time(), "%H:%M:%OS3"), rt$hello$replica_id,
              paste0(...)), file = stderr())
}

# The earliest time something is due (capped one second ahead).
rt_next_deadline <- function(rt, now = rt_now()) {
  due <- now + 1
  if (rt$phase == "ready") {
    due <- min(due, rt$last_sent + rt$heartbeat, rt$last_recv + rt$dead_after)
  } else {
    due <- min(due, rt$connected_at + rt_welcome_wait(rt), rt$hello_again_at)
  }
  if (rt$draining) {
    due <- min(due, if (rt_waits_for_paused(rt)) rt$drain_from + rt_paused_wait(rt)
                    else max(rt$drain_from, rt$last_batch) + KETCH_DRAIN_QUIET_S)
  }
  if (length(rt$inflight)) due <- min(due, now + 0.2)  # look after the worker now and then
  due
}

rt_welcome_wait <- function(rt) min(30, rt$welcome_timeout * 2^max(0, rt$attempts - 1))

rt_timers <- function(rt) {
  now <- rt_now()
  if (!is.null(rt$worker) && length(rt$inflight) && now - rt$worker_checked >= 0.2) rt_worker_check(rt)
  if (rt$phase == "ready") {
    if (now - rt$last_recv > rt$dead_after) {
      rt_log(rt, sprintf("broker silent for %.1f s, reconnecting", now - rt$last_recv))
      rt_reconnect(rt)
    } else if (now - rt$last_sent >= rt$heartbeat) {
      rt_send(rt, list(if (length(rt$inflight)) rt$beat_busy else rt$beat_idle))
    }
  } else if (now >= rt$hello_again_at) {
    rt_log(rt, "saying Hello again after a CONFLICT")
    rt_reconnect(rt)
  } else if (now - rt$connected_at > rt_welcome_wait(rt)) {
    rt_log(rt, sprintf("no Welcome after %.1f s, reconnecting", now - rt$connected_at))
    rt_reconnect(rt)
  }
}

# ---------------------------------------------------------------- sockets

rt_connect <- function(rt) {
  sock <- pbdZMQ::zmq.socket(rt$ctx, pbdZMQ::ZMQ.ST()$DEALER)
  so <- pbdZMQ::ZMQ.SO()
  pbdZMQ::zmq.setsockopt(sock, so$LINGER, 0L)
  pbdZMQ::zmq.setsockopt(sock, so$SNDTIMEO, 1000L)  # never block forever on a send
  pbdZMQ::zmq.setsockopt(sock, so$RCVTIMEO, 1000L)
  if (pbdZMQ::zmq.connect(sock, rt$broker) != 0) stop("cannot connect to ", rt$broker)
  rt$sock <- sock
  rt$attempts <- rt$attempts + 1
  rt_hello(rt)
  rt$last_recv <- rt_now()
  rt_log(rt, "hello sent to ", rt$broker)
}

# Hello on the current socket: a new registration, whose batches are the only ones answered.
rt_hello <- function(rt) {
  rt$generation <- rt$generation + 1
  rt$phase <- "connecting"
  rt$paused <- FALSE
  rt$connected_at <- rt_now()
  rt$hello_again_at <- Inf
  rt_send(rt, list(ketch_encode("Hello", rt$hello)))
}

rt_reconnect <- function(rt) {
  pbdZMQ::zmq.close(rt$sock)
  rt_connect(rt)
}

rt_close <- function(rt) {
  if (!is.null(rt$status_file)) unlink(rt$status_file)
  if (!is.null(rt$sock)) {
    # give a Goodbye that was just sent a moment to leave
    pbdZMQ::zmq.setsockopt(rt$sock, pbdZMQ::ZMQ.SO()$LINGER, 1000L)
    pbdZMQ::zmq.close(rt$sock)
    rt$sock <- NULL
  }
  rt_worker_stop(rt)
  if (!is.null(rt$ctx)) {
    pbdZMQ::zmq.ctx.destroy(rt$ctx)
    rt$ctx <- NULL
  }
}

# Send the frames of one message. pbdZMQ's zmq.send.multipart cannot send a single frame,
# so frames go one by one with SNDMORE. A first frame that cannot go within SNDTIMEO is
# dropped whole (ZeroMQ delivers all frames of a message or none).
ketch_send_frames <- function(sock, frames, flags) {
  n <- length(frames)
  for (i in seq_len(n)) {
    rc <- pbdZMQ::zmq.msg.send(frames[[i]], sock, flags = if (i < n) flags$sndmore else flags$block,
                               serialize = FALSE)
    if (i == 1 && identical(rc, -1L)) return(FALSE)
  }
  TRUE
}

# Every frame of the message waiting on `sock`.
ketch_recv_frames <- function(sock, flags) {
  frames <- list(pbdZMQ::zmq.msg.recv(sock, flags = flags$block, unserialize = FALSE))
  while (pbdZMQ::zmq.getsockopt(sock, flags$rcvmore, 0L) == 1L) {
    frames[[length(frames) + 1L]] <- pbdZMQ::zmq.msg.recv(sock, flags = flags$block, unserialize = FALSE)
  }
  frames
}

# `now`: when the message went out, if the caller knows it (a heartbeat goes out at most
# that much earlier than due).
rt_send <- function(rt, frames, now = rt_now()) {
  if (!ketch_send_frames(rt$sock, frames, rt$flags)) {
    rt_log(rt, "a message was dropped: the socket would block")
    return(invisible(FALSE))
  }
  rt$last_sent <- now
  invisible(TRUE)
}

rt_send_error <- function(rt, code, message) {
  rt_log(rt, "error sent: ", code, ": ", message)
  rt_send(rt, list(ketch_encode("Error", list(code = code, message = message))))
}

# Wait up to `timeout` seconds for a message and handle it; while the worker holds a batch,
# handle what comes from either socket until its reply is in (or the next deadline).
rt_poll <- function(rt, timeout) {
  ms <- as.integer(ceiling(max(0, timeout) * 1000))
  pollin <- rt$flags$pollin
  for (k in seq_len(64)) {  # then look at the clock, the stop flag and the heartbeat
    sock <- rt$sock
    if (!length(rt$inflight)) {
      # nothing with the worker: only the broker can have something to say. One message,
      # then back to the loop (which polls again at once when more are waiting)
      r <- pbdZMQ::zmq.poll(list(sock), pollin, ms)  # c(-1, EINTR) on a signal: no events
      if (r[1] > 0) rt_handle(rt, ketch_recv_frames(sock, rt$flags))
      if (r[1] <= 0 || !length(rt$inflight) || !is.null(rt$outcome) || !identical(sock, rt$sock)) {
        return(invisible(NULL))
      }
    } else {
      socks <- list(sock, rt$wsock)
      r <- pbdZMQ::zmq.poll(socks, c(pollin, pollin), ms)
      if (r[1] <= 0) return(invisible(NULL))
      if (bitwAnd(pbdZMQ::zmq.poll.get.revents(2L), pollin)) {
        rt_on_worker_reply(rt, ketch_recv_frames(rt$wsock, rt$flags))
      }
      if (bitwAnd(pbdZMQ::zmq.poll.get.revents(1L), pollin)) {
        rt_handle(rt, ketch_recv_frames(sock, rt$flags))
        if (!is.null(rt$outcome) || !identical(sock, rt$sock)) return(invisible(NULL))
      }
    }
    if (rt$interrupted && !rt$draining) rt_drain(rt, "SIGINT")
    # while the worker holds a batch, wait here for its reply (up to the next deadline,
    # which a Welcome just handled may have moved) rather than going round the loop's timers
    ms <- 0L
    if (length(rt$inflight)) {
      now <- rt_now()
      ms <- as.integer(max(0, ceiling((rt_next_deadline(rt, now) - now) * 1000)))
    }
  }
}

# ---------------------------------------------------------------- messages

rt_handle <- function(rt, frames) {
  now <- rt_now()
  rt$last_recv <- now
  # the hot path: a request like one read before (a learnt template) is a batch; its body
  # is read where the batch is computed
  t <- ketch_request_template(frames[[1]])
  if (!is.null(t)) return(rt_on_batch(rt, frames, now, t))
  peek <- ketch_peek(frames[[1]])
  if (!is.null(peek) && peek[1] %in% KETCH_PROTOCOL_VERSIONS && peek[2] == KETCH_BODIES[["PredictRequest"]]) {
    tryCatch(ketch_read_request(frames[[1]]), error = function(e) NULL)  # learns it as a template
    return(rt_on_batch(rt, frames, now))
  }
  msg <- tryCatch(ketch_decode(frames[[1]]), ketch_decode_error = function(e) e)
  version <- if (!is.null(peek)) peek[1] else if (inherits(msg, "condition")) NA else msg$version
  if (!is.na(version) && !version %in% KETCH_PROTOCOL_VERSIONS) {
    # MUST NOT act on it; an Error is not answered with an Error (no ping-pong)
    if (is.null(peek) || peek[2] != KETCH_BODIES[["Error"]]) {
      rt_send_error(rt, "UNSUPPORTED_VERSION",
                    sprintf("protocol version %d is not supported (speaks %s)", version,
                            paste(KETCH_PROTOCOL_VERSIONS, collapse = ", ")))
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
    Shutdown = rt_drain(rt, paste0("Shutdown: ", body$reason)),
    Error = rt_on_error(rt, body),
    Paused = if (rt$draining) rt$paused <- TRUE,
    rt_send_error(rt, "UNKNOWN_MESSAGE", sprintf("%s is not valid from the broker on the backend", msg$type))
  )
  invisible(NULL)
}

rt_on_batch <- function(rt, frames, now, t = NULL) {
  rt$last_batch <- now
  if (is.null(rt$worker)) {
    rt_send(rt, ketch_answer_batch(rt$predict_fn, frames, t))
    return(invisible(NULL))
  }
  if (rt$auto && !is.null(t) && t$n > 0 && t$n * max(rt$item_s) <= KETCH_INLINE_SHARE * rt$heartbeat) {
    reply <- ketch_answer_batch(rt$predict_fn, frames, t)
    done <- rt_now()
    rt_send(rt, reply, done)
    rt_observe(rt, done - now, t$n)
    return(invisible(NULL))
  }
  if (!ketch_send_frames(rt$wsock, frames, rt$flags)) {
    rt_worker_check(rt)  # a worker that died while idle is started again
    if (!ketch_send_frames(rt$wsock, frames, rt$flags)) {
      rt_log(rt, "the predict worker takes no batch; answering it with an error")
      rt_fail_batch(rt, frames[[1]], "WorkerBusy: the predict worker takes no batch")
      return(invisible(NULL))
    }
  }
  rt$inflight[[length(rt$inflight) + 1L]] <- list(generation = rt$generation, header = frames[[1]], sent = now,
                                                   n = if (is.null(t)) NA else t$n)
}

# fork = "auto": a batch of n items took `elapsed` seconds (here, or through the worker,
# queueing included: an upper bound either way).
rt_observe <- function(rt, elapsed, n) {
  rt$item_at <- rt$item_at %% KETCH_INLINE_WINDOW + 1L
  rt$item_s[rt$item_at] <- elapsed / n
}

rt_on_welcome <- function(rt, body) {
  chosen <- if (body$version > 0) body$version else KETCH_PROTOCOL_VERSION  # a version-1 broker names none
  if (!chosen %in% KETCH_PROTOCOL_VERSIONS) {
    return(rt_refused(rt, sprintf("the broker chose protocol version %d, which this container does not speak",
                                  chosen)))
  }
  rt$protocol <- chosen
  # 0 would mean "no figure": keep a heartbeat of 1 s and never declare the broker dead
  rt$heartbeat <- if (body$heartbeat_ms > 0) max(body$heartbeat_ms, 10) / 1000 else 1
  rt$dead_after <- if (body$dead_after_ms > 0) body$dead_after_ms / 1000 else Inf
  if (rt$phase != "ready") rt_log(rt, sprintf("welcome (protocol %d, heartbeat %g ms, dead after %g ms)",
                                              chosen, body$heartbeat_ms, body$dead_after_ms))
  rt$phase <- "ready"
  rt$attempts <- 0
  if (rt$draining) rt_send(rt, list(ketch_encode("Ready", list(credits = 0))))  # a new registration: say it again
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
      # replies to batches of the old registration are dropped (the broker re-queued them)
      rt_log(rt, "broker asks for Hello again (", text, ")")
      rt_hello(rt)
    }  # else a Hello is already on its way
  } else if (identical(body$code, "CONFLICT") && rt$phase == "connecting") {
    if (is.finite(rt$hello_again_at)) return(invisible(NULL))  # already waiting
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
  rt$drain_from <- rt_now()
  rt_log(rt, "draining (", why, "): Ready{credits: 0}, ", length(rt$inflight),
         " batch(es) held; answering every batch already sent")
  rt_send(rt, list(ketch_encode("Ready", list(credits = 0))))
}

# ---------------------------------------------------------------- the worker

rt_worker_start <- function(rt) {
  path <- tempfile("ketch-worker-", fileext = ".ipc")
  rt$wendpoint <- paste0("ipc://", path)
  rt$wpath <- path
  predict_fn <- rt$predict_fn
  endpoint <- rt$wendpoint
  parent <- Sys.getpid()
  rt$worker <- parallel::mcparallel(ketch_worker_main(endpoint, predict_fn, parent), silent = FALSE)
  rt$worker_checked <- rt_now()
}

# Connect to the worker and wait for its first word.
rt_worker_connect <- function(rt) {
  sock <- pbdZMQ::zmq.socket(rt$ctx, pbdZMQ::ZMQ.ST()$PAIR)
  pbdZMQ::zmq.setsockopt(sock, pbdZMQ::ZMQ.SO()$LINGER, 0L)
  pbdZMQ::zmq.setsockopt(sock, pbdZMQ::ZMQ.SO()$SNDTIMEO, 200L)
  pbdZMQ::zmq.setsockopt(sock, pbdZMQ::ZMQ.SO()$RECONNECT_IVL, 10L)
  pbdZMQ::zmq.connect(sock, rt$wendpoint)
  rt$wsock <- sock
  deadline <- rt_now() + 30
  repeat {
    r <- pbdZMQ::zmq.poll(list(sock), rt$flags$pollin, 1000L)
    if (r[1] > 0) break
    if (!is.null(suppressWarnings(parallel::mccollect(rt$worker, wait = FALSE))) || rt_now() > deadline) {
      stop("the predict worker did not start")
    }
  }
  hello <- ketch_recv_frames(sock, rt$flags)
  stopifnot(identical(rawToChar(hello[[1]]), "ready"))
}

# The worker is gone (crashed, killed): fail what it held, start another.
rt_worker_check <- function(rt) {
  rt$worker_checked <- rt_now()
  res <- suppressWarnings(parallel::mccollect(rt$worker, wait = FALSE))
  if (is.null(res)) return(invisible(NULL))
  held <- rt$inflight
  rt$inflight <- list()
  rt_log(rt, "the predict worker ended; failing its ", length(held), " batch(es) and starting another")
  for (job in held) {
    if (job$generation == rt$generation) {
      rt_fail_batch(rt, job$header, "WorkerDied: the process running predict_fn ended")
    }
  }
  pbdZMQ::zmq.close(rt$wsock)
  rt$wsock <- NULL
  unlink(rt$wpath)
  rt_worker_start(rt)
  rt_worker_connect(rt)
}

rt_fail_batch <- function(rt, header, message) {
  batch_id <- tryCatch(ketch_read_request(header)$batch_id, error = function(e) 0)
  rt_send(rt, list(ketch_write_reply(batch_id, 0, NULL, "MODEL_ERROR", message)))
}

rt_on_worker_reply <- function(rt, frames) {
  if (!length(rt$inflight)) return(invisible(NULL))
  job <- rt$inflight[[1]]
  rt$inflight[[1]] <- NULL
  if (rt$auto && !is.na(job$n)) rt_observe(rt, rt_now() - job$sent, job$n)
  if (job$generation == rt$generation && rt$phase == "ready") rt_send(rt, frames)
  else rt_log(rt, "dropping the reply to a batch of an earlier registration")
}

rt_worker_stop <- function(rt) {
  if (is.null(rt$worker)) return(invisible(NULL))
  if (!is.null(rt$wsock)) {
    ketch_send_frames(rt$wsock, list(charToRaw("quit")), rt$flags)
    pbdZMQ::zmq.setsockopt(rt$wsock, pbdZMQ::ZMQ.SO()$LINGER, 1000L)
    pbdZMQ::zmq.close(rt$wsock)
    rt$wsock <- NULL
  }
  # the worker ends at once when idle; one that computes gets a moment, then a kill
  res <- suppressWarnings(parallel::mccollect(rt$worker, wait = FALSE, timeout = 2))
  if (is.null(res)) {
    tools::pskill(rt$worker$pid, tools::SIGKILL)
    suppressWarnings(parallel::mccollect(rt$worker, wait = TRUE))
  }
  unlink(rt$wpath)
  rt$worker <- NULL
}

# The predict worker's loop (in the forked process): answer each batch, exit on "quit"
# or when the serving process is gone. It never touches the parent's sockets.
# @keywords internal
ketch_worker_main <- function(endpoint, predict_fn, parent) {
  ctx <- pbdZMQ::zmq.ctx.new()
  sock <- pbdZMQ::zmq.socket(ctx, pbdZMQ::ZMQ.ST()$PAIR)
  pbdZMQ::zmq.setsockopt(sock, pbdZMQ::ZMQ.SO()$LINGER, 1000L)
  pbdZMQ::zmq.bind(sock, endpoint)
  flags <- list(sndmore = pbdZMQ::ZMQ.SR()$SNDMORE, block = pbdZMQ::ZMQ.SR()$BLOCK,
                rcvmore = pbdZMQ::ZMQ.SO()$RCVMORE, pollin = pbdZMQ::ZMQ.PO()$POLLIN)
  ketch_send_frames(sock, list(charToRaw("ready")), flags)
  on.exit({
    pbdZMQ::zmq.close(sock)
    pbdZMQ::zmq.ctx.destroy(ctx)
  })
  withCallingHandlers({
    repeat {
      r <- pbdZMQ::zmq.poll(list(sock), flags$pollin, 1000L)
      if (r[1] <= 0) {
        # the serving process is gone: end here, there is no one to read a result
        if (!isTRUE(tools::pskill(parent, 0L))) tools::pskill(Sys.getpid(), tools::SIGKILL)
        next
      }
      frames <- ketch_recv_frames(sock, flags)
      if (length(frames) == 1 && identical(frames[[1]], charToRaw("quit"))) break
      ketch_send_frames(sock, ketch_answer_batch(predict_fn, frames), flags)
    }
  }, interrupt = function(c) {
    if (!is.null(findRestart("resume"))) invokeRestart("resume")
  })
  "done"
}

# ---------------------------------------------------------------- batches

ketch_condition <- function(class, message) {
  structure(class = c(class, "error", "condition"), list(message = message, call = NULL))
}

# The reply frames for the frames of a PredictRequest: decode, predict, encode. `t` is the
# learnt template the request matches (ketch_request_template), if any.
# @keywords internal
ketch_answer_batch <- function(predict_fn, frames, t = ketch_request_template(frames[[1]])) {
  if (!is.null(t) && !is.null(t$fast)) {
    fast <- ketch_answer_fast(predict_fn, frames, t)
    if (!is.null(fast)) return(fast)
  }
  req <- if (is.null(t)) NULL else ketch_match_request(frames[[1]])
  if (is.null(req)) req <- tryCatch(ketch_read_request(frames[[1]]), error = function(e) e)
  if (inherits(req, "error")) {
    return(list(ketch_write_reply(0, 0, NULL, "BAD_MESSAGE", conditionMessage(req))))
  }
  batch <- tryCatch(ketch_batch_inputs(req, frames[-1]), error = function(e) e)
  if (inherits(batch, "error")) {
    return(list(ketch_write_reply(req$batch_id, 0, NULL, "BAD_MESSAGE", conditionMessage(batch))))
  }
  result <- ketch_run_predict(predict_fn, batch, attr(batch, "errors"))
  if (!isTRUE(result$ok)) {
    return(list(ketch_write_reply(req$batch_id, result$compute_us, NULL, result$error, result$message)))
  }
  c(list(ketch_write_reply(req$batch_id, result$compute_us, result$outputs)), result$outputs$payloads)
}

# The inputs of a PredictRequest as a list of R values, one per item, with attributes
# "dtype", "budgets_us" and "errors" (NA, or why that item's payload does not fit its
# dtype and shape; such an item's value is NULL). Signals "ketch_bad_frames" when frames
# or shapes do not add up.
# @keywords internal
ketch_batch_inputs <- function(body, payloads) {
  n <- length(body$budgets_us)
  if (length(payloads) != n) {
    stop(ketch_condition("ketch_bad_frames", sprintf("PredictRequest has %d payload frame(s) for %d item(s)",
                                                     length(payloads), n)))
  }
  if (!body$dtype %in% names(KETCH_DTYPES)) {
    stop(ketch_condition("ketch_bad_frames", sprintf("PredictRequest has unknown dtype %s", format(body$dtype))))
  }
  ndim <- body$ndim
  if (length(body$shapes) != ndim * n) {
    stop(ketch_condition("ketch_bad_frames", sprintf("PredictRequest has %d shape entries for %d item(s) of ndim %d",
                                                     length(body$shapes), n, ndim)))
  }
  decoded <- ketch_batch_values(body$dtype, ndim, body$shapes, payloads)
  inputs <- decoded$values
  attr(inputs, "dtype") <- body$dtype
  attr(inputs, "budgets_us") <- body$budgets_us
  attr(inputs, "errors") <- decoded$errors
  inputs
}

ketch_class_message <- function(e) paste0(class(e)[1], ": ", conditionMessage(e))

ketch_clock_us <- function() as.numeric(Sys.time()) * 1e6

# Call predict_fn on the good items of a batch and turn its outputs into reply columns.
# 
# @param errors NA for each item predict_fn gets, else why the item is answered BAD_INPUT.
# @return list(ok = TRUE, outputs = the columns of ketch_encode_outputs(), compute_us), or
#   list(ok = FALSE, error, message, compute_us) for a whole-batch failure.
# @keywords internal
ketch_run_predict <- function(predict_fn, inputs, errors = NULL) {
  n <- length(inputs)
  bad <- !is.null(errors) && !all(is.na(errors))
  todo <- inputs
  if (bad) {
    bad <- !is.na(errors)
    todo <- inputs[!bad]
    attr(todo, "dtype") <- attr(inputs, "dtype")
    if (!is.null(attr(inputs, "budgets_us"))) attr(todo, "budgets_us") <- attr(inputs, "budgets_us")[!bad]
  } else if (!is.null(errors)) {
    attr(todo, "errors") <- NULL
  }
  out <- NULL
  t0 <- ketch_clock_us()
  if (length(todo)) out <- tryCatch(predict_fn(todo), error = function(e) e)
  # at least 1 us once predict_fn ran, as the other SDKs write it (0 is the schema default)
  compute_us <- if (length(todo)) max(1, min(round(ketch_clock_us() - t0), KETCH_MAX_U32)) else 0
  ketch_finish_predict(out, length(todo), compute_us, bad, errors)
}

# What predict_fn returned (`out`, or the error it raised) for `n` items, checked and
# encoded: ketch_run_predict()'s result. `bad` and `errors` say which items it did not get.
ketch_finish_predict <- function(out, n, compute_us, bad = FALSE, errors = NULL) {
  why <- ketch_batch_failure(out, n)
  if (!is.null(why)) {
    if (identical(bad, FALSE)) return(list(ok = FALSE, error = "MODEL_ERROR", message = why, compute_us = compute_us))
    # the items predict_fn got fail with its error; the bad ones keep BAD_INPUT
    enc <- list(ok = logical(n), group = rep(NA_integer_, n), tensors = list(),
                error = rep(KETCH_ERROR_CODES[["MODEL_ERROR"]], n), message = rep(why, n),
                payloads = rep(list(raw(0)), n))
    return(list(ok = TRUE, outputs = ketch_merge_bad(enc, bad, errors), compute_us = compute_us))
  }
  enc <- ketch_encode_outputs(if (n) out else list())
  if (!identical(bad, FALSE)) enc <- ketch_merge_bad(enc, bad, errors)
  list(ok = TRUE, outputs = enc, compute_us = compute_us)
}

# Why what predict_fn returned for `n` items fails the whole batch ("Class: message"), or
# NULL when it is one output per item.
ketch_batch_failure <- function(out, n) {
  if (inherits(out, "error")) return(ketch_class_message(out))
  if (!n) return(NULL)
  if (!(is.list(out) || (is.atomic(out) && is.null(dim(out)))) || is.data.frame(out) || inherits(out, "ketch_tensor")) {
    return(sprintf("BatchSizeError: predict_fn must return a list of %d outputs, not %s", n, class(out)[1]))
  }
  if (length(out) != n) {
    return(sprintf("BatchSizeError: predict_fn returned %d outputs for a batch of %d", length(out), n))
  }
  NULL
}

# Outputs of the good items and BAD_INPUT errors of the others, in item order.
ketch_merge_bad <- function(enc, bad, errors) {
  n <- length(bad)
  good <- which(!bad)
  ok <- logical(n)
  ok[good] <- enc$ok
  group <- rep(NA_integer_, n)
  group[good] <- enc$group
  error <- rep(KETCH_ERROR_CODES[["BAD_INPUT"]], n)
  error[good] <- enc$error
  message <- errors
  message[good] <- enc$message
  payloads <- rep(list(raw(0)), n)
  payloads[good] <- enc$payloads
  list(ok = ok, group = group, tensors = enc$tensors, error = error, message = message, payloads = payloads)
}

# The PredictReply body (generic codec form) and payload frames of a ketch_run_predict()
# result: what ketch_write_reply() writes, for tests and tools.
# @keywords internal
ketch_predict_reply <- function(batch_id, result) {
  if (!isTRUE(result$ok)) {
    return(list(body = list(batch_id = batch_id, compute_us = result$compute_us, outputs = list(),
                            error = result$error, message = result$message), payloads = list()))
  }
  o <- result$outputs
  outputs <- lapply(seq_along(o$ok), function(i) {
    if (o$ok[i]) {
      t <- o$tensors[[o$group[i]]]
      list(status = "OK", output = list(dtype = ketch_enum_name("dtype", t$dtype), shape = t$shape))
    } else {
      list(status = "ERROR", error = ketch_enum_name("code", o$error[i]), message = o$message[i])
    }
  })
  list(body = list(batch_id = batch_id, compute_us = result$compute_us, outputs = outputs),
       payloads = o$payloads)
}
