# The hot path of a replica: a PredictRequest read and a PredictReply written with
# whole-vector operations (one readBin per vtable or vector, writeBin over columns into one
# preallocated raw vector), not through the generic, per-field codec of codec.R. Both
# produce and accept the same messages: the tests compare them on random batches.
#
# Cost on a 2-core machine: reading a request of 64 items takes about 0.1 ms, writing a
# reply of 64 outputs about 0.2 ms, and both grow linearly with the items (the generic
# codec took 1 ms and 45-60 ms).

# ---------------------------------------------------------------- positions and scalars
# Every read is bounds-checked: a position past the end is a "ketch_decode_error", never
# a silent zero (R pads out-of-range raw indexes with 00).

hp_error <- function(...) fb_error("PredictRequest does not decode: ", ...)

hp_check <- function(buf, pos, n) {
  if (is.na(pos) || pos < 0 || pos + n > length(buf)) {
    hp_error(sprintf("read of %.0f bytes at %.0f is past the end of a %d-byte buffer", n, pos, length(buf)))
  }
}

# An offset-sized signed 32-bit word (soffset, uoffset, length); NA (the word 0x80000000)
# is refused, no offset inside a frame comes near it.
hp_i32 <- function(buf, pos) {
  hp_check(buf, pos, 4)
  v <- readBin(buf[pos + 1:4], "integer", size = 4L, endian = "little")
  if (is.na(v)) hp_error(sprintf("offset out of range at %.0f", pos))
  v
}

hp_u16s <- function(buf, pos, n) {
  if (n == 0) return(integer(0))
  hp_check(buf, pos, 2 * n)
  readBin(buf[seq.int(pos + 1, length.out = 2 * n)], "integer", n = n, size = 2L, signed = FALSE, endian = "little")
}

# A table: its position and the field offsets of its vtable (0 for an absent field).
hp_table <- function(buf, pos) {
  vt <- pos - hp_i32(buf, pos)
  size <- hp_u16s(buf, vt, 1L)
  if (size < 4 || size %% 2 != 0) hp_error(sprintf("bad vtable size %d at %.0f", size, vt))
  slots <- hp_u16s(buf, vt + 4, (size - 4) %/% 2)
  list(pos = pos, slots = slots)
}

hp_slot <- function(tab, id) if (id < length(tab$slots)) tab$slots[[id + 1L]] else 0L

# Unsigned words (u32) as doubles, from 16-bit halves (a signed read would turn 2^31 into NA).
hp_u32s <- function(buf, pos, n) {
  if (n == 0) return(numeric(0))
  hp_check(buf, pos, 4 * n)
  h <- readBin(buf[seq.int(pos + 1, length.out = 4 * n)], "integer", n = 2 * n, size = 2L, signed = FALSE,
               endian = "little")
  h[c(TRUE, FALSE)] + 65536 * h[c(FALSE, TRUE)]
}

hp_u8 <- function(buf, tab, id) {
  off <- hp_slot(tab, id)
  if (off == 0) return(0L)
  hp_check(buf, tab$pos + off, 1)
  as.integer(buf[[tab$pos + off + 1]])
}

# Where a vector field's elements start and how many there are (0 when absent).
hp_vector_at <- function(buf, tab, id) {
  off <- hp_slot(tab, id)
  if (off == 0) return(c(0, 0))
  at <- tab$pos + off
  v <- at + hp_i32(buf, at)
  n <- hp_i32(buf, v)
  if (n < 0 || n > length(buf)) hp_error(sprintf("a vector of %d elements in a %d-byte buffer", n, length(buf)))
  c(v + 4, n)
}

# ---------------------------------------------------------------- reading a request

# Version and body type code of a header frame, read without decoding the body.
# 
# @param frame raw vector (frame 0 of a message).
# @return c(version, type) as integers, or NULL when the frame is not a Ketch envelope.
# @keywords internal
ketch_peek <- function(frame) {
  if (!is.raw(frame) || length(frame) < 12 || !identical(frame[5:8], KETCH_IDENTIFIER_RAW)) return(NULL)
  tryCatch({
    ids <- KETCH_FIELD_IDS$Envelope
    env <- hp_table(frame, hp_i32(frame, 0))
    off <- hp_slot(env, ids[["version"]])
    c(if (off == 0) 0L else hp_u16s(frame, env$pos + off, 1L), hp_u8(frame, env, ids[["body_type"]]))
  }, error = function(e) NULL)
}

