# Shared helpers: where the SDK and the golden vectors are, a fake broker (a ROUTER bound
# on a free port) and model containers started as child processes.

ketch_sdk_root <- function() {
  root <- getOption("ketch.sdk_root")
  if (!is.null(root)) return(root)
  installed <- system.file(package = "ketch")
  if (nzchar(installed) && file.exists(file.path(installed, "serve_example.R"))) return(installed)
  normalizePath(file.path("..", ".."), mustWork = FALSE)
}

ketch_script <- function(name) {
  root <- ketch_sdk_root()
  for (path in c(file.path(root, "inst", name), file.path(root, name))) if (file.exists(path)) return(path)
  NA_character_
}

vectors_dir <- function() {
  dir <- Sys.getenv("KETCH_VECTORS", "")
  if (!nzchar(dir)) dir <- file.path(ketch_sdk_root(), "..", "..", "schemas", "vectors")
  if (!dir.exists(dir)) testthat::skip(paste("golden vectors not found at", dir))
  normalizePath(dir)
}

vector_names <- function() sub("\\.bin$", "", sort(list.files(vectors_dir(), pattern = "\\.bin$")))

read_vector <- function(name) {
  path <- file.path(vectors_dir(), paste0(name, ".bin"))
  readBin(path, "raw", n = file.size(path))
}

read_twin <- function(name) {
  jsonlite::fromJSON(file.path(vectors_dir(), paste0(name, ".json")), simplifyVector = FALSE)
}

twin_payloads <- function(twin) lapply(twin$payloads, function(p) jsonlite::base64_dec(p))

# Canonical JSON text as a parsed tree, to compare with a parsed twin.
as_tree <- function(msg) jsonlite::fromJSON(ketch_canonical_json(msg), simplifyVector = FALSE)

f64 <- function(x) writeBin(as.double(x), raw(), size = 8L, endian = "little")

# ---------------------------------------------------------------- fake broker

fake_broker <- function() {
  b <- new.env()
  b$ctx <- pbdZMQ::zmq.ctx.new()
  b$sock <- pbdZMQ::zmq.socket(b$ctx, pbdZMQ::ZMQ.ST()$ROUTER)
  pbdZMQ::zmq.setsockopt(b$sock, pbdZMQ::ZMQ.SO()$LINGER, 0L)
  pbdZMQ::zmq.setsockopt(b$sock, pbdZMQ::ZMQ.SO()$SNDTIMEO, 2000L)
  stopifnot(pbdZMQ::zmq.bind(b$sock, "tcp://127.0.0.1:*") == 0)
  last <- pbdZMQ::zmq.getsockopt(b$sock, pbdZMQ::ZMQ.SO()$LAST_ENDPOINT, strrep(" ", 256))
  b$endpoint <- regmatches(last, regexpr("tcp://127\\.0\\.0\\.1:[0-9]+", last))
  stopifnot(length(b$endpoint) == 1)
  b
}

broker_close <- function(b) {
  if (!is.null(b$sock)) pbdZMQ::zmq.close(b$sock)
  if (!is.null(b$ctx)) pbdZMQ::zmq.ctx.destroy(b$ctx)
  b$sock <- b$ctx <- NULL
}

# One message within timeout seconds, or NULL. Never blocks past the timeout.
broker_recv <- function(b, timeout) {
  deadline <- proc.time()[["elapsed"]] + timeout
  repeat {
    left <- deadline - proc.time()[["elapsed"]]
    if (left <= 0) return(NULL)
    r <- pbdZMQ::zmq.poll(c(b$sock), c(pbdZMQ::ZMQ.PO()$POLLIN), as.integer(ceiling(left * 1000)))
    if (r[1] > 0) break  # r[1] is -1 on EINTR (a child exiting): poll again
  }
  frames <- pbdZMQ::zmq.recv.multipart(b$sock, unserialize = FALSE)
  msg <- ketch_decode(frames[[2]])
  msg$identity <- frames[[1]]
  msg$payloads <- frames[-(1:2)]
  msg$at <- proc.time()[["elapsed"]]
  msg
}

