# Payload frames <-> R values (docs/protocol.md section 2).
#
# Decoding a payload of a wire dtype gives:
#   BOOL                                      logical
#   INT8, INT16, INT32, UINT8, UINT16         integer
#   UINT32, INT64, UINT64, FLOAT16, FLOAT32,  double (64-bit integers exact below 2^53)
#   FLOAT64
#   BYTES                                     raw
#   STRING                                    character(1), UTF-8
#   JSON                                      jsonlite::fromJSON(simplifyVector = TRUE,
#                                             simplifyDataFrame = FALSE,
#                                             simplifyMatrix = FALSE); an empty payload
#                                             is NULL
# A numeric payload of shape [] or [n] is a plain vector; with two or more dimensions it
# is an array with dim = shape (the wire is C/row-major order, R arrays are column-major;
# the conversion keeps x[i, j] equal to element (i, j)).
#
# Encoding an R value (an output of predict_fn) picks the dtype from the R type:
#   logical -> BOOL, integer -> INT32, double -> FLOAT64, raw -> BYTES,
#   character(1) or factor of length 1 -> STRING,
#   anything else (lists, NULL, longer character vectors, data frames) -> JSON
#   (jsonlite::toJSON(auto_unbox = TRUE, digits = NA, null = "null", na = "null")).
# Shape: dim(x) when x has one; otherwise [] for length 1 and [n] for length n. Use
# ketch_tensor(x, dtype, shape) to choose the dtype (e.g. "float32", "int64", "json")
# or the shape (e.g. [1] for a one-element vector).

KETCH_ITEMSIZE <- c(BOOL = 1L, INT8 = 1L, INT16 = 2L, INT32 = 4L, INT64 = 8L, UINT8 = 1L,
                    UINT16 = 2L, UINT32 = 4L, UINT64 = 8L, FLOAT16 = 2L, FLOAT32 = 4L,
                    FLOAT64 = 8L)
KETCH_SCALAR_KIND <- c(BOOL = "bool", INT8 = "i8", INT16 = "i16", INT32 = "i32", INT64 = "i64",
                       UINT8 = "u8", UINT16 = "u16", UINT32 = "u32", UINT64 = "u64",
                       FLOAT32 = "f32", FLOAT64 = "f64")
KETCH_TEXT_DTYPES <- c("BYTES", "STRING", "JSON")

ketch_dtype_name <- function(dtype) {
  if (is.numeric(dtype)) {
    name <- names(KETCH_DTYPES)[match(dtype, KETCH_DTYPES)]
  } else {
    name <- toupper(as.character(dtype))
    if (!name %in% names(KETCH_DTYPES)) name <- NA
  }
  if (length(name) != 1 || is.na(name)) {
    stop(sprintf("unknown dtype %s; one of %s", format(dtype),
                 paste(tolower(names(KETCH_DTYPES)), collapse = ", ")))
  }
  name
}

#' Payload frames and R values
#'
#' Numeric payloads are little-endian in C (row-major) order; arrays keep \code{x[i, j]}
#' equal to element (i, j). Decoding gives logical (BOOL), integer (INT8, INT16, INT32,
#' UINT8, UINT16), double (UINT32, INT64, UINT64, FLOAT16, FLOAT32, FLOAT64), raw (BYTES),
#' character (STRING) or parsed JSON (JSON). Encoding picks the dtype from the R type:
#' logical BOOL, integer INT32, double FLOAT64, raw BYTES, one string STRING, anything
#' else JSON. \code{ketch_tensor} marks an output with the dtype or shape to send it as.
#'
#' @param value an R value.
#' @param dtype a dtype name such as \code{"float32"} or \code{"json"}; \code{NULL}
#'   picks it from the R type.
#' @param shape numeric shape; empty for a scalar or a text kind; \code{NULL} takes
#'   \code{dim(value)}, or [] / [n] from its length.
#' @param payload raw vector, one payload frame.
#' @return \code{ketch_tensor}: a marked value for \code{predict_fn} to return.
#'   \code{ketch_payload_to_value}: the R value. \code{ketch_value_to_payload}:
#'   \code{list(dtype, shape, payload)}.
#' @examples
#' p <- ketch_value_to_payload(matrix(1:6, 2, 3))
#' p$shape
#' ketch_payload_to_value(p$dtype, p$shape, p$payload)
#' ketch_value_to_payload(ketch_tensor(c(0.5, 2), "float32"))$dtype
#' @export
ketch_tensor <- function(value, dtype = NULL, shape = NULL) {
  structure(list(value = value, dtype = if (is.null(dtype)) NULL else ketch_dtype_name(dtype),
                 shape = shape), class = "ketch_tensor")
}