# The fields of a PredictRequest header that a replica uses, read with a few vector reads.
# 
# @param frame raw vector: a header whose body is a PredictRequest.
# @return list(batch_id, dtype (a name, or the code when unknown), ndim, shapes,
#   budgets_us); signals a "ketch_decode_error" when the frame does not hold a readable
#   PredictRequest.
# @keywords internal
ketch_read_request <- function(frame) {
  known <- ketch_match_request(frame)
  if (!is.null(known)) return(known)
  if (!is.raw(frame) || length(frame) < 12 || !identical(frame[5:8], KETCH_IDENTIFIER_RAW)) {
    hp_error("not a Ketch envelope")
  }
  ids <- KETCH_FIELD_IDS$Envelope
  env <- hp_table(frame, hp_i32(frame, 0))
  type <- hp_u8(frame, env, ids[["body_type"]])
  if (type != KETCH_BODIES[["PredictRequest"]]) hp_error(sprintf("body type %d", type))
  off <- hp_slot(env, ids[["body"]])
  if (off == 0) hp_error("no body")
  at <- env$pos + off
  body <- hp_table(frame, at + hp_i32(frame, at))
  f <- ketch_field_ids("PredictRequest")
  off <- hp_slot(body, f[["batch_id"]])
  batch_id <- if (off == 0) 0 else {
    w <- hp_u32s(frame, body$pos + off, 2L)
    w[1] + 4294967296 * w[2]
  }
  shapes <- hp_vector_at(frame, body, f[["shapes"]])
  budgets <- hp_vector_at(frame, body, f[["budgets_us"]])
  shape_values <- if (shapes[2] == 0) numeric(0) else {
    w <- hp_u32s(frame, shapes[1], 2 * shapes[2])
    hi <- w[c(FALSE, TRUE)]
    w[c(TRUE, FALSE)] + 4294967296 * (hi - (hi >= 2147483648) * 4294967296)
  }
  dtype <- hp_u8(frame, body, f[["dtype"]])
  name <- names(KETCH_DTYPES)[match(dtype, KETCH_DTYPES)]
  req <- list(batch_id = batch_id,
       dtype = if (is.na(name)) dtype else name,
       ndim = as.numeric(hp_u8(frame, body, f[["ndim"]])),
       shapes = shape_values,
       budgets_us = hp_u32s(frame, budgets[1], budgets[2]))
  if (off != 0 && !is.na(name)) ketch_learn_request(frame, req, body$pos + off, budgets)
  req
}

# ---------------------------------------------------------------- requests as templates
# The broker writes the PredictRequests of a model alike: two requests for the same number
# of items of the same shape differ only in the batch id and the budgets. A request read
# the long way is kept as a template of itself (those bytes masked), one per frame length,
# at most 256; a request equal to a template outside them is read with two readBin calls.

KETCH_REQUEST_TEMPLATES <- new.env(parent = emptyenv())

# The template a frame matches, or NULL: what the serving loop asks of each message.
ketch_request_template <- function(frame) {
  t <- KETCH_REQUEST_TEMPLATES[[as.character(length(frame))]]
  if (is.null(t) || !identical(frame[t$fixed_at], t$fixed)) NULL else t
}

ketch_learn_request <- function(frame, req, batch_at, budgets) {
  variable <- c(batch_at + 0:7, if (budgets[2] > 0) budgets[1] + seq_len(4 * budgets[2]) - 1)
  fixed <- setdiff(seq_along(frame), variable + 1)
  if (length(KETCH_REQUEST_TEMPLATES) >= 256L) rm(list = ls(KETCH_REQUEST_TEMPLATES), envir = KETCH_REQUEST_TEMPLATES)
  assign(as.character(length(frame)),
         list(fixed_at = fixed, fixed = frame[fixed], batch_at = batch_at, batch_idx = batch_at + 1:8,
              budgets_at = budgets[1], n = budgets[2], req = req, fast = ketch_fast_plan(req)),
         envir = KETCH_REQUEST_TEMPLATES)
}