# Receive until a message of `type` arrives; the others (heartbeats, say) are kept in
# attr(result, "skipped"). Fails the test on timeout.
broker_expect <- function(b, type, timeout = 10, child = NULL) {
  deadline <- proc.time()[["elapsed"]] + timeout
  skipped <- list()
  repeat {
    msg <- broker_recv(b, deadline - proc.time()[["elapsed"]])
    if (is.null(msg)) {
      seen <- paste(vapply(skipped, `[[`, "", "type"), collapse = ", ")
      stop(sprintf("no %s within %g s (got: %s)%s", type, timeout, if (nzchar(seen)) seen else "nothing",
                   if (is.null(child)) "" else paste0("\ncontainer log:\n", container_log(child))), call. = FALSE)
    }
    if (msg$type == type) {
      attr(msg, "skipped") <- skipped
      return(msg)
    }
    skipped[[length(skipped) + 1]] <- msg
  }
}

broker_send <- function(b, identity, type, body = list(), payloads = list(), version = 1) {
  frames <- c(list(identity, ketch_encode(type, body, version = version)), payloads)
  pbdZMQ::zmq.send.multipart(b$sock, frames, serialize = FALSE)
}

# ---------------------------------------------------------------- containers

# Start inst/serve_example.R (optionally under inst/sigterm_to_sigint.sh) in the
# background; the pid is that of the Rscript (or wrapper) process itself.
start_container <- function(endpoint, kind, args = character(0), wrapper = FALSE) {
  script <- ketch_script("serve_example.R")
  if (is.na(script)) testthat::skip("serve_example.R not found")
  dir <- tempfile("ketch-container-")
  dir.create(dir)
  child <- list(log = file.path(dir, "log"), pid_file = file.path(dir, "pid"), rc_file = file.path(dir, "rc"))
  cmd <- paste(c(shQuote(file.path(R.home("bin"), "Rscript")), shQuote(script), "--broker", endpoint,
                 "--kind", kind, shQuote(args)), collapse = " ")
  if (wrapper) cmd <- paste("sh", shQuote(ketch_script("sigterm_to_sigint.sh")), cmd)
  line <- sprintf("%s > %s 2>&1 & echo $! > %s; wait $!; echo $? > %s.tmp; mv %s.tmp %s", cmd,
                  shQuote(child$log), shQuote(child$pid_file), shQuote(child$rc_file),
                  shQuote(child$rc_file), shQuote(child$rc_file))
  system2("sh", c("-c", shQuote(line)), wait = FALSE, stdout = FALSE, stderr = FALSE)
  deadline <- proc.time()[["elapsed"]] + 60
  while (!file.exists(child$pid_file) || length(readLines(child$pid_file, warn = FALSE)) == 0) {
    if (proc.time()[["elapsed"]] > deadline) stop("container did not start")
    Sys.sleep(0.02)
  }
  child$pid <- as.integer(readLines(child$pid_file, warn = FALSE)[1])
  child
}

# Exit status of the container once it has ended, waiting up to `timeout` s; NA if alive.
container_rc <- function(child, timeout = 10) {
  deadline <- proc.time()[["elapsed"]] + timeout
  while (!file.exists(child$rc_file)) {
    if (proc.time()[["elapsed"]] > deadline) return(NA_integer_)
    Sys.sleep(0.05)
  }
  as.integer(readLines(child$rc_file, warn = FALSE)[1])
}

container_log <- function(child) {
  if (!file.exists(child$log)) return("")
  paste(readLines(child$log, warn = FALSE), collapse = "\n")
}

# Kill by pid whatever happened (and the R process a wrapper started, when known).
stop_container <- function(child, extra_pids = integer(0)) {
  for (pid in c(child$pid, extra_pids)) {
    if (!file.exists(child$rc_file) || pid != child$pid) tools::pskill(pid, tools::SIGKILL)
  }
  container_rc(child, 5)
  invisible(NULL)
}