# ---------------------------------------------------------------- decoding

#' @rdname ketch_tensor
#' @export
ketch_payload_to_value <- function(dtype, shape, payload) {
  dtype <- ketch_dtype_name(dtype)
  if (dtype == "BYTES") return(payload)
  if (dtype == "STRING") return(ketch_utf8(payload))
  if (dtype == "JSON") {
    if (length(payload) == 0) return(NULL)
    return(jsonlite::fromJSON(ketch_utf8(payload), simplifyVector = TRUE,
                              simplifyDataFrame = FALSE, simplifyMatrix = FALSE))
  }
  shape <- as.numeric(shape)
  n <- prod(shape)
  size <- KETCH_ITEMSIZE[[dtype]]
  if (length(payload) != n * size) {
    stop(sprintf("payload of %d bytes does not match %s shape [%s] (%.0f bytes)", length(payload),
                 dtype, paste(shape, collapse = ", "), n * size))
  }
  values <- if (dtype == "FLOAT16") {
    half_to_double(fb_unpack(payload, "u16", n))
  } else {
    v <- fb_unpack(payload, KETCH_SCALAR_KIND[[dtype]], n)
    # INT32 -2^31 is R's NA_integer_: it decodes as NA
    if (dtype %in% c("INT8", "INT16", "INT32", "UINT8", "UINT16")) suppressWarnings(as.integer(v)) else v
  }
  if (length(shape) < 2) return(values)
  if (n == 0) return(array(values, dim = shape))
  aperm(array(values, dim = rev(shape)), rev(seq_along(shape)))
}

ketch_utf8 <- function(payload) {
  if (any(payload == as.raw(0L))) stop("text payload contains a NUL byte")
  s <- rawToChar(payload)
  Encoding(s) <- "UTF-8"
  if (!validUTF8(s)) stop("text payload is not valid UTF-8")
  s
}

# ---------------------------------------------------------------- encoding

#' @rdname ketch_tensor
#' @export
ketch_value_to_payload <- function(value) {
  dtype <- NULL
  shape <- NULL
  if (inherits(value, "ketch_tensor")) {
    dtype <- value$dtype
    shape <- value$shape
    value <- value$value
  }
  if (is.factor(value)) value <- as.character(value)
  if (is.null(dtype)) dtype <- ketch_infer_dtype(value)
  if (dtype == "JSON") {
    text <- if (is.null(value)) "null" else
      as.character(jsonlite::toJSON(value, auto_unbox = TRUE, digits = NA, null = "null", na = "null"))
    return(list(dtype = dtype, shape = numeric(0), payload = charToRaw(enc2utf8(text))))
  }
  if (dtype == "STRING") {
    if (!is.character(value) || length(value) != 1 || is.na(value)) {
      stop("a STRING output must be one non-NA character string")
    }
    return(list(dtype = dtype, shape = numeric(0), payload = charToRaw(enc2utf8(value))))
  }
  if (dtype == "BYTES") {
    if (is.character(value) && length(value) == 1) value <- charToRaw(enc2utf8(value))
    if (!is.raw(value)) stop("a BYTES output must be a raw vector")
    return(list(dtype = dtype, shape = numeric(0), payload = as.vector(value)))
  }
  if (!(is.numeric(value) || is.logical(value))) {
    stop(sprintf("a %s output must be numeric or logical, not %s", dtype, class(value)[1]))
  }
  d <- dim(value)
  if (is.null(shape)) shape <- if (!is.null(d)) d else if (length(value) == 1) numeric(0) else length(value)
  shape <- as.numeric(shape)
  if (prod(shape) != length(value)) {
    stop(sprintf("shape [%s] does not hold %d values", paste(shape, collapse = ", "), length(value)))
  }
  flat <- if (length(d) >= 2) as.vector(aperm(value, rev(seq_along(d)))) else as.vector(value)
  if (dtype == "BOOL" && anyNA(flat)) stop("a BOOL output cannot hold NA")
  if (!dtype %in% c("FLOAT16", "FLOAT32", "FLOAT64", "BOOL")) {
    if (anyNA(flat)) stop(sprintf("an %s output cannot hold NA", dtype))
    flat <- as.numeric(flat)
  }
  payload <- if (dtype == "FLOAT16") fb_pack(double_to_half(as.numeric(flat)), "u16")
             else fb_pack(flat, KETCH_SCALAR_KIND[[dtype]])
  list(dtype = dtype, shape = shape, payload = payload)
}