# A PredictRequest that matches a learnt template, read without a parse; NULL otherwise.
# @keywords internal
ketch_match_request <- function(frame) {
  t <- ketch_request_template(frame)
  if (is.null(t)) return(NULL)
  req <- t$req
  req$batch_id <- hp_u64(frame, t$batch_idx)
  if (t$n > 0) req$budgets_us <- hp_u32s(frame, t$budgets_at, t$n)
  req
}

# Little-endian integers by arithmetic on the bytes (primitives only: readBin and writeBin
# are R closures that cost more than the arithmetic for a few values).
KETCH_POW4 <- 256^(0:3)
KETCH_POW8 <- 256^(0:7)

# A u64 (below 2^53) at the byte indexes `idx` (1-based, eight of them).
hp_u64 <- function(frame, idx) sum(as.integer(frame[idx]) * KETCH_POW8)

# n u32s (as doubles) starting at byte offset `at` (0-based).
hp_u32s_at <- function(frame, at, n) {
  if (n == 1L) return(sum(as.integer(frame[at + 1:4]) * KETCH_POW4))
  drop(KETCH_POW4 %*% matrix(as.integer(frame[seq.int(at + 1, length.out = 4L * n)]), 4L))
}

# ---------------------------------------------------------------- the fast path
# A batch whose request matches a learnt template of FLOAT64 or FLOAT32 items of ndim 0 or
# 1, whose payloads all have the sizes that template's shapes give, and whose model returns
# one double per item (a plain double vector, or a list of plain doubles of length one) is
# answered with a handful of vector operations: one readBin for every input, one writeBin
# for every output, and the reply header from a template of its own. Anything else (and
# whatever goes wrong) takes the general path, which says what is wrong.

# What the fast path needs of a request learnt as a template, or NULL when it does not fit.
ketch_fast_plan <- function(req) {
  size <- c(FLOAT64 = 8L, FLOAT32 = 4L)[req$dtype]
  n <- length(req$budgets_us)
  if (is.na(size) || req$ndim > 1 || n == 0) return(NULL)
  counts <- if (req$ndim == 0) rep(1, n) else req$shapes
  ones <- all(counts == 1)
  list(dtype = req$dtype, size = unname(size), n = n, lens = counts * size, total = sum(counts),
       pieces = if (ones) NULL else ketch_split_factor(counts),
       out_pieces = if (n == 1) NULL else ketch_split_factor(rep.int(8L, n)))
}

# A factor cutting a vector into consecutive pieces of `counts` elements (for split()).
ketch_split_factor <- function(counts) {
  n <- length(counts)
  structure(rep.int(seq_len(n), counts), levels = as.character(seq_len(n)), class = "factor")
}

# The reply frames of a batch on the fast path, or NULL when it does not fit (nothing has
# been computed then); `t` is the template its request matched.
ketch_answer_fast <- function(predict_fn, frames, t) {
  f <- t$fast
  n <- f$n
  if (length(frames) != n + 1L) return(NULL)
  payloads <- frames[-1L]
  if (any(lengths(payloads) != f$lens)) return(NULL)
  frame <- frames[[1L]]
  flat <- readBin(if (n == 1L) payloads[[1L]] else unlist(payloads, use.names = FALSE), "double", n = f$total,
                  size = f$size, endian = "little")
  inputs <- if (is.null(f$pieces)) as.list(flat) else if (n == 1L) list(flat) else unname(split(flat, f$pieces))
  attr(inputs, "dtype") <- f$dtype
  attr(inputs, "budgets_us") <- hp_u32s_at(frame, t$budgets_at, n)
  t0 <- ketch_clock_us()
  out <- tryCatch(predict_fn(inputs), error = function(e) e)
  compute_us <- max(1, min(round(ketch_clock_us() - t0), KETCH_MAX_U32))
  batch_id <- hp_u64(frame, t$batch_idx)
  if (is.list(out) && !is.object(out) && length(out) == n && all(lengths(out) == 1L)) {
    flat <- unlist(out, use.names = FALSE)  # plain numbers only: anything else unlists to another type
    if (is.double(flat) && all(vapply(out, function(v) is.double(v) && is.null(attributes(v)), NA))) out <- flat
  }
  if (!is.double(out) || length(out) != n || !is.null(attributes(out))) {
    # not one plain double per item: the general path encodes it (or says what is wrong)
    result <- ketch_finish_predict(out, n, compute_us)
    if (!isTRUE(result$ok)) return(list(ketch_write_reply(batch_id, compute_us, NULL, result$error, result$message)))
    return(c(list(ketch_write_reply(batch_id, compute_us, result$outputs)), result$outputs$payloads))
  }
  bytes <- writeBin(out, raw(), size = 8L, endian = "little")
  header <- KETCH_PLAIN_REPLIES[[as.character(n)]]
  if (is.null(header)) header <- ketch_plain_reply_template(n)
  header[KETCH_REPLY_BATCH_ID_AT + 1:8] <- le_u64_1(batch_id)
  header[KETCH_REPLY_COMPUTE_AT + 1:4] <- le_u32_1(compute_us)
  c(list(header), if (n == 1L) list(bytes) else unname(split(bytes, f$out_pieces)))
}