ketch_infer_dtype <- function(value) {
  if (is.function(value) || is.environment(value) || isS4(value) || inherits(value, "condition")) {
    stop(sprintf("an output of class %s cannot be sent", class(value)[1]))
  }
  if (is.raw(value)) return("BYTES")
  if (is.character(value) && length(value) == 1 && is.null(dim(value))) return("STRING")
  if (is.logical(value) && length(value) > 0 && !is.list(value)) return("BOOL")
  if (is.integer(value)) return("INT32")
  if (is.double(value)) return("FLOAT64")
  "JSON"
}

# ---------------------------------------------------------------- float16

half_to_double <- function(h) {
  sign <- ifelse(h >= 32768, -1, 1)
  e <- (h %/% 1024) %% 32
  m <- h %% 1024
  v <- ifelse(e == 0, m * 2^-24,
       ifelse(e == 31, ifelse(m == 0, Inf, NaN), (1 + m / 1024) * 2^(e - 15)))
  as.numeric(sign * v)
}

# Round to nearest, ties to even (R's round() does ties to even on exact halves).
double_to_half <- function(x) {
  vapply(x, function(v) {
    if (is.na(v)) return(32256)                     # 0x7E00, a quiet NaN
    sign <- if (v < 0 || (v == 0 && 1 / v < 0)) 32768 else 0
    a <- abs(v)
    if (a >= 65520) return(sign + 31744)            # rounds to infinity
    if (a < 2^-14) return(sign + round(a / 2^-24))  # subnormal (1024 is the smallest normal)
    e <- floor(log2(a))
    if (2^e > a) e <- e - 1
    if (2^(e + 1) <= a) e <- e + 1
    m <- round((a / 2^e - 1) * 1024)
    if (m == 1024) { m <- 0; e <- e + 1 }
    if (e > 15) return(sign + 31744)
    sign + (e + 15) * 1024 + m
  }, numeric(1))
}

# ---------------------------------------------------------------- whole batches

# The payloads of a batch as R values, numeric ones decoded with one readBin for the
# whole batch.
# 
# @param dtype a dtype name; @param ndim dimensions per item; @param shapes ndim entries
#   per item, item after item; @param payloads list of raw vectors, one per item.
# @return list(values = one R value per item (NULL for a bad item), errors = character,
#   NA for a good item, else why its payload does not fit).
# @keywords internal
ketch_batch_values <- function(dtype, ndim, shapes, payloads) {
  n <- length(payloads)
  errors <- rep(NA_character_, n)
  size <- KETCH_ITEMSIZE[dtype]
  if (is.na(size) || ndim >= 2 || n == 0) {
    values <- vector("list", n)
    for (i in seq_len(n)) {
      shape <- shapes[(i - 1) * ndim + seq_len(ndim)]
      v <- tryCatch(ketch_payload_to_value(dtype, shape, payloads[[i]]), error = function(e) e)
      # an error of R itself too (JSON nested too deep overflows the protection stack)
      if (inherits(v, "error")) errors[i] <- sprintf("item %d: %s", i - 1, substr(conditionMessage(v), 1, 300))
      else if (!is.null(v)) values[[i]] <- v
    }
    return(list(values = values, errors = errors))
  }
  counts <- if (ndim == 0) rep(1, n) else shapes
  got <- lengths(payloads)
  bad <- got != counts * size
  if (any(bad)) {
    errors[bad] <- sprintf("item %d: payload of %d bytes does not match %s shape [%s] (%.0f bytes)",
                           which(bad) - 1, got[bad], dtype, if (ndim == 0) "" else counts[bad], counts[bad] * size)
    counts[bad] <- 0
    payloads[bad] <- list(raw(0))
  }
  total <- sum(counts)
  bytes <- unlist(payloads, use.names = FALSE)
  flat <- if (dtype == "FLOAT64") {
    readBin(bytes, "double", n = total, size = 8L, endian = "little")
  } else if (dtype == "FLOAT32") {
    readBin(bytes, "double", n = total, size = 4L, endian = "little")
  } else if (dtype == "FLOAT16") {
    half_to_double(fb_unpack(bytes, "u16", total))
  } else {
    v <- fb_unpack(bytes, KETCH_SCALAR_KIND[[dtype]], total)
    if (dtype %in% c("INT8", "INT16", "INT32", "UINT8", "UINT16")) suppressWarnings(as.integer(v)) else v
  }
  values <- if (all(counts == 1)) as.list(flat) else ketch_split(flat, counts)
  values[bad] <- list(NULL)
  list(values = values, errors = errors)
}

# x cut into consecutive pieces of `counts` elements (a piece of 0 is an empty vector):
# split() with a factor made by hand, so that no factor() call sorts anything.
ketch_split <- function(x, counts) {
  n <- length(counts)
  f <- structure(rep.int(seq_len(n), counts), levels = as.character(seq_len(n)), class = "factor")
  unname(split(x, f))
}

# Plain numbers, one per item, encode without a per-item call: an atomic vector without
# dim or class, or a list of length-one unclassed numbers of one type.
ketch_plain_outputs <- function(out) {
  if (is.list(out)) {
    if (is.object(out) || !length(out) || !all(lengths(out) == 1L)) return(NULL)
    types <- vapply(out, typeof, "", USE.NAMES = FALSE)
    if (!all(types == types[1]) || !all(vapply(out, function(v) is.null(attributes(v)), NA, USE.NAMES = FALSE))) {
      return(NULL)
    }
    out <- unlist(out, use.names = FALSE)
  } else if (!is.null(dim(out)) || is.object(out)) {
    return(NULL)
  }
  if (is.double(out)) return(list(dtype = "FLOAT64", size = 8L, bytes = writeBin(out, raw(), size = 8L, endian = "little")))
  if (anyNA(out)) return(NULL)  # NA cannot be sent as an integer or a bool: the item errors say so
  if (is.integer(out)) return(list(dtype = "INT32", size = 4L, bytes = writeBin(out, raw(), size = 4L, endian = "little")))
  if (is.logical(out)) return(list(dtype = "BOOL", size = 1L, bytes = as.raw(out)))
  NULL
}

# The outputs of predict_fn as the columns of a PredictReply: ok (logical), group (index
# into tensors for OK items), tensors (list of list(dtype code, shape)), error (codes),
# message, payloads (raw vectors; empty for an error).
# @keywords internal
ketch_encode_outputs <- function(out) {
  n <- length(out)
  plain <- ketch_plain_outputs(out)
  if (!is.null(plain)) {
    payloads <- if (plain$size == 1L) as.list(plain$bytes) else ketch_split(plain$bytes, rep.int(plain$size, n))
    return(list(ok = rep(TRUE, n), group = rep(1L, n),
                tensors = list(list(dtype = KETCH_DTYPES[[plain$dtype]], shape = numeric(0))),
                error = integer(n), message = character(n), payloads = payloads))
  }
  if (is.atomic(out) && is.null(dim(out))) out <- as.list(out)
  ok <- logical(n)
  keys <- character(n)
  error <- integer(n)
  message <- character(n)
  payloads <- vector("list", n)
  typed <- vector("list", n)
  for (i in seq_len(n)) {
    value <- out[[i]]
    enc <- if (inherits(value, "condition")) value else tryCatch(ketch_value_to_payload(value), error = function(e) e)
    if (inherits(enc, "condition")) {
      error[i] <- KETCH_ERROR_CODES[["MODEL_ERROR"]]
      message[i] <- ketch_class_message(enc)
      payloads[i] <- list(raw(0))
    } else {
      ok[i] <- TRUE
      typed[[i]] <- list(dtype = KETCH_DTYPES[[enc$dtype]], shape = as.numeric(enc$shape))
      keys[i] <- paste(c(enc$dtype, enc$shape), collapse = " ")
      payloads[i] <- list(enc$payload)
    }
  }
  distinct <- unique(keys[ok])
  group <- rep(NA_integer_, n)
  group[ok] <- match(keys[ok], distinct)
  tensors <- typed[ok][match(distinct, keys[ok])]
  list(ok = ok, group = group, tensors = tensors, error = error, message = message, payloads = payloads)
}