# Reply headers of n FLOAT64 scalars, by n.
KETCH_PLAIN_REPLIES <- new.env(parent = emptyenv())

ketch_plain_reply_template <- function(n) {
  outputs <- list(ok = rep(TRUE, n), group = rep(1L, n),
                  tensors = list(list(dtype = KETCH_DTYPES[["FLOAT64"]], shape = numeric(0))),
                  error = integer(n), message = character(n))
  header <- ketch_build_reply(0, 0, outputs, "NONE", "")
  assign(as.character(n), header, envir = KETCH_PLAIN_REPLIES)
  header
}

# One whole number in [0, 2^32) as a little-endian u32, and one in [0, 2^53) as a u64.
le_u32_1 <- function(x) as.raw((x %/% KETCH_POW4) %% 256)
le_u64_1 <- function(x) as.raw((x %/% KETCH_POW8) %% 256)

# ---------------------------------------------------------------- writing a reply

le_i32 <- function(x) writeBin(as.integer(x), raw(), size = 4L, endian = "little")
le_u16 <- function(x) writeBin(as.integer(x), raw(), size = 2L, endian = "little")
# Whole numbers in [0, 2^32) as u32: those from 2^31 up written as their two's complement
# (2^31 itself becomes NA_integer_, whose bytes are those of 2^31).
le_u32 <- function(x) {
  x <- as.numeric(x)
  big <- x >= 2147483648
  x[big] <- x[big] - 4294967296
  writeBin(suppressWarnings(as.integer(x)), raw(), size = 4L, endian = "little")
}
# Whole numbers below 2^53 in magnitude as u64 / i64 (two's complement through floor).
le_64 <- function(x) {
  x <- as.numeric(x)
  hi <- floor(x / 4294967296)
  lo <- x - hi * 4294967296
  hi[hi < 0] <- hi[hi < 0] + 4294967296
  le_u32(as.vector(rbind(lo, hi)))
}

# A string as a flatbuffers string: u32 length, the UTF-8 bytes, a 0, padding to 4.
hp_string_bytes <- function(s) {
  b <- charToRaw(enc2utf8(s))
  n <- length(b)
  c(le_i32(n), b, raw(1L + (-(n + 1L)) %% 4L))
}

# Replies whose outputs are all OK and of one type differ only in the batch id (bytes 56
# to 63) and compute_us (64 to 67): one template per (items, dtype, shape), at most 256.
KETCH_REPLY_TEMPLATES <- new.env(parent = emptyenv())
KETCH_REPLY_BATCH_ID_AT <- 56L
KETCH_REPLY_COMPUTE_AT <- 64L

# The PredictReply header for one batch, written in one pass into a preallocated vector.
# 
# Layout, every child after its parent (uoffsets point forward) and every scalar aligned
# to its size: root offset, "KTCH", the Envelope (vtable, table), the PredictReply
# (vtable, table; batch id at an 8-aligned position), its message (a whole-batch
# failure), the outputs vector, two shared Output vtables (OK: only `output`; ERROR:
# status, error, message), one Output table per item, one Tensor table per distinct
# (dtype, shape) with its shape vector, shared by all the outputs of that type, and the
# error messages.
# 
# @param batch_id,compute_us numbers (u64, u32).
# @param outputs NULL for a whole-batch failure, else the columns made by
#   ketch_encode_outputs(): ok, group, tensors, error, message.
# @param error,message a whole-batch failure's code (a name) and text.
# @return a raw vector.
# @keywords internal
ketch_write_reply <- function(batch_id, compute_us, outputs = NULL, error = "NONE", message = "") {
  n <- if (is.null(outputs)) 0L else length(outputs$ok)
  if (n > 0 && length(outputs$tensors) == 1L && all(outputs$ok)) {
    t <- outputs$tensors[[1]]
    key <- paste(c(n, t$dtype, t$shape), collapse = " ")
    buf <- KETCH_REPLY_TEMPLATES[[key]]
    if (is.null(buf)) {
      buf <- ketch_build_reply(0, 0, outputs, "NONE", "")
      if (length(KETCH_REPLY_TEMPLATES) >= 256L) rm(list = ls(KETCH_REPLY_TEMPLATES), envir = KETCH_REPLY_TEMPLATES)
      assign(key, buf, envir = KETCH_REPLY_TEMPLATES)
    }
    buf[KETCH_REPLY_BATCH_ID_AT + 1:8] <- le_64(batch_id)
    buf[KETCH_REPLY_COMPUTE_AT + 1:4] <- le_u32(compute_us)
    return(buf)
  }
  ketch_build_reply(batch_id, compute_us, outputs, error, message)
}

ketch_build_reply <- function(batch_id, compute_us, outputs, error, message) {
  n <- if (is.null(outputs)) 0L else length(outputs$ok)
  f <- ketch_field_ids("PredictReply")
  # Envelope: vtable at 8 (5 slots), table at 20: soffset, body uoffset @+4,
  # version u16 @+8, body type u8 @+10
  env_vt <- 8
  env <- 20
  rep_vt <- 32
  n_rep_slots <- max(f) + 1L
  rep <- 48  # 8-aligned: the u64 batch id at rep + 8
  # PredictReply table: soffset, pad, batch_id u64 @+8, compute_us u32 @+16, outputs @+20,
  # message @+24, error u16 @+28
  pos <- rep + 32
  msg_bytes <- if (nzchar(message)) hp_string_bytes(message) else raw(0)
  msg_pos <- pos
  pos <- pos + length(msg_bytes)
  vec <- pos
  if (n > 0) {
    pos <- vec + 4 + 4 * n
    ok_vt <- pos
    err_vt <- pos + 8
    tables <- pos + 20
    sizes <- ifelse(outputs$ok, 8, 12)
    t_pos <- tables + c(0, cumsum(sizes))[seq_len(n)]
    pos <- tables + sum(sizes)
    tensors <- outputs$tensors
    k <- length(tensors)
    ten_vt <- pos  # two vtables: with a shape, without
    ten <- pos + 16 + 12 * (seq_len(k) - 1)
    pos <- pos + 16 + 12 * k
    shape_pos <- numeric(k)
    shape_bytes <- vector("list", k)
    for (g in seq_len(k)) {
      shape <- tensors[[g]]$shape
      if (length(shape) == 0) next
      pad <- (-(pos + 4)) %% 8  # the int64 elements 8-aligned
      shape_pos[g] <- pos + pad
      shape_bytes[[g]] <- c(raw(pad), le_i32(length(shape)), le_64(shape))
      pos <- pos + length(shape_bytes[[g]])
    }
    bad <- which(!outputs$ok)
    err_strings <- lapply(outputs$message[bad], hp_string_bytes)
    err_pos <- pos + c(0, cumsum(lengths(err_strings)))[seq_along(bad)]
    pos <- pos + sum(lengths(err_strings))
  }
  total <- pos + (-pos) %% 8
  buf <- raw(total)
  put <- function(at, bytes) buf[seq.int(at + 1, length.out = length(bytes))] <<- bytes
  put(0, le_i32(env))
  put(4, KETCH_IDENTIFIER_RAW)
  ev <- integer(5)
  ev[1:2] <- c(10L, 12L)
  e <- ketch_field_ids("Envelope")
  ev[3L + e[["version"]]] <- 8L
  ev[3L + e[["body_type"]]] <- 10L
  ev[3L + e[["body"]]] <- 4L
  put(env_vt, le_u16(ev))
  put(env, c(le_i32(c(env - env_vt, rep - (env + 4))), le_u16(KETCH_BODY_SINCE[["PredictReply"]]),
             as.raw(KETCH_BODIES[["PredictReply"]])))
  rv <- integer(2L + n_rep_slots)
  rv[1:2] <- c(4L + 2L * n_rep_slots, 32L)
  rv[3L + f[["batch_id"]]] <- 8L
  rv[3L + f[["compute_us"]]] <- 16L
  if (n > 0) rv[3L + f[["outputs"]]] <- 20L
  if (length(msg_bytes)) rv[3L + f[["message"]]] <- 24L
  code <- KETCH_ERROR_CODES[[error]]
  if (code != 0) rv[3L + f[["error"]]] <- 28L
  put(rep_vt, le_u16(rv))
  put(rep, le_i32(rep - rep_vt))
  put(rep + KETCH_REPLY_BATCH_ID_AT - 48, le_64(batch_id))
  put(rep + KETCH_REPLY_COMPUTE_AT - 48, le_u32(compute_us))
  if (n > 0) put(rep + 20, le_i32(vec - (rep + 20)))
  if (length(msg_bytes)) {
    put(rep + 24, le_i32(msg_pos - (rep + 24)))
    put(msg_pos, msg_bytes)
  }
  put(rep + 28, le_u16(code))
  if (n == 0) return(buf)
  slots <- vec + 4 + 4 * (seq_len(n) - 1)
  put(vec, le_i32(c(n, t_pos - slots)))
  o <- ketch_field_ids("Output")
  ov <- c(8L, 8L, 0L, 0L)
  ov[3L + o[["output"]]] <- 4L
  ov <- ov[seq_len(2L + o[["output"]] + 1L)]
  xv <- integer(2L + max(o) + 1L)
  xv[1:2] <- c(2L * length(xv), 12L)
  xv[3L + o[["status"]]] <- 10L
  xv[3L + o[["error"]]] <- 8L
  xv[3L + o[["message"]]] <- 4L
  put(ok_vt, c(le_u16(ov), raw(8 - 2 * length(ov))))
  put(err_vt, c(le_u16(xv), raw(12 - 2 * length(xv))))
  # the Output tables as 32-bit words: OK (soffset, tensor uoffset),
  # ERROR (soffset, message uoffset, error u16 | status u8 << 16)
  ok <- outputs$ok
  words_per <- ifelse(ok, 2L, 3L)
  first <- c(0L, cumsum(words_per))[seq_len(n)] + 1L
  words <- numeric(sum(words_per))
  words[first[ok]] <- t_pos[ok] - ok_vt
  words[first[ok] + 1L] <- ten[outputs$group[ok]] - (t_pos[ok] + 4)
  if (length(bad)) {
    words[first[bad]] <- t_pos[bad] - err_vt
    words[first[bad] + 1L] <- err_pos - (t_pos[bad] + 4)
    words[first[bad] + 2L] <- outputs$error[bad] + KETCH_STATUS[["ERROR"]] * 65536
  }
  put(tables, le_i32(words))
  t <- ketch_field_ids("Tensor")
  with_shape <- integer(4)
  with_shape[1:2] <- c(8L, 12L)
  with_shape[3L + t[["dtype"]]] <- 8L
  with_shape[3L + t[["shape"]]] <- 4L
  no_shape <- with_shape
  no_shape[3L + t[["shape"]]] <- 0L
  put(ten_vt, c(le_u16(with_shape), le_u16(no_shape)))
  for (g in seq_len(k)) {
    has <- shape_pos[g] > 0
    put(ten[g], c(le_i32(c(ten[g] - (ten_vt + if (has) 0 else 8), if (has) shape_pos[g] - (ten[g] + 4) else 0)),
                  as.raw(tensors[[g]]$dtype)))
    if (has) put(shape_pos[g] - (length(shape_bytes[[g]]) - 4 - 8 * length(tensors[[g]]$shape)),
                 shape_bytes[[g]])
  }
  for (i in seq_along(bad)) put(err_pos[i], err_strings[[i]])
  buf
}
